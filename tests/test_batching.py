"""The Serve replica's batching and model loading, without Ray: the real `@serve.batch` method of
InferenceServer on a plain event loop, and the replica's LRU of loaded versions."""

import asyncio
import threading
import time

import numpy as np
import pytest
from ray.serve import batching

from raypipe.config import ConfigError
from raypipe.serving.app import MAX_ROWS, InferenceServer, Models, batch_size, predict_batch
from raypipe.serving.catalog import Catalog, ModelSpec, VersionSpec
from raypipe.serving.rest import ModelUnavailable, Stats


class RowModel:
    """Answers each row with its own first value as the label (rows carry their identity) and the row
    times `factor` as probabilities; records the rows of every call."""

    def __init__(self, factor: float):
        self.factor, self.calls = factor, []

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(x))
        return x[:, 0].astype(np.int64), x * self.factor


class Broken:
    def predict(self, x):
        raise RuntimeError("onnx runtime failed")


def test_serve_batching_keeps_each_request_with_its_own_rows(monkeypatch):
    # Outside a replica there is no deployment config to warn about; the rest of the queue is Serve's own.
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    cls = InferenceServer.func_or_class
    server = cls.__new__(cls)  # the batch method needs only the counters
    server.stats = Stats()
    models = {("a", "fp32"): RowModel(2.0), ("a", "int8"): RowModel(3.0), ("b", "fp32"): RowModel(5.0)}
    sizes = [1, 70, 3, 4000, 2, 129, 1, 64, 3000, 5, 1, 2500, 7]
    keys = [list(models)[i % 3] for i in range(len(sizes))]
    next_id, requests = 0, []
    for size in sizes:  # every row distinct: its first value is a global row id
        x = np.arange(next_id, next_id + size, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
        requests.append(x)
        next_id += size

    async def run():
        return await asyncio.gather(*(server._predict((*key, models[key], x)) for key, x in zip(keys, requests)))

    results = asyncio.run(run())
    for key, x, (labels, probabilities) in zip(keys, requests, results):
        assert np.array_equal(labels, x[:, 0].astype(np.int64))
        assert np.array_equal(probabilities, x * models[key].factor)
    calls = [rows for model in models.values() for rows in model.calls]
    assert sum(calls) == sum(sizes) and max(calls) <= MAX_ROWS
    assert len(calls) < len(sizes)  # requests queued together were joined


def test_a_failing_version_fails_only_its_own_requests():
    good = RowModel(1.0)
    x = [np.full((n, 2), float(i), dtype=np.float32) for i, n in enumerate([2, 3, 1])]
    calls = []
    results = asyncio.run(predict_batch(
        [("m", "v1", good, x[0]), ("m", "v2", Broken(), x[1]), ("m", "v1", good, x[2])],
        lambda model, version, ns: calls.append((model, version))))
    assert isinstance(results[1], RuntimeError)
    assert np.array_equal(results[0][0], [0, 0]) and np.array_equal(results[2][0], [2])
    assert calls == [("m", "v1")] and good.calls == [3]


def test_batch_size_counts_requests_until_the_rows_pass_the_limit():
    rows = lambda *sizes: [("m", "v", None, np.zeros((n, 1))) for n in sizes]  # noqa: E731
    assert batch_size(rows(1, 2, 3)) == 3
    assert batch_size(rows(MAX_ROWS - 1, 1)) == 2
    assert batch_size(rows(MAX_ROWS - 1, 2)) > 10**9


def _catalog() -> Catalog:
    versions = {v: VersionSpec(uri=f"/nowhere/{v}", sha256="0" * 64, size_bytes=1, test_accuracy=0.9)
                for v in ("v1", "v2", "v3")}
    return Catalog.combine([ModelSpec(name="m", promoted="v1", features=2, classes=2, source="/nowhere",
                                      versions=versions)])


def test_a_failed_load_is_remembered_then_retried():
    attempts = []

    def load(spec):
        attempts.append(spec)
        raise ConfigError("/nowhere: sha256 does not match the recorded digest")

    models = Models(_catalog(), capacity=2, retry_s=0.3, load=load)
    assert models.state("m", "v1").state == "available"

    async def get():
        with pytest.raises(ModelUnavailable) as err:
            await models.get("m", "v1")
        return err.value

    err = asyncio.run(get())
    assert err.status_code == 503 and "'v1' of 'm' cannot be loaded now: its model file is missing" in err.detail
    assert "/nowhere" not in err.detail  # storage paths stay in the server log
    asyncio.run(get())
    assert len(attempts) == 1  # the second request did not read and hash the file again
    state = models.state("m", "v1")
    assert state.state == "failed" and not state.ready and 0 < state.retry_in_s <= 0.3
    time.sleep(0.35)
    # Still failed (readiness stays 503) until a load succeeds; only the retry gate has opened.
    assert models.state("m", "v1").state == "failed" and models.state("m", "v1").retry_in_s == 0
    asyncio.run(get())
    assert len(attempts) == 2


def test_readiness_retries_a_failed_promoted_version_once_its_retry_period_ends():
    """A replica whose promoted version failed stays unready until a load succeeds; the readiness probe
    itself retries (at most once per period), so a balancer that holds traffic back still sees it heal."""
    broken = {"v": True}
    attempts = []

    def load(spec):
        attempts.append(spec)
        if broken["v"]:
            raise ConfigError("/nowhere: sha256 does not match the recorded digest")
        return "model"

    cls = InferenceServer.func_or_class
    server = cls.__new__(cls)
    server.catalog = _catalog()
    server.models = Models(server.catalog, capacity=2, retry_s=0.2, load=load)

    async def scenario():
        with pytest.raises(ModelUnavailable):
            await server.models.get("m", "v1")
        assert server.state("m", "v1").state == "failed" and len(attempts) == 1  # gate closed: no retry
        await asyncio.sleep(0.25)
        broken["v"] = False  # the file is good again
        assert server.state("m", "v1").state == "failed"  # this probe starts the retry...
        await asyncio.sleep(0.05)
        assert server.state("m", "v1").state == "loaded" and len(attempts) == 2  # ...and the next sees it
        assert server.state("m", "v2").state == "available"  # other versions are never loaded by probes

    asyncio.run(scenario())


def test_a_slow_load_holds_only_its_own_version():
    release = threading.Event()

    def load(spec):
        if spec.uri.endswith("v1"):
            release.wait(10)
        return object()

    models = Models(_catalog(), capacity=2, load=load)

    async def run():
        waiting = [asyncio.create_task(models.get("m", "v1")) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert models.state("m", "v1").state == "loading"
        fast = await asyncio.wait_for(models.get("m", "v2"), 5)  # not behind v1's load
        assert not any(task.done() for task in waiting)
        release.set()
        slow = await asyncio.gather(*waiting)
        assert slow[0] is slow[1] is slow[2] and fast is not slow[0]  # one load shared by its waiters
        await models.get("m", "v3")  # the LRU holds two: v2, the least recently used, goes

    asyncio.run(run())
    assert models.loaded() == ["m/v1", "m/v3"]
    assert [models.state("m", v).state for v in ("v1", "v2", "v3")] == ["loaded", "available", "loaded"]
