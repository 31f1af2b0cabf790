"""The edge server: the same V2 REST app on uvicorn and ONNX Runtime, with no Ray and no torch.

`raypipe edge RUN_OR_BUNDLE` verifies its source once (a bundle is pulled into the digest-keyed cache
first), then starts uvicorn with `--workers` processes; each gets the catalog so verified (no manifest is
read again) and loads every model of it, each file checked against its sha256. Requests
that arrive while a model is busy join its next call, so batches form under load and a lone request
never waits.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np

from raypipe.predict import OnnxModel
from raypipe.serving.catalog import Catalog, read_model
from raypipe.serving.rest import MAX_BATCH, Stats, VersionState, make_app

CATALOG_ENV = "RAYPIPE_EDGE_CATALOG"


class CoalescingModel:
    """One model; concurrent requests are joined into one call while the previous call runs."""

    def __init__(self, model: OnnxModel, max_rows: int = MAX_BATCH):
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

    def state(self, model: str, version: str) -> VersionState:
        return VersionState("loaded")  # every version loads when the worker starts, or the worker fails

    def loaded(self) -> list[str]:
        return sorted(f"{model}/{version}" for model, version in self.models)


def create_app():
    """The app for one uvicorn worker, over the catalog its parent process verified."""
    return make_app(EdgeBackend(Catalog.model_validate_json(os.environ[CATALOG_ENV])))


def serve(catalog: Catalog, host: str, port: int, workers: int) -> None:
    """Run uvicorn on a verified catalog (of a local run or a pulled bundle) until Ctrl-C; blocks."""
    import uvicorn

    os.environ[CATALOG_ENV] = catalog.model_dump_json()  # inherited by the workers uvicorn spawns
    uvicorn.run("raypipe.serving.edge:create_app", factory=True, host=host, port=port, workers=workers,
                access_log=False, log_level="warning", timeout_graceful_shutdown=30)
