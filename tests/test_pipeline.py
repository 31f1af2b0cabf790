"""The whole pipeline as a user runs it: `python -m raypipe run --smoke-test` in a subprocess."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from raypipe.records import DataStats, TrainSummary
from raypipe.storage import RunPaths
from tests.conftest import raypipe

REPORT_KEYS = {"run_id", "versions", "config", "data", "train", "variants", "promoted", "lineage"}
DATA_KEYS = {"rows_read", "rows_dropped", "rows", "shards", "augmentations"}
TRAIN_KEYS = {"workers", "device", "precision", "epochs", "history", "samples_per_second", "restarts", "checkpoint"}
VARIANT_KEYS = {"name", "format", "uri", "size_bytes", "test_accuracy", "latency_ms", "accepted", "reason"}


def test_prints_the_run_uri_last_and_logs_the_config(smoke_run):
    assert smoke_run.path.is_absolute() and smoke_run.path.is_dir()
    assert "raypipe INFO config {" in smoke_run.process.stderr


def test_report_holds_every_field(smoke_run):
    report = smoke_run.report()
    assert REPORT_KEYS <= report.keys()
    assert set(report["versions"]) >= {"raypipe", "ray", "torch"}
    assert DATA_KEYS <= report["data"].keys() and TRAIN_KEYS <= report["train"].keys()
    data, train = report["data"], report["train"]
    assert data["rows_read"] == 500
    assert sum(data["rows"].values()) + sum(data["rows_dropped"].values()) == data["rows_read"]
    assert set(data["rows_dropped"]) >= {"nan", "duplicate"}
    assert train["workers"] == 2 and train["epochs"] == 4 and train["restarts"] == 0
    assert [h["epoch"] for h in train["history"]] == [1, 2, 3, 4]
    assert train["samples_per_second"] > 0
    # Learning happened: the loss falls and validation accuracy is well above chance (0.1).
    assert train["history"][-1]["train_loss"] < train["history"][0]["train_loss"]
    assert max(h["val_accuracy"] for h in train["history"]) > 0.5
    names = [v["name"] for v in report["variants"]]
    assert names == ["fp32", "int8", "pruned", "pruned-int8"]
    for variant in report["variants"]:
        assert VARIANT_KEYS <= variant.keys()
        assert set(variant["latency_ms"]) == {"batch_1", "batch_64"}
    fp32, int8 = report["variants"][:2]
    assert fp32["accepted"] and fp32["test_accuracy"] > 0.5
    assert int8["size_bytes"] < fp32["size_bytes"] / 2
    drop = report["config"]["compress"]["max_accuracy_drop"]
    assert int8["accepted"] == (fp32["val_accuracy"] - int8["val_accuracy"] <= drop + 1e-9)
    assert report["promoted"] in {v["name"] for v in report["variants"] if v["accepted"]}
    assert set(report["lineage"]) == {"dataset", "checkpoint", "artifacts"}


def test_run_layout_and_manifest_checksums(smoke_run):
    run = smoke_run.path
    for rel in ("config.yaml", "data/stats.json", "report.json", "report.md", "plots/training.png",
                "plots/variants.png", "models/fp32/model.onnx", "models/fp32/meta.json", "models/int8/model.onnx"):
        assert (run / rel).is_file(), rel
    for split in ("train", "val", "test"):
        assert list((run / "data" / split).glob("*.parquet")), split
    assert list((run / "checkpoints").glob("checkpoint_*/checkpoint.pt"))
    manifest = json.loads((run / "MANIFEST.json").read_text())
    on_disk = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == on_disk
    for rel, entry in manifest["files"].items():
        blob = (run / rel).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"] and len(blob) == entry["size"], rel
    meta = json.loads((run / "models/int8/meta.json").read_text())
    assert meta["sha256"] == manifest["files"]["models/int8/model.onnx"]["sha256"]
    stats = json.loads((run / "data/stats.json").read_text())
    assert len(stats["standardize"]["mean"]) == 64
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["name"] == "digits"


def test_verify_catches_a_changed_file(smoke_run, tmp_path):
    copy = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, copy)
    assert RunPaths.open(str(copy)).verify() == []
    (copy / "models/fp32/model.onnx").write_bytes(b"not a model")
    assert RunPaths.open(str(copy)).verify() == ["models/fp32/model.onnx: sha256 does not match the manifest"]
    (copy / "MANIFEST.json").unlink()
    assert "no MANIFEST.json" in RunPaths.open(str(copy)).verify()[0]


def test_compressing_a_sealed_run_again_unseals_it_first(smoke_run, tmp_path, monkeypatch):
    from raypipe import config, pipeline

    copy = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, copy)
    paths = RunPaths.open(str(copy))
    cfg = config.validate(yaml.safe_load((copy / "config.yaml").read_text()))

    def fails(*args, **kwargs):
        raise RuntimeError("compression failed half way")

    monkeypatch.setattr(pipeline.data, "load", lambda paths: {})
    monkeypatch.setattr(pipeline.compress, "run", fails)
    with pytest.raises(RuntimeError, match="half way"):
        pipeline.finish(cfg, paths, DataStats.read(paths, "data/stats.json"), TrainSummary.read(paths, "train.json"))
    # No stale manifest vouches for files that a re-compression may have half rewritten.
    assert not (copy / "MANIFEST.json").exists()


def test_a_stage_record_that_does_not_fit_is_refused_naming_file_and_field(smoke_run, tmp_path):
    copy = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, copy)
    summary = json.loads((copy / "train.json").read_text())
    summary["best_checkpoint"] = summary.pop("checkpoint")  # a renamed key
    (copy / "train.json").write_text(json.dumps(summary))
    done = raypipe("compress", str(copy), timeout=120)
    assert done.returncode == 2 and "train.json: checkpoint: Field required" in done.stderr, done.stderr[-2000:]
    assert "ray: starting" not in done.stderr


def test_stages_one_at_a_time(staged_run):
    steps, run = staged_run.steps, staged_run.uri
    assert (Path(run) / "data/stats.json").is_file()
    assert steps["compress-too-early"].returncode == 2 and "no train.json" in steps["compress-too-early"].stderr

    # The small CNN with fp16 autocast and a grad scaler on the CPU workers; the overrides became the
    # run's config.
    before, state = staged_run.history_after_train, staged_run.checkpoint_after_train
    assert len(before) == 3 and before[-1]["train_loss"] < before[0]["train_loss"]
    assert state["epoch"] == 3 and {"model", "optimizer", "scaler", "scheduler", "rng"} <= state.keys()
    assert state["optimizer"]["state"] and "scale" in state["scaler"]

    # Resume across invocations: refused without --resume, then the loss continues from epoch 3.
    assert steps["train-again"].returncode == 2 and "--resume" in steps["train-again"].stderr
    summary = json.loads((Path(run) / "train.json").read_text())
    after = summary["history"]
    assert [h["epoch"] for h in after] == [1, 2, 3, 4, 5] and after[:3] == before
    assert after[3]["train_loss"] < (before[0]["train_loss"] + before[2]["train_loss"]) / 2
    assert summary["precision"] == "fp16" and summary["restarts"] == 0
    assert yaml.safe_load((Path(run) / "config.yaml").read_text())["model"]["arch"] == "cnn"

    assert steps["compress"].stdout.strip().splitlines()[-1] == run
    assert RunPaths.open(run).verify() == []
    report = json.loads((Path(run) / "report.json").read_text())
    assert report["train"]["epochs"] == 5 and report["config"]["model"]["arch"] == "cnn"
    assert report["config"]["name"] == "digits-cnn"
    assert report["variants"][0]["test_accuracy"] > 0.3
