"""The edge server: the same V2 REST app on uvicorn and ONNX Runtime, with no Ray and no torch.

`raypipe edge RUN_OR_BUNDLE` verifies its source once (a bundle is pulled into the digest-keyed cache
first), then starts uvicorn with `--workers` processes; each loads every model of the catalog. Requests
that arrive while a model is busy join its next call, so batches form under load and a lone request
never waits.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np

from raypipe.predict import OnnxModel
from raypipe.serving.catalog import Catalog, open_sources, read_model
from raypipe.serving.rest import Stats, make_app

SOURCE_ENV = "RAYPIPE_EDGE_SOURCE"
VARIANTS_ENV = "RAYPIPE_EDGE_VARIANTS"


class CoalescingModel:
    """One model; concurrent requests are joined into one call while the previous call runs."""

    def __init__(self, model: OnnxModel, max_rows: int = 4096):
        self.model, self.max_rows = model, max_rows
        self.pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self.busy, self._drainer = False, None

    async def predict(self, x: np.ndarray, on_call) -> tuple[np.ndarray, np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((x, future))
        if not self.busy:
            self.busy = True
            self._drainer = asyncio.create_task(self._drain(on_call))  # held: a bare task may be collected
        return await future

    async def _drain(self, on_call) -> None:
        try:
            while self.pending:
                batch, rows = [], 0
                while self.pending and (not batch or rows + len(self.pending[0][0]) <= self.max_rows):
                    batch.append(self.pending.pop(0))
                    rows += len(batch[-1][0])
                start = time.perf_counter_ns()
                try:
                    # In a thread: ONNX Runtime releases the GIL, so the loop keeps reading requests.
                    labels, probabilities = await asyncio.to_thread(
                        self.model.predict, np.concatenate([x for x, _ in batch]))
                except Exception as err:
                    for _, future in batch:
                        if not future.done():  # a request whose client went away is cancelled
                            future.set_exception(err)
                    continue
                on_call(time.perf_counter_ns() - start)
                offset = 0
                for x, future in batch:
                    if not future.done():
                        future.set_result((labels[offset:offset + len(x)], probabilities[offset:offset + len(x)]))
                    offset += len(x)
        finally:
            self.busy = False


class EdgeBackend:
    """Every model of the catalog, loaded in this process."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.stats = Stats()
        self.models = {(name, version): CoalescingModel(OnnxModel(read_model(spec)))
                       for name, model in catalog.models.items() for version, spec in model.versions.items()}

    async def infer(self, model: str, version: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return await self.models[model, version].predict(
            x, lambda ns: self.stats.execution(model, version, ns))

    async def version_ready(self, model: str, version: str) -> bool:
        return (model, version) in self.models

    def loaded(self) -> list[str]:
        return sorted(f"{model}/{version}" for model, version in self.models)


def create_app():
    """The app for one uvicorn worker, from the verified source the parent process named."""
    variants = os.environ.get(VARIANTS_ENV)
    catalog = open_sources([os.environ[SOURCE_ENV]], variants.split(",") if variants else None)
    return make_app(EdgeBackend(catalog))


def serve(source: str, host: str, port: int, workers: int, variants: list[str] | None) -> None:
    """Run uvicorn on `source` (a local run or a pulled bundle) until Ctrl-C; blocks."""
    import uvicorn

    os.environ[SOURCE_ENV] = source
    os.environ[VARIANTS_ENV] = ",".join(variants or [])
    uvicorn.run("raypipe.serving.edge:create_app", factory=True, host=host, port=port, workers=workers,
                access_log=False, log_level="warning", timeout_graceful_shutdown=30)
