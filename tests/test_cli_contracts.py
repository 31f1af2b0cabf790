"""The CLI's promises that need no Ray: a run id from `raypipe runs` opens with every command that reads a
RUN, read-only commands print their result and no config line, a run's strings are shown escaped, help
examples fit their command, and the parser builds where `os.sched_getaffinity` does not exist."""

import json
import os

import pytest
import yaml

from raypipe import cli, config, console, report, runs
from tests.conftest import raypipe

RUN_ID = "digits-20260101-000000-abcdef"


def _summary_report(uri: str, promoted: str = "int8") -> dict:
    variant = {"size_bytes": 2048, "val_accuracy": 0.91, "test_accuracy": 0.9, "accepted": True, "reason": "baseline",
               "latency_ms": {"batch_1": 0.01, "batch_64": 0.1}}
    return {"run_id": RUN_ID, "uri": uri, "promoted": promoted,
            "variants": [{**variant, "name": "fp32"}, {**variant, "name": promoted, "size_bytes": 1024}],
            "data": {"rows_read": 4, "rows_dropped": {"nan": 0, "duplicate": 1}, "rows": {"train": 3}},
            "train": {"epochs": 1, "workers": 1, "device": "cpu", "precision": "fp32", "restarts": 0,
                      "best_epoch": 1, "history": [{"epoch": 1, "val_accuracy": 0.9}]}}


@pytest.fixture
def root_with_a_run(tmp_path):
    """A storage root holding one run folder (config.yaml and report.json, nothing trained), and a config
    whose storage.root is that root."""
    root = tmp_path / "root"
    run = root / RUN_ID
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(_summary_report(str(run))))
    (run / "config.yaml").write_text(yaml.safe_dump(config.load().public_dict()))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"root": str(root)}}))
    return root, run, cfg


def test_a_run_id_as_runs_lists_it_opens_under_storage_root(root_with_a_run):
    root, run, cfg = root_with_a_run
    listed = raypipe("runs", "--config", str(cfg), "--json", timeout=60)
    assert [r["id"] for r in json.loads(listed.stdout)] == [RUN_ID]
    shown = raypipe("show", RUN_ID, "--config", str(cfg), timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"run       {run}" in shown.stdout
    # train and compress find it too: they get as far as what the run lacks.
    compressed = raypipe("compress", RUN_ID, "--config", str(cfg), timeout=60)
    assert compressed.returncode == 2 and f"{RUN_ID}: no train.json" in compressed.stderr, compressed.stderr
    missing = raypipe("show", "digits-20990101-000000-000000", "--config", str(cfg), timeout=60)
    assert missing.returncode == 2
    assert f"{root}/digits-20990101-000000-000000: no such run" in missing.stderr, missing.stderr


def test_locate_prefers_what_the_argument_already_names(tmp_path, monkeypatch):
    storage = config.StorageConfig(root=str(tmp_path / "root"))
    monkeypatch.chdir(tmp_path)
    assert runs.locate(RUN_ID, storage) == f"{tmp_path}/root/{RUN_ID}"
    (tmp_path / RUN_ID).mkdir()  # a folder of that name here: the user means it
    assert runs.locate(RUN_ID, storage) == RUN_ID
    for given in ("s3://bucket/runs/x", "runs/x", "/abs/x", "~/x"):
        assert runs.locate(given, storage) == given
    assert runs.locate("x", config.StorageConfig(root="s3://bucket/p")) == "s3://bucket/p/x"


def test_show_prints_the_summary_and_no_config_line(root_with_a_run):
    _, run, _ = root_with_a_run
    shown = raypipe("show", str(run), timeout=60)
    assert shown.returncode == 0
    warning = "warning: not sealed (no MANIFEST.json): its files are not vouched for"
    assert shown.stderr.strip().splitlines() == [warning]  # and no config line
    assert "dropped (duplicate 1)" in shown.stdout  # counts by reason, as a person reads them


def test_validate_prints_its_one_line_and_checks_the_bundled_default_without_a_file():
    done = raypipe("validate", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{config.DEFAULT_CONFIG}: valid"] and done.stderr == ""
    smoke = raypipe("validate", "configs/smoke.yaml", "--set", "train.epochs=3", timeout=60)
    assert smoke.returncode == 0 and smoke.stdout.splitlines() == ["configs/smoke.yaml: valid"]
    assert smoke.stderr == ""


def test_a_runs_strings_are_shown_escaped_never_obeyed(root_with_a_run):
    _, run, _ = root_with_a_run
    evil = _summary_report("/runs/x\x1b]0;title\x07", promoted="int8\x1b[2J")
    evil["data"]["rows_dropped"] = {"nan\u202e": 1}
    (run / "report.json").write_text(json.dumps(evil))
    shown = raypipe("show", str(run), timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert not any(not c.isprintable() for c in shown.stdout.replace("\n", "")), repr(shown.stdout)
    assert "int8\\x1b[2J *" in shown.stdout and "/runs/x\\x1b]0;title\\x07" in shown.stdout
    assert "nan\\u202e 1" in shown.stdout


def test_counts_read_as_words():
    assert console.counts({"nan": 0, "duplicate": 3, "outlier": 1}) == "duplicate 3, outlier 1"
    assert console.counts({"nan": 0}) == "none"
    assert console.counts({"train": 5, "val": 0}, zeros=True) == "train 5, val 0"
    full = _summary_report("/r")
    full["data"]["augmentations"] = []
    full["train"]["samples_per_second"] = 1.0
    for v in full["variants"]:
        v.update(recipe=[], params=1, macs=1, size_ratio=1.0, speedup_b64=1.0)
    markdown = report._markdown(full)
    assert "dropped duplicate 1, split train 3," in markdown and "{" not in markdown


def test_each_commands_help_gives_an_example_that_fits_it():
    serve = raypipe("serve", "--help", timeout=60)
    assert "serve.max_replicas=4" in serve.stdout and "train.epochs" not in serve.stdout
    assert "train.epochs=5" in raypipe("run", "--help", timeout=60).stdout


def test_the_parser_builds_where_the_os_has_no_cpu_affinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS has none
    args = cli.build_parser().parse_args(["edge", "some-run"])
    assert args.workers == os.cpu_count()
