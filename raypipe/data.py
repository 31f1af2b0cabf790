"""The data stage on Ray Data: read -> clean -> split -> fit statistics -> write parquet shards.

Transforms are plain batch functions (`dict[str, np.ndarray] -> dict[str, np.ndarray]`), tested without
Ray and composed with `map_batches`. Standardization statistics are fitted on the train split only; the
model applies them as its first layer, so whatever serves the model takes raw inputs. Augmentation runs
in each training worker as it iterates its shard, seeded by (seed, epoch, row key): identical for the
same seed and epoch whatever the block order, different every epoch.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data.expressions import col

from raypipe.config import AugmentConfig, DataConfig
from raypipe.storage import RunPaths

log = logging.getLogger("raypipe")

SPLITS = ("train", "val", "test")
Batch = dict[str, np.ndarray]


# ---- sources ---------------------------------------------------------------------------------------

def read_digits(limit: int | None = None) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0-16) as a Ray Dataset."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32)[:limit]
    y = digits.target.astype(np.int64)[:limit]
    ds = ray.data.from_items([{"x": row, "label": label} for row, label in zip(x, y)], override_num_blocks=2)
    info = {"source": "digits", "image_shape": [1, 8, 8], "classes": 10, "feature_names": None}
    return ds, info


# ---- cleaning and splitting: pure batch functions -------------------------------------------------

def row_keys(x: np.ndarray) -> np.ndarray:
    """A stable 64-bit hex key per row, hashed from its feature bytes (exact duplicates share it)."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)
    return np.array([hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in flat])


def drop_nonfinite(batch: Batch) -> Batch:
    """Drop rows whose features hold NaN or +-inf."""
    finite = np.isfinite(batch["x"].reshape(len(batch["x"]), -1)).all(axis=1)
    return {name: column[finite] for name, column in batch.items()}


def add_key(batch: Batch) -> Batch:
    return {**batch, "key": row_keys(batch["x"])}


def first_of_group(batch: Batch) -> Batch:
    """Keep one row of a group of exact duplicates."""
    return {name: column[:1] for name, column in batch.items()}


def split_of(keys: np.ndarray, val: float, test: float, seed: int) -> np.ndarray:
    """Assign each key to train/val/test by a stable hash, so the same data always splits the same."""
    salted = [hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest() for k in keys]
    u = np.array([int.from_bytes(h, "little") for h in salted], dtype=np.float64) / 2.0**64
    return np.where(u < test, "test", np.where(u < test + val, "val", "train"))


def split_counts(batch: Batch) -> Batch:
    """Rows per split in one batch (summed across batches by `count_splits`)."""
    return {"split": np.array(SPLITS), "n": np.array([int((batch["split"] == s).sum()) for s in SPLITS])}


def count_splits(rows: list[dict[str, Any]]) -> dict[str, int]:
    totals = {split: 0 for split in SPLITS}
    for row in rows:
        totals[str(row["split"])] += int(row["n"])
    return totals


def moments(batch: Batch) -> Batch:
    """Per-feature count, sum and sum of squares of one batch (combined across batches by `fit_stats`)."""
    x = batch["x"].reshape(len(batch["x"]), -1).astype(np.float64)
    return {"n": np.array([len(x)]), "sum": x.sum(axis=0)[None], "sumsq": (x * x).sum(axis=0)[None]}


def combine_moments(parts: list[Batch], per: str, image_shape: list[int]) -> dict[str, list[float]]:
    """Mean and std per feature from per-batch moments; `per="channel"` pools each image channel's
    pixels (the usual choice for images: a rarely-lit border pixel would otherwise get a tiny std and
    blow up its inputs). Returned per feature either way, ready to subtract and divide."""
    n = sum(float(p["n"].sum()) for p in parts)
    total = sum(p["sum"].sum(axis=0) for p in parts)
    totalsq = sum(p["sumsq"].sum(axis=0) for p in parts)
    if per == "channel":
        channels = image_shape[0]
        pixels = total.size // channels
        n, total, totalsq = n * pixels, total.reshape(channels, -1).sum(1), totalsq.reshape(channels, -1).sum(1)
        total, totalsq = np.repeat(total, pixels), np.repeat(totalsq, pixels)
    mean = total / n
    std = np.sqrt(np.maximum(totalsq / n - mean * mean, 0.0))
    # A constant feature would divide by zero: leave its scale alone.
    std = np.where(std < 1e-6, 1.0, std)
    return {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist()}


# ---- augmentation: run by each training worker, per epoch -------------------------------------------

def _row_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, int(key, 16)])


def augment(batch: Batch, cfg: AugmentConfig, image_shape: list[int], seed: int, epoch: int) -> np.ndarray:
    """Randomly shift, rotate and add noise to a batch of raw images; returns the new flat features.

    Each row's randomness comes from (seed, epoch, row key) only, so the result does not depend on
    which block or batch the row arrives in.
    """
    x = batch["x"].astype(np.float32)
    n = len(x)
    if not cfg.ops or n == 0:
        return x
    c, h, w = image_shape
    imgs = x.reshape(n, c, h, w)
    rngs = [_row_rng(seed, epoch, k) for k in batch["key"]]
    draws = np.array([r.uniform(-1.0, 1.0, size=3) for r in rngs])  # angle, dy, dx
    angle = np.deg2rad(draws[:, 0] * cfg.max_degrees) if "rotate" in cfg.ops else np.zeros(n)
    shift = np.rint(draws[:, 1:] * cfg.max_shift) if "shift" in cfg.ops else np.zeros((n, 2))

    if "rotate" in cfg.ops or "shift" in cfg.ops:
        # One inverse affine map per image, bilinear sampling, zero outside: vectorised over the batch.
        yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
        cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        ty, tx = (yy[None] - shift[:, 0, None, None]), (xx[None] - shift[:, 1, None, None])
        sy = cos * ty - sin * tx + (h - 1) / 2
        sx = sin * ty + cos * tx + (w - 1) / 2
        y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
        fy, fx = (sy - y0)[:, None], (sx - x0)[:, None]
        out = np.zeros_like(imgs)
        rows = np.arange(n)[:, None, None]
        for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            yi, xi = y0 + dy, x0 + dx
            inside = ((yi >= 0) & (yi < h) & (xi >= 0) & (xi < w))[:, None]
            sample = imgs[rows, :, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]  # (n, h, w, c)
            out += weight * np.where(inside, np.moveaxis(sample, -1, 1), 0.0)
        imgs = out
    if "noise" in cfg.ops and cfg.noise_std > 0:
        noise = np.stack([r.standard_normal(c * h * w) for r in rngs]).reshape(imgs.shape)
        imgs = imgs + cfg.noise_std * noise
    return imgs.reshape(n, -1).astype(np.float32)


# ---- the stage -------------------------------------------------------------------------------------

def build(cfg: DataConfig, seed: int, paths: RunPaths) -> dict[str, Any]:
    """Read, clean, split and write the data set under `<run>/data/`; returns the statistics."""
    raw, info = read_digits(cfg.limit)
    rows_read = raw.count()

    finite = raw.map_batches(drop_nonfinite).map_batches(add_key).materialize()
    rows_finite = finite.count()
    # A hash shuffle on the row key; one partition per shard keeps the task count sane on small data.
    tagged = (
        finite.groupby("key", num_partitions=max(1, rows_finite // cfg.rows_per_shard))
        .map_groups(first_of_group)
        .map_batches(lambda b: {**b, "split": split_of(b["key"], cfg.split.val, cfg.split.test, seed)})
        .materialize()
    )
    rows = count_splits(tagged.map_batches(split_counts).take_all())
    dropped = {"nan": rows_read - rows_finite, "duplicate": rows_finite - sum(rows.values())}
    log.info("data: read %d rows, dropped %s, split %s", rows_read, dropped, rows)
    for split, count in rows.items():
        if count == 0:
            raise ValueError(f"data: the {split} split is empty; use more rows or a larger data.split.{split}")

    shards = {}
    for split in SPLITS:
        target = paths.path(f"data/{split}")
        tagged.filter(expr=col("split") == split).drop_columns(["split"]).write_parquet(
            target, filesystem=paths.arrow_fs, min_rows_per_file=cfg.rows_per_shard)
        shards[split] = sum(1 for f in paths.fs.ls(target) if f.endswith(".parquet"))

    moments_parts = load_split(paths, "train").map_batches(moments).iter_batches(batch_size=None, batch_format="numpy")
    stats = {
        **info,
        "features": int(np.prod(info["image_shape"])),
        "rows_read": rows_read,
        "rows_dropped": dropped,
        "rows": rows,
        "shards": shards,
        "augmentations": list(cfg.augment.ops),
        "standardize": combine_moments(list(moments_parts), cfg.standardize, info["image_shape"]),
    }
    paths.write_json("data/stats.json", stats)
    return stats


def load_split(paths: RunPaths, split: str) -> ray.data.Dataset:
    """One split of a run's data, streamed from its parquet shards."""
    return ray.data.read_parquet(paths.path(f"data/{split}"), filesystem=paths.arrow_fs,
                                 file_extensions=["parquet"])


def load(paths: RunPaths) -> dict[str, ray.data.Dataset]:
    """The splits a data stage wrote, streamed from their parquet shards."""
    return {split: load_split(paths, split) for split in SPLITS}
