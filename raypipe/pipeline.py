"""run(cfg): the straight line through the stages. Assumes a running Ray (the CLI starts it)."""

from __future__ import annotations

import logging

import yaml

from raypipe import compress, data, report, train
from raypipe.config import Config
from raypipe.storage import RunPaths

log = logging.getLogger("raypipe")


def run(cfg: Config) -> RunPaths:
    """Data -> train -> compress -> report -> seal. Returns the run; it is complete once sealed."""
    paths = RunPaths.create(cfg.storage, cfg.name)
    log.info("run %s", paths.uri)
    paths.write_bytes("config.yaml", yaml.safe_dump(cfg.public_dict(), sort_keys=False).encode())

    stats = data.build(cfg.data, cfg.seed, paths)
    datasets = data.load(paths)
    trained = train.fit(cfg, datasets, stats, paths)
    variants = compress.run(cfg, trained["checkpoint"], datasets, stats, paths)
    promoted = compress.promote(variants)
    report.write(paths, report.build(paths, cfg.public_dict(), stats, trained, variants, promoted))

    paths.seal()
    log.info("run complete: promoted %s", promoted)
    return paths
