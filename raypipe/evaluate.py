"""Accuracy, latency and size of a model artifact.

Accuracy is batch inference on Ray Data (an actor pool of ONNX Runtime sessions over the test split);
latency is measured in this process, one thread, median per call.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import ray.data

from raypipe.predict import OnnxModel


class _Scorer:
    """A Ray Data actor: loads the model once, counts correct predictions per batch."""

    def __init__(self, model_bytes: bytes):
        self.model = OnnxModel(model_bytes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels, _ = self.model.predict(batch["x"])
        return {"correct": np.array([int((labels == batch["label"]).sum())]), "n": np.array([len(labels)])}


def accuracy(model_bytes: bytes, dataset: ray.data.Dataset) -> float:
    scored = dataset.map_batches(
        _Scorer,
        fn_constructor_kwargs={"model_bytes": model_bytes},
        batch_size=512,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
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
