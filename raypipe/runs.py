"""The runs under a storage root, as `raypipe runs` lists them: read from each run's small files, local or S3."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import posixpath
import re
from typing import Any

from raypipe import console
from raypipe.config import S3Config, StorageConfig
from raypipe.storage import MANIFEST, RunPaths, filesystem, strip_scheme

# <name>-YYYYMMDD-HHMMSS-<hex>, as RunPaths.create names a run
RUN_ID = re.compile(r"(?P<name>[\w.-]+)-(?P<stamp>\d{8}-\d{6})-[0-9a-f]{6}", re.ASCII)  # fullmatch'd
COLUMNS = ("id", "date", "model", "state", "best val acc", "promoted", "size")


def locate(run: str, storage: StorageConfig) -> str:
    """The run a command-line RUN argument names: a path or s3:// URI as given, or a bare run id (as
    `raypipe runs` lists them) under `storage.root` when no such file or folder is in the working directory."""
    if run.startswith(("s3://", "~")) or "/" in run or os.path.exists(run):
        return run
    return f"{storage.root}/{run}"


def list_runs(root: str, s3: S3Config | None = None) -> list[dict[str, Any]]:
    """Every run folder (named as raypipe names runs) under `root`, a storage.root as the config made it:
    absolute, or s3://bucket/prefix. under `root`, newest first: id, date, model name, state (sealed, or the last stage
    reached), best validation accuracy, promoted variant and its size."""
    fs = filesystem(root, s3)
    if not fs.isdir(strip_scheme(root)):
        return []
    found = []
    for folder in fs.ls(strip_scheme(root), detail=False):
        match = RUN_ID.fullmatch(posixpath.basename(folder))
        if match and fs.isdir(folder):
            found.append(_describe(RunPaths(root, match.group(0), s3 or S3Config()), match))
    return sorted(found, key=lambda run: run["date"], reverse=True)


def _describe(paths: RunPaths, match: re.Match) -> dict[str, Any]:
    run = {
        "id": paths.run_id,
        "uri": paths.uri,
        "date": "",
        "model": match.group("name"),
        "state": "unreadable",
        "best_val_accuracy": None,
        "promoted": None,
        "promoted_size_bytes": None,
    }
    try:
        run["date"] = dt.datetime.strptime(match.group("stamp"), "%Y%m%d-%H%M%S").replace(
            tzinfo=dt.timezone.utc).isoformat()
        has = {posixpath.basename(p) for p in paths.fs.ls(paths.path(""), detail=False)}
        run["state"] = "sealed" if MANIFEST in has else _stage(has)
        if "train.json" in has:
            best = float(paths.read_json("train.json")["best_val_accuracy"])
            run["best_val_accuracy"] = best if math.isfinite(best) else None
        if "report.json" in has:
            report = paths.read_json("report.json")
            run["model"] = console.printable(report["config"]["name"])
            promoted = next(v for v in report["variants"] if v["name"] == report["promoted"])
            run["promoted"] = console.printable(promoted["name"])
            run["promoted_size_bytes"] = int(promoted["size_bytes"])
    except Exception:  # an unreadable folder or a damaged file: listed and marked, never fatal to the list
        run["state"] += " (damaged)" if run["state"] != "unreadable" else ""
    return run


def _stage(has: set[str]) -> str:
    """How far an unsealed run got."""
    for name, stage in (("report.json", "compressed, unsealed"), ("train.json", "trained"),
                        ("checkpoints", "training"), ("data", "data")):
        if name in has:
            return f"incomplete: {stage}"
    return "incomplete: started"


def table(runs: list[dict[str, Any]]) -> str:
    rows = [COLUMNS] + [(
        r["id"], r["date"][:16].replace("T", " "), r["model"], r["state"],
        "" if r["best_val_accuracy"] is None else f"{r['best_val_accuracy']:.4f}",
        r["promoted"] or "", "" if r["promoted_size_bytes"] is None else f"{r['promoted_size_bytes'] / 1024:.1f} KiB",
    ) for r in runs]
    return "\n".join(console.columns(rows))


def to_json(runs: list[dict[str, Any]]) -> str:
    return json.dumps(runs, indent=2)
