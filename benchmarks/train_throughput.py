"""Does Ray Train cost throughput? raypipe's train stage against plain PyTorch DDP on the same work.

Samples/s of steady-state epochs (the first epoch of each run excluded), same model, same data held in
memory, same global batch, same threads, in the same run. Timings on a small shared machine drift by
several percent from one minute to the next, so raypipe and plain DDP alternate for `--rounds` rounds
and the ratio reported is the median of the per-round ratios:

  raypipe, 2 workers : the train stage (`raypipe.train.fit`, Ray Train + DDP over gloo), its train split
                       materialized in Ray's object store
  plain DDP, 2 procs : torch.multiprocessing + DistributedDataParallel over gloo, no Ray, numpy in memory
  raypipe, 1 worker  : the same train stage on one worker (scaling from 1 to 2)

With CUDA present, a GPU mode also compares AMP (bf16 and fp16 with a grad scaler) against fp32 on one GPU.

    python benchmarks/train_throughput.py            # the README's figures
    python benchmarks/train_throughput.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller keeps its default 2 s poll here (the embedded CLI and the tests poll every 0.5 s
# so that short epochs report sooner; on two cores that costs about 5% throughput).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raypipe import data, datagen, models, train  # noqa: E402
from raypipe.config import load  # noqa: E402
from raypipe.storage import RunPaths  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _config(root: str, rows: int, epochs: int, workers: int, precision: str = "fp32", device: str = "cpu"):
    return load(None, {
        "storage.root": root, "data.limit": rows, "data.augment": {"ops": []}, "data.outliers": {"method": "none"},
        "model.arch": "cnn", "model.channels": [16, 32], "train.epochs": epochs, "train.batch_size": 64,
        "train.workers": workers, "train.cpus_per_worker": 1, "train.checkpoint_every": epochs,
        "train.precision": precision, "train.device": device,
    })


def raypipe_rate(cfg, paths, stats) -> float:
    datasets = data.load(paths)
    datasets["train"] = datasets["train"].materialize()
    return train.fit(cfg, datasets, stats, paths).samples_per_second


def _ddp_worker(rank: int, world: int, port: int, x: np.ndarray, y: np.ndarray, stats, cfg, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(cfg.seed)
    model = torch.nn.parallel.DistributedDataParallel(models.build(cfg.model, stats))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    mine = slice(rank, None, world)
    xs, ys = x[mine], y[mine]
    batch = cfg.train.batch_size // world
    rates = []
    for epoch in range(cfg.train.epochs):
        began, seen = time.perf_counter(), 0
        for start in range(0, len(xs) - batch + 1, batch):
            # Standardized per batch, as raypipe's ingest does (the stored data stays raw).
            xb = torch.from_numpy(data.standardize(xs[start : start + batch], stats.standardize))
            yb = torch.from_numpy(ys[start : start + batch])
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(yb)
        elapsed = torch.tensor([seen, time.perf_counter() - began], dtype=torch.float64)
        dist.all_reduce(elapsed)
        if epoch > 0:
            rates.append(elapsed[0].item() / (elapsed[1].item() / world))
    if rank == 0:
        queue.put(float(np.median(rates)))
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_rate(paths, stats, cfg, world: int = 2) -> float:
    import pyarrow.parquet as pq
    import torch.multiprocessing as mp

    tables = [pq.read_table(f) for f in sorted(Path(paths.path("data/train")).glob("*.parquet"))]
    x = np.concatenate([np.stack(t.column("x").to_numpy(zero_copy_only=False)) for t in tables]).astype(np.float32)
    y = np.concatenate([t.column("label").to_numpy() for t in tables]).astype(np.int64)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_ddp_worker, args=(world, _free_port(), x, y, stats, cfg, queue), nprocs=world, join=True)
    return queue.get()


def gpu_amp(folder: str, rows: int, epochs: int) -> dict:
    """fp32 against bf16 and fp16 (with a grad scaler) on one GPU, the same train stage."""
    rates = {}
    for precision in ("fp32", "bf16", "fp16"):
        with tempfile.TemporaryDirectory() as root:
            cfg = _config(root, rows, epochs, 1, precision, device="cuda")
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": folder})})
            paths = RunPaths.create(cfg.storage, f"amp-{precision}")
            stats = data.build(cfg.data, cfg.seed, paths)
            rates[precision] = raypipe_rate(cfg, paths, stats)
    return {"samples_per_second": rates,
            "speedup_vs_fp32": {p: round(r / rates["fp32"], 2) for p, r in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24_000, help="synthetic 32x32x3 images")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="alternating raypipe / plain DDP measurements")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    rows, epochs, rounds = (1_500, 3, 1) if args.smoke else (args.rows, args.epochs, args.rounds)

    import ray

    def start_ray():
        # Four logical CPUs on two cores: two 1-CPU workers and room for Ray's own actors. The plain
        # DDP baseline also runs two single-threaded processes, with Ray shut down.
        ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR")

    results: dict = {"rows": rows, "epochs": epochs, "rounds": rounds, "model": "cnn [16, 32] on 32x32x3",
                     "global_batch": 64}
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/synth"
        start_ray()
        datagen.generate(folder, rows=rows, rows_per_file=max(1000, rows // 4))
        cfg2 = _config(f"{tmp}/runs", rows, epochs, 2)
        cfg2 = cfg2.model_copy(update={"data": cfg2.data.model_copy(update={"source": folder})})
        paths = RunPaths.create(cfg2.storage, "bench")
        stats = data.build(cfg2.data, cfg2.seed, paths)
        cfg1 = cfg2.model_copy(update={"train": cfg2.train.model_copy(update={"workers": 1})})
        one = raypipe_rate(cfg1, _copy_run(paths, "one"), stats)
        two, plain = [], []
        for round_ in range(rounds):
            if not ray.is_initialized():
                start_ray()
            two.append(raypipe_rate(cfg2, _copy_run(paths, f"two-{round_}"), stats))
            ray.shutdown()
            plain.append(ddp_rate(paths, stats, cfg2))
            print(f"round {round_ + 1}/{rounds}: raypipe {two[-1]:.0f}, plain DDP {plain[-1]:.0f} samples/s",
                  flush=True)
        if torch.cuda.is_available():
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR")
            results["gpu_amp"] = gpu_amp(folder, rows, epochs)
            ray.shutdown()

    ratios = [a / b for a, b in zip(two, plain)]
    results.update({
        "raypipe_2_workers": {"samples_per_second": round(float(np.median(two)), 1),
                              "rounds": [round(r, 1) for r in two]},
        "plain_ddp_2_processes": {"samples_per_second": round(float(np.median(plain)), 1),
                                  "rounds": [round(r, 1) for r in plain]},
        "raypipe_1_worker": {"samples_per_second": round(one, 1)},
        "ratios": {"raypipe_vs_plain_ddp": round(float(np.median(ratios)), 3),
                   "raypipe_vs_plain_ddp_rounds": [round(r, 3) for r in ratios],
                   "raypipe_2_vs_1_workers": round(float(np.median(two)) / one, 3)},
        "environment": _environment(),
    })
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("train_throughput_smoke.json" if args.smoke else "train_throughput.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _copy_run(paths, suffix: str):
    """A second run folder with the same data (checkpoints of one run must not resume another)."""
    import shutil

    other = type(paths)(paths.root, f"{paths.run_id}-{suffix}", paths.s3)
    shutil.copytree(paths.path("data"), other.path("data"))
    return other


def _environment() -> dict:
    import ray

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "cpu": cpu, "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


if __name__ == "__main__":
    main()
