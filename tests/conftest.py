"""Shared test helpers: loopback-only Ray, a real S3 endpoint (moto's server), a smoke run.

Never two Ray clusters at once: tests that run raypipe as a subprocess (which starts its own embedded
Ray) live in modules that hold no in-process Ray.
"""

from __future__ import annotations

import os

# Read by Ray at import: keeps every address Ray advertises on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Ray Train controller poll: each per-epoch report waits for it (2 s by default).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import json  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def data_stats(image_shape: list[int], mean: float | list[float], std: float | list[float],
               num_classes: int = 10):
    """A DataStats for a model of that input, as the data stage would describe it (counts left at 0)."""
    from raypipe.records import DataStats, Standardize

    features = int(np.prod(image_shape))
    mean = mean if isinstance(mean, list) else [mean] * features
    std = std if isinstance(std, list) else [std] * features
    return DataStats(source="test", format="test", features=features, image_shape=image_shape,
                     classes=[str(i) for i in range(num_classes)], num_classes=num_classes, rows_read=0,
                     rows_dropped={}, rows={}, shards={}, augmentations=[], standardize=Standardize(mean=mean, std=std))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raypipe(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m raypipe ARGS` as a user would; returns the finished process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "raypipe", *args],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


BIN = Path(sys.executable).parent


def wait_until_up(process: subprocess.Popen, url: str, seconds: float = 60) -> None:
    """Poll `url` until it answers 200, failing early (with its stderr) if `process` exits."""
    import time

    import requests

    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{url} not up in {seconds:.0f} s"
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.3)


@dataclass
class Head:
    """A Ray head started by `ray start --head` on loopback, in its own temp dir, and ended by its PIDs."""

    temp_dir: str
    port: int
    dashboard_port: int
    env: dict[str, str]

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_header(self) -> dict[str, str]:
        """What a client of the head's dashboard and job server sends (token auth is on)."""
        return {"Authorization": f"Bearer {Path(self.env['RAY_AUTH_TOKEN_PATH']).read_text().strip()}"}

    @classmethod
    def start(cls, *args: str, port: int | None = None, env: dict[str, str] | None = None) -> Head:
        import tempfile

        temp_dir = tempfile.mkdtemp(prefix="rph", dir="/tmp")  # short: Ray's socket paths have a length limit
        # Token auth with a token of the head's own: nothing in ~/.ray (which a new machine lacks) is needed.
        token = Path(temp_dir) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        head = cls(temp_dir, port or free_port(), free_port(),
                   {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token), **(env or {})})
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={head.port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={head.dashboard_port}", f"--temp-dir={temp_dir}",
             "--disable-usage-stats", *args],
            env=head.env, capture_output=True, text=True, timeout=120,
        )
        if started.returncode != 0:
            head.stop()
            raise RuntimeError(f"ray start failed: {started.stderr[-3000:]}")
        return head

    def ray(self, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        """The `ray` CLI against this head (`ray job submit ...`, `ray status ...`)."""
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def wait_for_job_server(self) -> None:
        """The job server comes up a moment after `ray start` returns."""
        import time

        deadline = time.monotonic() + 60
        while self.ray("job", "list", "--address", self.dashboard, timeout=60).returncode != 0:
            assert time.monotonic() < deadline, "the job server never came up"
            time.sleep(2)

    def stop(self) -> None:
        """End only this head's processes: those whose command line names its temp dir or GCS address
        (nodes an autoscaler started included), and their children."""
        import shutil

        import psutil

        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part or re.search(rf"{re.escape(self.gcs_address)}(?!\d)", part)
                       for part in proc.info["cmdline"] or []):
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
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class Run:
    uri: str
    process: subprocess.CompletedProcess

    @property
    def path(self) -> Path:
        return Path(self.uri)

    def report(self) -> dict:
        return json.loads((self.path / "report.json").read_text())


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Run:
    """One local smoke run for the whole session (its own embedded Ray, in a subprocess)."""
    root = tmp_path_factory.mktemp("runs")
    done = raypipe("run", "--smoke-test", "--set", f"storage.root={root}")
    assert done.returncode == 0, done.stderr[-4000:]
    return Run(done.stdout.strip().splitlines()[-1], done)


@dataclass
class StagedRun:
    uri: str
    steps: dict[str, subprocess.CompletedProcess]
    history_after_train: list[dict]
    checkpoint_after_train: dict

    @property
    def path(self) -> Path:
        return Path(self.uri)


@pytest.fixture(scope="session")
def staged_run(tmp_path_factory) -> StagedRun:
    """A second sealed run, made one stage at a time (data, train, train --resume, compress): a small CNN
    named digits-cnn with fp16 autocast. The stage test checks each step; the serving tests serve it."""
    import torch

    root = tmp_path_factory.mktemp("staged")
    steps = {"data": raypipe("data", "--smoke-test", "--set", f"storage.root={root}", "--set", "name=digits-cnn")}
    assert steps["data"].returncode == 0, steps["data"].stderr[-3000:]
    run = steps["data"].stdout.strip().splitlines()[-1]
    assert not (Path(run) / "MANIFEST.json").exists()
    steps["compress-too-early"] = raypipe("compress", run, timeout=120)
    cnn = ["--set", "train.lr=0.005", "--set", "model.arch=cnn", "--set", "model.channels=[16, 32]",
           "--set", "train.precision=fp16"]
    steps["train"] = raypipe("train", run, "--set", "train.epochs=3", *cnn)
    assert steps["train"].returncode == 0, steps["train"].stderr[-3000:]
    history = json.loads((Path(run) / "train.json").read_text())["history"]
    latest = max(Path(run).glob("checkpoints/checkpoint_*/checkpoint.pt"), key=lambda p: p.parent.name)
    state = torch.load(latest, weights_only=True)
    steps["train-again"] = raypipe("train", run, timeout=120)
    steps["resume"] = raypipe("train", run, "--resume", "--set", "train.epochs=5", *cnn)
    assert steps["resume"].returncode == 0, steps["resume"].stderr[-3000:]
    assert not (Path(run) / "MANIFEST.json").exists()
    steps["compress"] = raypipe("compress", run)
    assert steps["compress"].returncode == 0, steps["compress"].stderr[-3000:]
    return StagedRun(run, steps, history, state)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's real S3 HTTP server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
