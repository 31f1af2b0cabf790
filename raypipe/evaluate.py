"""Accuracy, latency and size of a model artifact.

Accuracy is batch inference on Ray Data (tasks running ONNX Runtime over the test split);
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
    """Test accuracy as batch inference: Ray Data tasks, each worker loading the model once. Tasks, not an
    actor pool: Ray Data's pool actors restart, and Ray's core worker reports a restartable actor whose
    constructor arguments sit in the object store as an error, on the terminal, each time."""
    model = ray.put(model_bytes)  # by reference inside a list: fetched once per worker, not per task
    scored = dataset.map_batches(_score, fn_kwargs={"model": [model]}, batch_size=512, num_cpus=0.5)
    correct = n = 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        correct += int(batch["correct"].sum())
        n += int(batch["n"].sum())
    return correct / n


def latency_ms(model_bytes: bytes, sample: np.ndarray, repeats: int) -> dict[str, float]:
    """Median milliseconds per call at batch 1 and 64, after a warm-up call each."""
    model = OnnxModel(model_bytes)
    result = {}
    for size in (1, 64):
        batch = np.resize(sample, (size, sample.shape[1])).astype(np.float32)
        model.logits(batch)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            model.logits(batch)
            times.append((time.perf_counter() - began) * 1000)
        result[f"batch_{size}"] = round(statistics.median(times), 4)
    return result
