"""`ray job submit ... -- python -m raypipe run --smoke-test` against a loopback head we start and stop."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, free_port

BIN = Path(sys.executable).parent


def _stop_head(temp_dir: str, gcs_address: str) -> None:
    """End only the processes of the head we started: those whose command line names its temp dir or
    its GCS address, and their children."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part or gcs_address in part for part in proc.info["cmdline"] or []):
                roots.append(proc)
        except psutil.Error:
            continue
    procs = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    for proc in procs.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="rpj", dir="/tmp")
    dashboard, gcs_address = free_port(), f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_address.split(':')[1]}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
         "--num-cpus=2", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_head(temp_dir, gcs_address)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_the_smoke_pipeline(head, tmp_path):
    address, env = head
    root = tmp_path / "runs"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the job server comes up a moment after `ray start` returns
        if subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                          capture_output=True, timeout=60).returncode == 0:
            break
        time.sleep(2)
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
         "python", "-m", "raypipe", "run", "--smoke-test", "--set", f"storage.root={root}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout
    runs = list(root.glob("digits-*"))
    assert len(runs) == 1 and (runs[0] / "MANIFEST.json").is_file()
    assert str(runs[0]) in done.stdout
