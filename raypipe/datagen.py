"""`raypipe datagen`: a synthetic image data set of any size, for benchmarks and large tests.

Each class has its own colour and stripe orientation and frequency; every image adds a random phase,
a small shift and pixel noise, so a model must learn the pattern rather than memorise pixels. `difficulty`
(0 to 1) makes the classes overlap: each image's orientation, frequency and colour wander together towards
a neighbouring class's (past 0.5, an image looks more like its neighbour), the pixel noise grows, and a
share of labels (5% at difficulty 1) is drawn at random. Rows are
generated on Ray Data from their index alone (deterministic for a seed) and written as parquet (an
`image` column of HxWxC uint8 and a `label`) or as PNG files in one sub-folder per class.
"""

from __future__ import annotations

import logging

import numpy as np

from raypipe.config import S3Config
from raypipe.storage import arrow_filesystem, filesystem, strip_scheme

log = logging.getLogger("raypipe")
LABEL_NOISE = 0.05


def _frequency(labels: np.ndarray) -> np.ndarray:
    return 1.5 + 2.5 * (labels % 3) / 2


def synth_images(batch: dict[str, np.ndarray], shape: tuple[int, int, int], classes: int, seed: int,
                 difficulty: float = 0.0):
    """Rows `id` -> {"image": uint8 [n, H, W, C], "label": int64 [n]}, a pure function of (id, seed)."""
    ids = np.asarray(batch["id"], dtype=np.int64)
    height, width, channels = shape
    rng = np.random.default_rng([seed, int(ids[0]) if len(ids) else 0])
    labels = (ids * 7 + seed) % classes
    palette = np.random.default_rng(seed).uniform(0.3, 1.0, size=(classes, channels))
    # Each image's orientation, frequency and colour wander towards one neighbouring class's, together, by up
    # to `difficulty`: at 0.5 of the way a class-k and a class-(k+1) image can be the same picture. Drawn
    # from a generator of their own, so difficulty 0 writes the very images it always did.
    hard = np.random.default_rng([seed, int(ids[0]) if len(ids) else 0, 1])
    wander = difficulty * hard.uniform(-1, 1, size=len(ids))
    neighbour, share = (labels + np.sign(wander).astype(np.int64)) % classes, np.abs(wander)
    angle = np.pi * (labels + wander) / classes
    frequency = (1 - share) * _frequency(labels) + share * _frequency(neighbour)
    phase = rng.uniform(0, 2 * np.pi, len(ids))
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    wave = np.sin(2 * np.pi * frequency[:, None, None]
                  * (xx[None] * np.cos(angle)[:, None, None] + yy[None] * np.sin(angle)[:, None, None])
                  + phase[:, None, None])
    tint = ((1 - share)[:, None] * palette[labels] + share[:, None] * palette[neighbour])[:, None, None, :]
    image = 64 + 96 * tint + 80 * wave[..., None] * tint
    image += rng.normal(0, 20 * (1 + 2 * difficulty), size=image.shape)
    shift = rng.integers(-2, 3, size=(len(ids), 2))
    for i, (dy, dx) in enumerate(shift):
        image[i] = np.roll(image[i], (dy, dx), axis=(0, 1))
    noisy = hard.uniform(size=len(ids)) < LABEL_NOISE * difficulty
    labels = np.where(noisy, hard.integers(0, classes, size=len(ids)), labels)
    return {"image": np.clip(image, 0, 255).astype(np.uint8), "label": labels}


def generate(out: str, rows: int, shape: tuple[int, int, int] = (32, 32, 3), classes: int = 10,
             fmt: str = "parquet", seed: int = 0, rows_per_file: int = 10_000, s3: S3Config | None = None,
             difficulty: float = 0.0) -> None:
    """Write `rows` synthetic images under `out` (a local folder or s3:// URI)."""
    import ray.data
    from ray.data.expressions import col

    fs = arrow_filesystem(filesystem(out, s3))
    target = strip_scheme(out)
    ds = ray.data.range(rows, override_num_blocks=max(1, min(64, rows // 2000))).map_batches(
        synth_images, fn_kwargs={"shape": shape, "classes": classes, "seed": seed, "difficulty": difficulty},
        batch_size=2000)
    if fmt == "parquet":
        ds.write_parquet(target, filesystem=fs, min_rows_per_file=rows_per_file, max_rows_per_file=rows_per_file)
    else:
        ds = ds.materialize()
        for label in range(classes):
            ds.filter(expr=col("label") == label).write_images(
                f"{target}/class_{label}", column="image", file_format="png", filesystem=fs)
    log.info("datagen: wrote %d %s images (%dx%dx%d, %d classes, difficulty %g) to %s", rows, fmt, *shape, classes,
             difficulty, out)
