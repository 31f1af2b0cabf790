"""Are the compressed variants really smaller and faster, and what do they cost in accuracy?

Three models, each trained briefly by `raypipe run` (the real pipeline, one embedded Ray at a time) with
the same recipes: int8 (static QDQ), pruned (50% of the parameters + 5 epochs of finetune on Ray Train), and
pruned-int8; the MLP also gets dynamic int8. Per variant: file size and test accuracy from the run's
report, and latency at batch 1 and 64 (one thread) measured here from the stored files, each variant and
torch eager fp32 in turn for 7 rounds (timings on a small shared machine drift by tens of percent from
one minute to the next; the speed-ups are medians of per-round ratios against the ONNX fp32 file):

  mlp    : the digits MLP [256, 128] (scikit-learn's 8x8 digits, configs/default.yaml)
  cnn    : conv net [32, 64, 64] on synthetic 32x32x3 images (`raypipe datagen --difficulty`)
  resnet : residual net [16, 32, 64] on the same images

The synthetic images are made hard enough (overlapping classes, label noise) that fp32 lands between
0.80 and 0.95 test accuracy, so an accuracy guard has something to guard.

    python benchmarks/compression.py            # the README's figures (about 15 minutes on 2 cores)
    python benchmarks/compression.py --smoke    # a few minutes, checks the script
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raypipe import config, models  # noqa: E402
from raypipe.predict import OnnxModel  # noqa: E402
from raypipe.records import DataStats  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "compression.json"
RAYPIPE = Path(sys.executable).parent / "raypipe"
RECIPES = {
    "int8": [{"quantize": {"mode": "static"}}],
    "pruned": [{"prune": {"ratio": 0.5}}, {"finetune": {"epochs": 5}}],
    "pruned-int8": [{"prune": {"ratio": 0.5}}, {"finetune": {"epochs": 5}}, {"quantize": {"mode": "static"}}],
}
TARGETS = {  # (what, field, at least / at most, bound, models it applies to)
    "int8 >= 3.5x smaller": ("int8", "size_ratio", ">=", 3.5, ("cnn", "resnet")),
    "int8 >= 2x faster at batch 64": ("int8", "speedup_b64", ">=", 2.0, ("cnn", "resnet")),
    "int8 <= 0.5 point drop": ("int8", "drop", "<=", 0.005, ("cnn", "resnet")),
    "pruned >= 1.6x faster at batch 64": ("pruned", "speedup_b64", ">=", 1.6, ("mlp", "cnn", "resnet")),
    "pruned <= 1 point drop": ("pruned", "drop", "<=", 0.01, ("mlp", "cnn", "resnet")),
    "pruned-int8 >= 5x smaller": ("pruned-int8", "size_ratio", ">=", 5.0, ("mlp", "cnn", "resnet")),
}


def raypipe(*args: str) -> str:
    """Runs the CLI; returns its last stdout line (a URI)."""
    done = subprocess.run([str(RAYPIPE), *args], capture_output=True, text=True, timeout=3600, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"raypipe {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


def _eager_model(run: Path):
    """The trained fp32 model as PyTorch runs it (torch eager, raw inputs)."""
    cfg = config.load(run / "config.yaml")
    stats = DataStats.model_validate_json((run / "data/stats.json").read_text())
    state = torch.load(io.BytesIO((run / "checkpoints/best/checkpoint.pt").read_bytes()), weights_only=True)
    model = models.build(cfg.model, stats)
    model.load_state_dict(state["model"])
    return models.with_standardize(model, stats), stats.features


def interleaved_latency_ms(run: Path, names: list[str], rounds: int, calls: int) -> dict[str, dict]:
    """Median ms per call at batch 1 and 64 (one thread) of each variant's file and of torch eager fp32,
    measured in turn, round after round, so that the machine's drift touches every contender alike; the
    speed-ups are medians of the per-round ratios against ONNX fp32."""
    torch.set_num_threads(1)
    eager, features = _eager_model(run)
    sessions = {name: OnnxModel((run / f"models/{name}/model.onnx").read_bytes()) for name in names}
    contenders = {**{name: session.logits for name, session in sessions.items()},
                  "torch-eager": lambda x: eager(torch.from_numpy(x))}
    rows = np.random.default_rng(0).uniform(0, 255, (64, features)).astype(np.float32)
    times: dict[str, dict[int, list[float]]] = {name: {1: [], 64: []} for name in contenders}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, call in contenders.items():
                for batch in (1, 64):
                    x = np.ascontiguousarray(rows[:batch])
                    call(x)
                    samples = []
                    for _ in range(calls):
                        began = time.perf_counter()
                        call(x)
                        samples.append((time.perf_counter() - began) * 1000)
                    times[name][batch].append(statistics.median(samples))
    result = {}
    for name, by_batch in times.items():
        ratios = [base / mine for base, mine in zip(times["fp32"][64], by_batch[64])]
        result[name] = {"batch_1": round(statistics.median(by_batch[1]), 4),
                        "batch_64": round(statistics.median(by_batch[64]), 4),
                        "speedup_b64": round(statistics.median(ratios), 3)}
    return result


def measure(name: str, run_args: list[str], root: Path, rounds: int, calls: int) -> dict:
    began = time.monotonic()
    uri = raypipe("run", "--set", f"storage.root={root}", *run_args)
    run = Path(uri)
    report = json.loads((run / "report.json").read_text())
    baseline = next(v for v in report["variants"] if v["name"] == "fp32")
    latency = interleaved_latency_ms(run, [v["name"] for v in report["variants"]], rounds, calls)
    eager = latency.pop("torch-eager")
    variants = {}
    for v in report["variants"]:
        mine = latency[v["name"]]
        variants[v["name"]] = {
            "recipe": v["recipe"], "params": v["params"], "macs": v["macs"], "size_bytes": v["size_bytes"],
            "size_ratio": v["size_ratio"], "test_accuracy": round(v["test_accuracy"], 4),
            "drop": round(baseline["test_accuracy"] - v["test_accuracy"], 4),
            "latency_ms": {"batch_1": mine["batch_1"], "batch_64": mine["batch_64"]},
            "speedup_b64": mine["speedup_b64"],
            "speedup_b64_vs_torch_eager": round(eager["batch_64"] / mine["batch_64"], 3),
            "run_report": {"latency_ms": v["latency_ms"], "speedup_b64": v["speedup_b64"]},
            "accepted": v["accepted"], "reason": v["reason"],
        }
    print(f"{name}: fp32 test accuracy {baseline['test_accuracy']:.4f}, {time.monotonic() - began:.0f} s", flush=True)
    return {"run": uri, "rows": report["data"]["rows"], "epochs": report["train"]["epochs"],
            "promoted": report["promoted"],
            "torch_eager_fp32_latency_ms": {"batch_1": eager["batch_1"], "batch_64": eager["batch_64"]},
            "variants": variants, "seconds": round(time.monotonic() - began, 1)}


def check(results: dict) -> list[dict]:
    rows = []
    for target, (variant, field, op, bound, names) in TARGETS.items():
        for name in names:
            value = results[name]["variants"][variant][field]
            met = value >= bound if op == ">=" else value <= bound
            rows.append({"model": name, "target": target, "value": value, "met": met})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data and epochs: checks the script")
    parser.add_argument("--rows", type=int, default=12000, help="synthetic images (default: 12000)")
    parser.add_argument("--difficulty", type=float, default=0.6, help="datagen --difficulty (default: 0.6)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the image models (default: 8)")
    args = parser.parse_args()
    rows, epochs, rounds = (1500, 2, 2) if args.smoke else (args.rows, args.epochs, 7)
    recipes = ["--set", "compress.recipes=" + json.dumps(RECIPES)]
    if args.smoke:
        recipes = ["--smoke-test", *recipes]
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
               "torch": torch.__version__, "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as work:
        images, root = Path(work) / "images", Path(work) / "runs"
        raypipe("datagen", str(images), "--rows", str(rows), "--difficulty", str(args.difficulty),
                "--rows-per-file", str(max(1000, rows // 4)))
        results["data"] = {"synthetic_rows": rows, "difficulty": args.difficulty, "shape": "32x32x3", "classes": 10}
        image_args = ["--config", "configs/synthetic.yaml", "--set", f"data.source={images}",
                      "--set", f"train.epochs={epochs}", "--set", "compress.max_accuracy_drop=0.01"]
        mlp_recipes = {**RECIPES, "int8-dynamic": [{"quantize": {"mode": "dynamic"}}]}
        runs = {
            "mlp": [*(["--smoke-test"] if args.smoke else []), "--set", "compress.recipes=" + json.dumps(mlp_recipes)],
            "cnn": [*image_args, *recipes, "--set", "model.channels=[32, 64, 64]"],
            "resnet": [*image_args, *recipes, "--set", "model.arch=resnet", "--set", "model.channels=[16, 32, 64]"],
        }
        for name, run_args in runs.items():
            results[name] = measure(name, run_args, root, rounds, calls=20)
    results["targets"] = check(results)
    if not args.smoke:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["targets"], indent=2))


if __name__ == "__main__":
    main()
