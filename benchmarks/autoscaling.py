"""What does autoscaling cost a run? cluster/local.yaml (Ray's fake multi-node provider) against a static
head that already has the CPUs, on one machine, loopback only.

The same job, `ray job submit -- python -m raypipe run --smoke-test` with three 2-CPU training workers, runs
on (a) a 2-CPU head that must get three nodes from the autoscaler, and (b) a head started with 8 CPUs and
no autoscaler. Reported: job wall time of each and their ratio; on (a) when the first and the last node
joined and how long after the job the nodes were gone (idle_timeout_minutes is 0.25 there). The heads are
ours, in their own temp dirs, ended by their PIDs.

    python benchmarks/autoscaling.py          # about 5 minutes on 2 cores
"""

import json
import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray address on 127.0.0.1 (read at import)

import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results" / "autoscaling.json"
JOB = ["python", "-m", "raypipe", "run", "--smoke-test", "--set", "train.workers=3",
       "--set", "train.cpus_per_worker=2", "--set", "storage.shared=true"]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalHead:
    """`ray start --head` on loopback in a temp dir of its own; `close()` ends what runs under it."""

    def __init__(self, *args: str, port: int, env: dict[str, str]):
        self.temp_dir, self.port, self.dashboard_port = tempfile.mkdtemp(prefix="rpb", dir="/tmp"), port, _port()
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", **env}
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                        f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *args],
                       env=self.env, check=True, capture_output=True, timeout=120)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        token = Path.home() / ".ray" / "auth_token"
        self.headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", self.dashboard], env=self.env,
                             capture_output=True).returncode != 0:
            time.sleep(1)

    def nodes(self) -> int:
        reply = requests.get(f"{self.dashboard}/api/v0/nodes", params={"limit": 100}, headers=self.headers, timeout=30)
        return sum(n["state"] == "ALIVE" for n in reply.json()["data"]["result"]["result"])

    def submit(self, root: Path) -> float:
        began = time.monotonic()
        subprocess.run([str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--", *JOB,
                        "--set", f"storage.root={root}"], cwd=REPO, env=self.env, check=True, capture_output=True)
        return time.monotonic() - began

    def close(self) -> None:
        mine = [p for p in psutil.process_iter(["cmdline"])
                if any(self.temp_dir in part or f"127.0.0.1:{self.port}" in part for part in p.info["cmdline"] or [])]
        procs = {p.pid: p for root in mine for p in [root, *root.children(recursive=True)]}.values()
        for proc in procs:
            proc.terminate()
        for proc in psutil.wait_procs(list(procs), timeout=15)[1]:
            proc.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def autoscaled(work: Path) -> dict:
    config = yaml.safe_load((REPO / "cluster/local.yaml").read_text())
    port = _port()
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    (work / "local.yaml").write_text(yaml.safe_dump(config))
    head = LocalHead("--num-cpus=2", "--object-store-memory=500000000", f"--autoscaling-config={work / 'local.yaml'}",
                     port=port, env={"RAY_FAKE_CLUSTER": "1"})
    try:
        timeline, done = [], threading.Event()
        began = time.monotonic()

        def watch():
            while not done.is_set():
                timeline.append((round(time.monotonic() - began, 1), head.nodes()))
                done.wait(1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        job_s = head.submit(work / "autoscaled")
        while head.nodes() > 1 and time.monotonic() - began < job_s + 300:
            time.sleep(1)
        gone_s = time.monotonic() - began - job_s
        done.set()
        watcher.join()
    finally:
        head.close()
    first = next(t for t, n in timeline if n > 1)
    full = next(t for t, n in timeline if n == max(n for _, n in timeline))
    return {"job_s": round(job_s, 1), "first_node_joined_s": first, "last_node_joined_s": full,
            "max_nodes": max(n for _, n in timeline), "nodes_gone_after_job_s": round(gone_s, 1),
            "idle_timeout_s": config["idle_timeout_minutes"] * 60, "timeline": timeline}


def static(work: Path) -> dict:
    head = LocalHead("--num-cpus=8", "--object-store-memory=500000000", port=_port(), env={})
    try:
        return {"job_s": round(head.submit(work / "static"), 1)}
    finally:
        head.close()


def main() -> None:
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        static_run = static(Path(tmp))
        autoscaled_run = autoscaled(Path(tmp))
    result = {
        "question": "What does autoscaling cost a run? The same 3-worker smoke job on a 2-CPU head that gets "
                    "nodes from the autoscaler (cluster/local.yaml) and on a static 8-CPU head.",
        "static": static_run,
        "autoscaled": autoscaled_run,
        "ratio_job_time_autoscaled_vs_static": round(autoscaled_run["job_s"] / static_run["job_s"], 2),
        "environment": {"ray": ray.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "machine": platform.processor() or platform.machine()},
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "autoscaled"} | {
        "autoscaled": {k: v for k, v in autoscaled_run.items() if k != "timeline"}}, indent=2))


if __name__ == "__main__":
    main()
