"""Accuracy, latency and size of a model artifact.

Accuracy is batch inference on Ray Data (tasks running ONNX Runtime over a split: validation, test);
latency is measured in this process, one thread, median per call.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import ray.data

from raypipe.predict import OnnxModel


_MODELS: dict[str, OnnxModel] = {}  # per worker process, by object ID: loaded once, reused by later tasks


def _score(batch: dict[str, np.ndarray], model: list[ray.ObjectRef]) -> dict[str, np.ndarray]:
    """Correct predictions in one batch (a Ray Data task)."""
    key = model[0].hex()
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = OnnxModel(ray.get(model[0]))
    labels, _ = _MODELS[key].predict(batch["x"])
    return {"correct": np.array([int((labels == batch["label"]).sum())]), "n": np.array([len(labels)])}


def accuracy(model_bytes: bytes, dataset: ray.data.Dataset) -> float:
    """Accuracy on a split as batch inference: Ray Data tasks, each worker loading the model once. Tasks, not an
    actor pool: Ray Data's pool actors restart, and Ray's core worker reports a restartable actor whose
    constructor arguments sit in the object store as an error, on the terminal, each time."""
    model = ray.put(model_bytes)  # by reference inside a list: fetched once per worker, not per task
    scored = dataset.map_batches(_score, fn_kwargs={"model": [model]}, batch_size=512, num_cpus=0.5)
    correct = n = 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        correct += int(batch["correct"].sum())
        n += int(batch["n"].sum())
    return correct / n


def latencies(blobs: dict[str, bytes], sample: np.ndarray, repeats: int, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Milliseconds per call of each model at batch 1 and 64, timed in interleaved rounds: in every round
    each model runs `repeats / rounds` calls in turn, so a burst of load on a shared machine lands on all of
    them alike. A figure is the median of the round medians; `batch_64_spread` is their interquartile range
    over that median, the noise a comparison of two models must clear."""
    models = {name: OnnxModel(blob) for name, blob in blobs.items()}
    per_round = max(1, repeats // rounds)
    medians: dict[tuple[str, int], list[float]] = {(name, size): [] for name in models for size in (1, 64)}
    batches = {size: np.resize(sample, (size, sample.shape[1])).astype(np.float32) for size in (1, 64)}
    for model in models.values():  # warm-up: first calls allocate
        for batch in batches.values():
            model.logits(batch)
    for _ in range(rounds):
        for name, model in models.items():
            for size, batch in batches.items():
                times = []
                for _ in range(per_round):
                    began = time.perf_counter()
                    model.logits(batch)
                    times.append((time.perf_counter() - began) * 1000)
                medians[name, size].append(statistics.median(times))
    result = {}
    for name in models:
        b64 = sorted(medians[name, 64])
        middle = statistics.median(b64)
        q1, _, q3 = statistics.quantiles(b64, n=4) if len(b64) > 1 else (middle, middle, middle)
        result[name] = {"batch_1": round(statistics.median(medians[name, 1]), 4), "batch_64": round(middle, 4),
                        "batch_64_spread": round((q3 - q1) / middle, 4) if middle else 0.0}
    return result
