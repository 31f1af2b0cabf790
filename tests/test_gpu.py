"""GPU code paths: one CUDA worker with fp16 autocast and a grad scaler, bf16, and DDP over NCCL.
Skipped where there is no CUDA device (CI has none)."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import raypipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp16", "bf16", "auto"])
def test_gpu_training_with_mixed_precision(tmp_path, precision):
    done = raypipe("run", "--smoke-test", "--set", f"storage.root={tmp_path}", "--set", "train.device=cuda",
                   "--set", "train.workers=1", "--set", "train.cpus_per_worker=1",
                   "--set", f"train.precision={precision}")
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((Path(done.stdout.strip().splitlines()[-1]) / "report.json").read_text())
    assert report["train"]["device"] == "cuda"
    assert report["train"]["precision"] in ({"bf16", "fp16"} if precision == "auto" else {precision})
    assert report["train"]["history"][-1]["train_loss"] < report["train"]["history"][0]["train_loss"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_multi_gpu_ddp(tmp_path):
    done = raypipe("run", "--smoke-test", "--set", f"storage.root={tmp_path}", "--set", "train.device=cuda",
                   "--set", "train.workers=2", "--set", "train.precision=bf16")
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((Path(done.stdout.strip().splitlines()[-1]) / "report.json").read_text())
    assert report["train"]["workers"] == 2 and report["train"]["device"] == "cuda"
