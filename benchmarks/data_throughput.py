"""How fast does the data stage clean, standardize and augment images, against the usual alternatives?

Images/s of one steady-state pass over N synthetic 32x32x3 images read from local parquet, doing the
same per-batch work (raypipe's own batch functions) three ways, in the same run:

  (a) raypipe on Ray Data, 2 CPUs: read_parquet -> map_batches(work), blocks streamed to the driver
  (b) one process, numpy: pyarrow batches -> work
  (c) a torch DataLoader with num_workers=2 over the same files -> work

work = image column -> flat rows, clean (finite check, row keys, label check, split tag), augment
(crop with padding, horizontal flip, cutout, Gaussian noise), standardize with train-split statistics.
The duplicate scan (a separate streaming pass, since it must see every key first) is timed on its own.

    python benchmarks/data_throughput.py            # 100,000 images (the README's figures)
    python benchmarks/data_throughput.py --smoke    # seconds
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raypipe import data, datagen  # noqa: E402
from raypipe.config import AugmentConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = [3, 32, 32]
AUGMENT = AugmentConfig(ops=["crop", "flip", "cutout", "noise"], crop_padding=4, noise_std=8.0)
CLASSES = [str(c) for c in range(10)]


def work(batch: dict, stats: dict) -> dict:
    """The per-batch work all three contenders do: raypipe's own batch functions."""
    rows = data.tabular_to_xy(batch, ["image"], "label", image=True)
    clean = data.clean_batch(rows, CLASSES, np.array([], dtype=np.int64), None, 0.15, 0.15, seed=0)
    x = data.standardize(data.augment(clean, AUGMENT, SHAPE, seed=0, epoch=1), stats)
    return {"x": x, "label": clean["label"]}


def _stats(folder: Path) -> dict:
    table = pq.read_table(next(folder.glob("*.parquet"))).slice(0, 2000).to_pydict()
    rows = data.tabular_to_xy({k: np.asarray(v) for k, v in table.items()}, ["image"], "label", image=True)
    return data.combine_moments([data.moments(rows)], "channel", SHAPE)


def _file_batches(files: list[Path], batch_size: int):
    for file in files:
        for record in pq.ParquetFile(file).iter_batches(batch_size=batch_size):
            image = np.stack(record.column("image").to_numpy(zero_copy_only=False))
            yield {"image": image.reshape(len(image), 32, 32, 3), "label": record.column("label").to_numpy()}


def numpy_loop(files: list[Path], stats: dict, batch_size: int) -> int:
    return sum(len(work(b, stats)["x"]) for b in _file_batches(files, batch_size))


def dataloader(files: list[Path], stats: dict, batch_size: int) -> int:
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class Files(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            mine = files[info.id :: info.num_workers] if info else files
            for batch in _file_batches(mine, batch_size):
                yield work(batch, stats)

    torch.set_num_threads(1)
    loader = DataLoader(Files(), batch_size=None, num_workers=2, prefetch_factor=4, persistent_workers=False)
    return sum(len(b["x"]) for b in loader)


def ray_data(folder: Path, stats: dict, batch_size: int) -> int:
    import ray.data

    ds = ray.data.read_parquet(str(folder)).map_batches(work, fn_kwargs={"stats": stats}, batch_size=batch_size or None)
    return sum(len(b["x"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def ray_read_only(folder: Path) -> int:
    """Ray Data's parquet read alone (fused with a no-op), to show what the read path costs."""
    import ray.data

    ds = ray.data.read_parquet(str(folder)).map_batches(lambda b: {"n": np.array([len(b["label"])])}, batch_size=None)
    return int(sum(b["n"].sum() for b in ds.iter_batches(batch_size=None, batch_format="numpy")))


def ray_scan(folder: Path) -> int:
    """The duplicate scan: keys of every row, collected by the driver."""
    import ray.data

    def keys(batch):
        return data.scan_batch(data.tabular_to_xy(batch, ["image"], "label", image=True))

    ds = ray.data.read_parquet(str(folder)).map_batches(keys, batch_size=4096)
    return sum(len(b["key"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def timed(fn, *args) -> tuple[float, int]:
    began = time.perf_counter()
    rows = fn(*args)
    return time.perf_counter() - began, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--smoke", action="store_true", help="5,000 images: seconds, for CI")
    parser.add_argument("--batch-sizes", default="0,1000,5000",
                        help="Ray Data batch sizes to try; 0 = whole blocks (lets the read and the map fuse)")
    args = parser.parse_args()
    rows = 5_000 if args.smoke else args.rows
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import ray
    import torch

    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        datagen.generate(str(folder), rows=rows, rows_per_file=5000)
        files = sorted(folder.glob("*.parquet"))
        stats = _stats(folder)
        results: dict = {"rows": rows, "files": len(files), "bytes": sum(f.stat().st_size for f in files)}

        ray_data(folder, stats, batch_sizes[0])  # warm-up: worker processes and imports
        ray_runs = {}
        for size in batch_sizes:
            seconds, n = timed(ray_data, folder, stats, size)
            assert n == rows, (n, rows)
            ray_runs[size] = {"seconds": round(seconds, 3), "images_per_second": round(n / seconds)}
        best = max(ray_runs, key=lambda s: ray_runs[s]["images_per_second"])
        scan_seconds, _ = timed(ray_scan, folder)
        read_seconds, _ = timed(ray_read_only, folder)
        ray.shutdown()

        loop_batch = best or 5000
        numpy_seconds, n = timed(numpy_loop, files, stats, loop_batch)
        assert n == rows
        loader_seconds, n = timed(dataloader, files, stats, loop_batch)
        assert n == rows

    ray_rate = ray_runs[best]["images_per_second"]
    results.update({
        "work": "image->rows, clean (finite, keys, labels, split), augment (crop+flip+cutout+noise), standardize",
        "ray_data": {"cpus": 2, "by_batch_size": ray_runs, "best_batch_size": best, "images_per_second": ray_rate},
        "ray_data_duplicate_scan": {"seconds": round(scan_seconds, 3), "images_per_second": round(rows / scan_seconds)},
        "ray_data_read_only": {"seconds": round(read_seconds, 3), "images_per_second": round(rows / read_seconds)},
        "numpy_single_process": {"seconds": round(numpy_seconds, 3), "images_per_second": round(rows / numpy_seconds)},
        "torch_dataloader_2_workers": {"seconds": round(loader_seconds, 3),
                                       "images_per_second": round(rows / loader_seconds)},
    })
    results["ratios"] = {
        "ray_data_vs_numpy": round(ray_rate / results["numpy_single_process"]["images_per_second"], 2),
        "ray_data_vs_dataloader": round(ray_rate / results["torch_dataloader_2_workers"]["images_per_second"], 2),
    }
    results["environment"] = _environment(torch)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("data_throughput_smoke.json" if args.smoke else "data_throughput.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _environment(torch) -> dict:
    import ray

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "cpu": cpu, "cpus": os.cpu_count(), "machine": platform.machine()}


if __name__ == "__main__":
    main()
