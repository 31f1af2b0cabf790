"""Fault tolerance as users meet it: `raypipe run` in a subprocess (its own Ray) survives a training
worker killed with SIGKILL, losing at most one checkpoint interval."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import REPO


def _train_workers(pid: int) -> list[psutil.Process]:
    """Ray Train worker processes started by the raypipe process `pid` (its descendants only)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _registered_checkpoint(root: Path) -> bool:
    for snapshot in root.glob("*/checkpoints/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except ValueError:  # caught mid-write
            pass
    return False


def test_a_sigkilled_worker_costs_at_most_one_checkpoint_interval(tmp_path):
    root = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, "-m", "raypipe", "run", "--smoke-test", "--set", "train.epochs=6",
         "--set", f"storage.root={root}", "--set", "compress.recipes={int8: [quantize]}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        # Wait until Ray Train's controller has registered a checkpoint, not only until one is on disk: it
        # polls the workers every 2 s, so files can exist that a restart would not resume from. The
        # controller records what it registered in checkpoint_manager_snapshot.json, the file it restores from.
        while time.monotonic() < deadline and not _registered_checkpoint(root):
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.5)
        workers = _train_workers(process.pid)
        assert len(workers) == 2, "expected two Ray Train workers"
        workers[-1].send_signal(signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-4000:]
    report = json.loads((Path(stdout.strip().splitlines()[-1]) / "report.json").read_text())
    train = report["train"]
    assert train["restarts"] >= 1 and train["epochs"] == 6
    # The restarted attempt resumed from a checkpoint (two existed at the kill), not from scratch.
    assert train["start_epochs"][0] == 0 and train["start_epochs"][-1] >= 1, train["start_epochs"]
    assert [h["epoch"] for h in train["history"]] == list(range(1, 7))
    assert max(h["val_accuracy"] for h in train["history"]) > 0.6
    assert report["variants"][0]["test_accuracy"] > 0.6
