"""How small is the edge server? Install size, start-up time and memory of `pip install raypipe[edge]`.

Installs raypipe with only the `edge` extra into a fresh virtual environment (the versions pinned in
requirements.lock), checks that neither Ray nor torch is importable there, then starts `raypipe edge` on a
bundle and measures the time until /v2/health/ready answers and the memory of its processes. The baseline
is the full install this script runs from (`raypipe[all]`). Writes benchmarks/results/edge_footprint.json.

    python benchmarks/edge_footprint.py                 # makes a smoke run and a bundle first
    python benchmarks/edge_footprint.py --bundle DIR    # an existing bundle
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "edge_footprint.json"
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def _size_mib(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20, 1)


def _make_bundle(tmp: Path) -> Path:
    def raypipe(*args):
        done = subprocess.run([sys.executable, "-m", "raypipe", *args], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            sys.exit(f"raypipe {args[0]} failed:\n{done.stderr[-3000:]}")
        return done.stdout.strip().splitlines()[-1]

    run = raypipe("run", "--smoke-test", "--set", f"storage.root={tmp / 'runs'}")
    return Path(raypipe("export", run, "--to", str(tmp / "bundle")))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(python: Path, bundle: Path, cache: Path, workers: int) -> dict:
    port = _free_port()
    started = time.monotonic()
    process = subprocess.Popen([str(python), "-m", "raypipe", "edge", str(bundle), "--port", str(port),
                                "--workers", str(workers), "--cache", str(cache)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if process.poll() is not None:
                sys.exit(f"raypipe edge exited:\n{process.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        ready_s = time.monotonic() - started
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        rss = sum(p.memory_info().rss for p in tree)
        return {"workers": workers, "startup_s": round(ready_s, 2), "rss_mib": round(rss / 2**20, 1),
                "processes": len(tree)}
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="an existing bundle (default: make one from a smoke run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-footprint-") as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or _make_bundle(tmp)
        venv = tmp / "edge-venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        installed = time.monotonic()
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "-c", str(REPO / "requirements.lock"), f"{REPO}[edge]"], check=True)
        install_s = time.monotonic() - installed
        probe = "import importlib.util as u; print([m for m in ('ray', 'torch', 'pyarrow') if u.find_spec(m)])"
        present = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        results = {
            "edge_install": {"site_packages_mib": _size_mib(site), "install_s": round(install_s, 1),
                             "heavy_modules_present": json.loads(present.replace("'", '"'))},
            "full_install": {"site_packages_mib": _size_mib(Path(sysconfig.get_paths()["purelib"]))},
            "edge_server": [_start(python, bundle, tmp / "cache", workers) for workers in (1, 2)],
        }
    results["ratio_install_size"] = round(results["edge_install"]["site_packages_mib"] /
                                          results["full_install"]["site_packages_mib"], 3)
    results["environment"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "cpu": next((line.split(":", 1)[1].strip() for line in
                                           Path("/proc/cpuinfo").read_text().splitlines()
                                           if line.startswith("model name")), platform.processor())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
