"""The straight line through the stages. Assumes a running Ray (the CLI starts it).

`run` is the whole pipeline; `start`, `train_stage` and `finish` are its three steps, which
`raypipe data`, `raypipe train RUN` and `raypipe compress RUN` also run one at a time on a run folder.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml

from raypipe import compress, console, data, report, train
from raypipe.config import Config
from raypipe.records import DataStats, TrainSummary, Variant
from raypipe.storage import RunPaths

log = logging.getLogger("raypipe")
TRAIN_SUMMARY = "train.json"


def run(cfg: Config, source: dict[str, Any] | None = None) -> RunPaths:
    """Data -> train -> compress -> report -> seal. Returns the run; it is complete once sealed.
    `source` is what `data.inspect_source` found, when the caller checked it already."""
    paths = start(cfg)
    stats = data_stage(cfg, paths, source)
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


def data_stage(cfg: Config, paths: RunPaths, source: dict[str, Any] | None = None) -> DataStats:
    """Read, clean, split and shard the source into the run's data/."""
    with console.stage("data", f"reading {cfg.data.source}") as outcome, console.ray_data_bars():
        stats = data.build(cfg.data, cfg.rng_seed(), paths, source)
        dropped = sum(stats.rows_dropped.values())
        reasons = f" ({console.counts(stats.rows_dropped)})" if dropped else ""
        outcome["done"] = f"{stats.rows_read - dropped} rows kept, {dropped} dropped{reasons}; " + console.counts(
            stats.rows, zeros=True)
    return stats


def train_stage(cfg: Config, paths: RunPaths, stats: DataStats) -> TrainSummary:
    """Train on the run's data; the summary is kept as train.json for the later stages."""
    write_config(cfg, paths)
    low, high = cfg.train.worker_range()
    workers = low if low == high else f"{low}..{high}"
    with console.stage("train", f"{cfg.train.epochs} epochs, {workers} {cfg.train.device} workers, "
                                f"{cfg.model.arch}") as outcome:
        # Starting the worker group and the first epoch take a while before the first per-epoch line.
        log.info("train: starting %s Ray Train workers; a line follows each epoch as it ends", workers)
        trained = train.fit(cfg, data.load(paths), stats, paths)
        trained.write(paths, TRAIN_SUMMARY)
        outcome["done"] = f"best epoch {trained.best_epoch}, validation accuracy {trained.best_val_accuracy:.4f}"
    return trained


def _kept(paths: RunPaths, name: str) -> Variant | None:
    """A variant of an earlier compress, if its record and file are whole and agree (a compress that failed
    half way may have replaced the file and not yet the record): else it is built again."""
    rel = f"models/{name}"
    if not (paths.exists(f"{rel}/meta.json") and paths.exists(f"{rel}/model.onnx")):
        return None
    variant = Variant.read(paths, f"{rel}/meta.json")
    return compress.relocate(variant, paths) if paths.sha256(f"{rel}/model.onnx")[0] == variant.sha256 else None


def finish(cfg: Config, paths: RunPaths, stats: DataStats, trained: TrainSummary,
           names: list[str] | None = None) -> None:
    """Compress, evaluate and guard the variants, write the report, then seal the run (unsealed first, when
    it is compressed again). `names`: build only these recipes and keep the run's other variants as they
    are (default: build every recipe)."""
    paths.unseal()
    kept = {name: _kept(paths, name) for name in cfg.compress.recipes if names is not None and name not in names}
    kept = {name: variant for name, variant in kept.items() if variant is not None}
    build = [name for name in cfg.compress.recipes if name not in kept]
    with console.stage("compress", f"fp32{''.join(', ' + n for n in build)}: build, evaluate on the validation "
                                   f"and test splits, guard on validation") as outcome:
        variants = compress.run(cfg, trained.checkpoint, data.load(paths), stats, paths, kept)
        compress.guard(variants, cfg.compress.max_accuracy_drop)
        for variant in variants:
            variant.write(paths, f"models/{variant.name}/meta.json")
            log.info("compress: %s %.1f KiB, validation accuracy %.4f, test accuracy %.4f, %s", variant.name,
                     variant.size_bytes / 1024, variant.val_accuracy, variant.test_accuracy,
                     "accepted" if variant.accepted else f"rejected: {variant.reason}")
        promoted = compress.promote(variants, cfg.compress.promote)
        outcome["done"] = f"promoted {promoted} ({cfg.compress.promote} accepted)"
    write_config(cfg, paths)  # the recipes of every variant now in the run (after they all exist)
    with console.stage("report", "report.json, report.md, report.html; sealing") as outcome:
        hashes = paths.hashes(["data/", trained.checkpoint])  # hashed once: for the lineage and the manifest
        report.write(paths, report.build(paths, cfg.public_dict(), stats, trained, variants, promoted, hashes))
        paths.seal(known=hashes)
        outcome["done"] = "MANIFEST.json written"
