"""Config: every shipped file loads; bad keys and values exit 2 naming the key, before Ray, writing nothing."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from raypipe import config
from raypipe.config import ConfigError
from tests.conftest import REPO, raypipe

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_every_key_takes_effect(path: Path):
    cfg = config.load(path)
    assert cfg.train.max_failures >= 1
    loaded = _leaves(cfg.public_dict())
    for key, value in _leaves(yaml.safe_load(path.read_text())).items():
        if key in ("storage.root", "data.source") and value != "digits":
            value = str(Path(value).expanduser().resolve())  # paths are made absolute
        assert loaded[key] == value, key


def test_default_config_is_digits_with_seed():
    raw = yaml.safe_load(config.DEFAULT_CONFIG.read_text())
    assert raw["seed"] == 0 and raw["data"]["source"] == "digits" and raw["name"] == "digits"


def test_overrides_parse_yaml_values():
    cfg = config.load(None, dict(config.parse_override(s) for s in
                                 ["train.workers={min: 1, max: 3}", "train.epochs=5", "compress.promote=fastest"]))
    assert cfg.train.worker_range() == (1, 3)
    assert cfg.train.epochs == 5 and cfg.compress.promote == "fastest"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bogus=1", "train.bogus: unknown key"),
        ("train.workers={min: 4, max: 2}", "train.workers.min (4) must be <= train.workers.max (2)"),
        ("train.workers=0", "train.workers: must be an integer >= 1"),
        ("train.precision=fp8", "train.precision:"),
        ("model.arch=vit", "model.arch:"),
        ("train.epochs=abc", "train.epochs:"),
        ("storage.root=ftp://bucket", "storage.root:"),
        ("compress.max_accuracy_drop=-0.1", "compress.max_accuracy_drop:"),
        ("serve.min_replicas=3", "serve.min_replicas (3) must be <= serve.max_replicas (2)"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, dict([config.parse_override(override)]))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_secrets_are_kept_out_of_the_public_config():
    cfg = config.load(None, {"storage.s3.access_key_id": "AKIAEXAMPLE", "storage.s3.secret_access_key": "hush"})
    public = yaml.safe_dump(cfg.public_dict())
    assert "AKIAEXAMPLE" not in public and "hush" not in public
    assert "hush" not in repr(cfg) and "hush" not in str(cfg)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "train.workers={min: 4, max: 2}"], "train.workers.min (4)"),
        (["--set", "train.nope=1"], "train.nope: unknown key"),
        (["--set", "model.arch=vit"], "model.arch"),
        # Two workers of 8 CPUs can never start on this machine's embedded Ray: refused, not left waiting.
        (["--set", "train.cpus_per_worker=8"], "train.cpus_per_worker"),
        # A custom resource no local node has would wait forever: refused, naming the key.
        (["--set", "train.resources_per_worker={edge: 1}"], "train.resources_per_worker: ['edge'] exist only"),
        (["--set", "train.resources_per_worker={GPU: 1}"], "train.resources_per_worker.GPU: set by"),
        (["--set", "train.resources_per_worker={edge: .inf}"], "train.resources_per_worker.edge: must be a finite"),
        (["--config", "missing.yaml"], "missing.yaml"),
        (["--set", "novalue"], "--set 'novalue'"),
    ],
)
def test_cli_rejects_bad_input_with_exit_2_and_writes_nothing(tmp_path, args, needle):
    root = tmp_path / "runs"
    done = raypipe("run", "--set", f"storage.root={root}", *args, timeout=60)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("raypipe: error:") and needle in last
    assert not root.exists()
    assert "ray: starting" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cuda_training_without_a_gpu_exits_2_before_ray(tmp_path):
    root = tmp_path / "runs"
    done = raypipe("run", "--set", f"storage.root={root}", "--set", "train.device=cuda", timeout=60)
    assert done.returncode == 2 and "train.device: cuda needs 2 GPU(s)" in done.stderr.strip().splitlines()[-1]
    assert not root.exists() and "ray: starting" not in done.stderr


def test_validate_command(tmp_path):
    good = raypipe("validate", str(REPO / "configs" / "default.yaml"), timeout=60)
    assert good.returncode == 0 and "valid" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  precision: fp64\n")
    done = raypipe("validate", str(bad), timeout=60)
    assert done.returncode == 2 and "train.precision" in done.stderr


def test_help_reads_well():
    done = raypipe("--help", timeout=60)
    assert done.returncode == 0
    for command in ("run", "serve", "validate"):
        assert command in done.stdout


@pytest.mark.parametrize("field", sorted(config.SECRET_FIELDS))
def test_a_bad_secret_value_is_named_but_never_echoed(field):
    with pytest.raises(ConfigError) as err:
        config.validate({"storage": {"s3": {field: 123456789}}})
    assert f"storage.s3.{field}" in str(err.value) and "123456789" not in str(err.value)


def test_run_files_respect_the_umask(tmp_path, monkeypatch):
    from raypipe import storage

    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        monkeypatch.setattr(storage, "UMASK", umask)
        storage.write_bytes(str(tmp_path / "a" / f"{umask}.json"), b"{}")
        assert (tmp_path / "a" / f"{umask}.json").stat().st_mode & 0o777 == mode


def test_the_fit_check_counts_the_cpus_ray_will_see(monkeypatch):
    from ray._private import utils as ray_utils

    from raypipe import cli

    monkeypatch.setattr(ray_utils, "get_num_cpus", lambda *args, **kwargs: 1)  # e.g. a 1-CPU cgroup quota
    cfg = config.load(REPO / "configs/smoke.yaml", {"train.cpus_per_worker": 1.0})
    with pytest.raises(ConfigError, match="do not fit the embedded Ray's 1 CPUs"):
        cli._check_fits_locally(cfg)


def test_json_logs_keep_the_traceback():
    import json
    import logging

    from raypipe import console

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("raypipe", logging.ERROR, __file__, 1, "failed: %s", ("boom",), sys.exc_info())
    line = json.loads(console._JsonFormatter().format(record))
    assert line["message"] == "failed: boom" and "RuntimeError: boom" in line["traceback"]


def test_worker_resources_reach_ray_train():
    """What a worker asks Ray for is what steers the autoscaler to a node group."""
    from raypipe.train import scaling_config

    cfg = config.load(None, {"train.device": "cuda", "train.cpus_per_worker": 3,
                             "train.resources_per_worker": {"accelerator_type:A10G": 0.001}})
    scaling = scaling_config(cfg.train)
    assert scaling.use_gpu and scaling.resources_per_worker == {"CPU": 3, "accelerator_type:A10G": 0.001}
    assert scaling._resources_per_worker_not_none == {"CPU": 3, "GPU": 1, "accelerator_type:A10G": 0.001}


def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  lr 0.1\n  workers: 2\n")
    done = raypipe("validate", str(bad), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"raypipe: error: {bad}:3:3: could not find expected ':'"]
