"""The straight line through the stages. Assumes a running Ray (the CLI starts it).

`run` is the whole pipeline; `start`, `train_stage` and `finish` are its three steps, which
`raypipe data`, `raypipe train RUN` and `raypipe compress RUN` also run one at a time on a run folder.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml

from raypipe import compress, data, report, train
from raypipe.config import Config
from raypipe.records import DataStats, TrainSummary
from raypipe.storage import RunPaths

log = logging.getLogger("raypipe")
TRAIN_SUMMARY = "train.json"


def run(cfg: Config, source: dict[str, Any] | None = None) -> RunPaths:
    """Data -> train -> compress -> report -> seal. Returns the run; it is complete once sealed.
    `source` is what `data.inspect_source` found, when the caller checked it already."""
    paths = start(cfg)
    stats = data.build(cfg.data, cfg.rng_seed(), paths, source)
    trained = train_stage(cfg, paths, stats)
    finish(cfg, paths, stats, trained)
    return paths


def start(cfg: Config) -> RunPaths:
    """A new run folder holding the resolved config."""
    paths = RunPaths.create(cfg.storage, cfg.name)
    log.info("run %s", paths.uri)
    write_config(cfg, paths)
    return paths


def write_config(cfg: Config, paths: RunPaths) -> None:
    """config.yaml: the resolved config the run's files were made with (secrets left out)."""
    paths.write_bytes("config.yaml", yaml.safe_dump(cfg.public_dict(), sort_keys=False).encode())


def train_stage(cfg: Config, paths: RunPaths, stats: DataStats) -> TrainSummary:
    """Train on the run's data; the summary is kept as train.json for the later stages."""
    write_config(cfg, paths)
    trained = train.fit(cfg, data.load(paths), stats, paths)
    trained.write(paths, TRAIN_SUMMARY)
    return trained


def finish(cfg: Config, paths: RunPaths, stats: DataStats, trained: TrainSummary) -> None:
    """Compress, evaluate and guard the variants, write the report, then seal the run (unsealed first, when
    it is compressed again)."""
    paths.unseal()
    variants = compress.run(cfg, trained.checkpoint, data.load(paths), stats, paths)
    promoted = compress.promote(variants)
    hashes = paths.hashes(["data/", trained.checkpoint])  # hashed once: for the lineage and the manifest
    report.write(paths, report.build(paths, cfg.public_dict(), stats, trained, variants, promoted, hashes))
    paths.seal(known=hashes)
    log.info("run complete: promoted %s", promoted)
