"""The Ray Serve application: one autoscaling ingress deployment that runs the models itself.

`build_app(args)` is the typed builder behind `raypipe serve`, `serve run raypipe.serving.app:build_app`
and the files in serve/. Each replica runs the V2 FastAPI app and calls the model in-process (one hop: no
second deployment per request). Each replica loads the promoted versions when it starts and others on
the first request that needs them (an LRU of `serve.max_models_per_replica`), so many small models share
a few replicas; a request waits for its model's load before it joins a batch, so a slow or failing load
holds only that version's requests. `@serve.batch` with no wait joins requests that are already queued
into one model call (at most `serve.max_batch_size` requests and MAX_ROWS rows), so batches form only
under load. With the HAProxy ingress (`serve.proxy: haproxy`, set up by the CLI before Ray starts) each
replica serves HTTP on its own port and HAProxy balances across them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from raypipe.config import ConfigError, ServeConfig
from raypipe.predict import OnnxModel
from raypipe.serving import loopback
from raypipe.serving.catalog import Catalog, open_sources, pinned, read_model
from raypipe.serving.rest import MAX_BATCH, ModelUnavailable, Stats, VersionState, make_app

# What `serve.proxy` turns on. Ray reads these once, at import, in every Ray process: they must be in the
# environment before the head (or the embedded Ray) starts.
PROXY_ENV = {
    "haproxy": {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",           # HAProxy on the HTTP port, balancing replicas' own servers
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",      # user code on the replica's loop, buffered logs, frozen GC
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",   # no per-request log datagram parsed in Python
        # One buffer holds a whole request up to 64 KiB (a 32x32x3 image as JSON is ~15 KiB); at the
        # default 16 KiB such a request crossed HAProxy in pieces, ~1 ms slower.
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "65536",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",  # default 30 s, sized for remote HAProxies
    },
    "default": {},
}


log = logging.getLogger("raypipe")
INLINE_ROWS = 64  # model calls up to this many rows run on the replica's loop; larger ones in a thread
MAX_ROWS = MAX_BATCH  # rows of one model call: a batch never holds more than one largest request does
RETRY_S = 5.0  # a failed load is not tried again for this long: its requests get a 503 at once


class Models:
    """The versions one replica holds: an LRU of `capacity`, each loaded (read, sha256-checked, opened)
    in a thread on first use. Loads of different versions run side by side, requests for a version
    being loaded wait for that one load, and a failed load is remembered for `retry_s`: its requests get
    a 503 at once instead of reading and hashing the file again."""

    def __init__(self, catalog: Catalog, capacity: int, retry_s: float = RETRY_S,
                 load: Callable[[Any], Any] | None = None):
        self.catalog, self.capacity, self.retry_s = catalog, capacity, retry_s
        self._load = load or (lambda spec: OnnxModel(read_model(spec)))
        self._held: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self._failed: dict[tuple[str, str], tuple[str, float]] = {}  # reason, monotonic time of the retry

    def preload(self, keys: list[tuple[str, str]]) -> None:
        """Load these versions now, blocking (at replica start), as many as the LRU holds."""
        for model, version in keys[:self.capacity]:
            try:
                self._hold((model, version), self._load(self.catalog.models[model].versions[version]))
            except Exception as err:
                self._fail((model, version), err)

    async def get(self, model: str, version: str) -> Any:
        """The loaded version, or ModelUnavailable (a 503) when it cannot be loaded now."""
        key = (model, version)
        held = self._held.get(key)
        if held is not None:
            self._held.move_to_end(key)
            return held
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() < failed[1]:
            raise self._unavailable(key)
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.ensure_future(self._load_async(key))
            loading.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved: no warning
        return await asyncio.shield(loading)  # a client that goes away does not cancel the load

    async def _load_async(self, key: tuple[str, str]) -> Any:
        try:
            loaded = await asyncio.to_thread(self._load, self.catalog.models[key[0]].versions[key[1]])
        except Exception as err:
            self._fail(key, err)
            raise self._unavailable(key) from None
        finally:
            del self._loading[key]
        return self._hold(key, loaded)

    def _hold(self, key: tuple[str, str], loaded: Any) -> Any:
        self._failed.pop(key, None)
        self._held[key] = loaded
        while len(self._held) > self.capacity:  # batches running on an evicted model keep their reference
            self._held.popitem(last=False)
        return loaded

    def _fail(self, key: tuple[str, str], err: Exception) -> None:
        log.error("loading %s/%s failed: %s", *key, err)
        # The client sees the kind of failure, not storage paths: the log has the whole message.
        reason = ("its model file is missing or no longer matches its verified sha256"
                  if isinstance(err, ConfigError) else f"loading failed ({type(err).__name__})")
        self._failed[key] = (reason, time.monotonic() + self.retry_s)

    def _unavailable(self, key: tuple[str, str]) -> ModelUnavailable:
        reason, retry_at = self._failed[key]
        return ModelUnavailable(f"version {key[1]!r} of {key[0]!r} cannot be loaded now: {reason}; "
                                f"retried after {max(retry_at - time.monotonic(), 0):.1f} s")

    def state(self, model: str, version: str) -> VersionState:
        key = (model, version)
        if key in self._held:
            return VersionState("loaded")
        if key in self._loading:
            return VersionState("loading")
        failed = self._failed.get(key)  # until a load succeeds: only the retry gate expires
        if failed is not None:
            return VersionState("failed", failed[0], round(max(failed[1] - time.monotonic(), 0), 1))
        return VersionState("available")

    def loaded(self) -> list[str]:
        return sorted(f"{model}/{version}" for model, version in self._held)


def batch_size(requests: list[tuple[Any, ...]]) -> int:
    """Serve's size of a batch (`batch_size_fn`): its number of requests, until their rows pass MAX_ROWS;
    then more than any `max_batch_size`, so Serve keeps the last request for the next batch."""
    return len(requests) if sum(len(request[-1]) for request in requests) <= MAX_ROWS else sys.maxsize


async def predict_batch(requests: list[tuple[str, str, Any, np.ndarray]],
                        on_call: Callable[[str, str, int], None]) -> list[Any]:
    """Each request's (labels, probabilities), in order, from one model call per version in the batch;
    a version whose call fails answers its requests with the exception, the others go on. A request is
    (model, version, loaded model, rows); `on_call(model, version, ns)` counts each call."""
    results: list[Any] = [None] * len(requests)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (model, version, _, _) in enumerate(requests):
        groups.setdefault((model, version), []).append(i)
    for (model, version), indexes in groups.items():
        start = time.perf_counter_ns()
        loaded = requests[indexes[0]][2]
        x = requests[indexes[0]][3] if len(indexes) == 1 else np.concatenate([requests[i][3] for i in indexes])
        try:
            if len(x) <= INLINE_ROWS:  # small: a thread hop would cost more than the call
                labels, probabilities = loaded.predict(x)
            else:  # in a thread: ONNX Runtime releases the GIL, so the loop keeps reading requests
                labels, probabilities = await asyncio.to_thread(loaded.predict, x)
        except Exception as err:  # this version's requests fail alone; the batch's others go on
            for i in indexes:
                results[i] = err
            continue
        on_call(model, version, time.perf_counter_ns() - start)
        offset = 0
        for i in indexes:
            rows = len(requests[i][3])
            results[i] = (labels[offset:offset + rows], probabilities[offset:offset + rows])
            offset += rows
    return results


class ServeArgs(BaseModel):
    """Arguments of the application builder (the `args` of a serve/*.yaml application)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1, description="Sealed runs or bundles to serve (local paths or "
                                                         "s3:// URIs); each model under its config `name`.")
    variants: list[str] | None = Field(None, description="Serve only these variants (e.g. [int8]); "
                                                         "default: every accepted one.")
    digests: dict[str, str] = Field(
        default_factory=dict, description="Pins, by source as written in `sources`: the `sha256:...` of a bundle's "
                                          "bundle.json (what `raypipe export` prints) or of a run's MANIFEST.json. "
                                          "A pinned source whose manifest differs is refused.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Replicas, batching and placement.")

    @model_validator(mode="after")
    def _pins(self) -> ServeArgs:
        for source, digest in self.digests.items():
            if source not in self.sources:
                raise ValueError(f"digests.{source}: not one of the sources")
            pinned(digest, f"digests.{source}")
        return self


@serve.deployment(logging_config={"enable_access_log": False})
@serve.ingress()
class InferenceServer:
    """The HTTP entry point and the models, in one replica."""

    def __init__(self, catalog: Catalog, max_batch_size: int, batch_wait_s: float, max_models: int):
        if os.environ.get(loopback.LOOPBACK_ENV) == "1":  # an embedded Ray: nothing off this machine calls in
            loopback.bind_replica_grpc_to_loopback()
        self.catalog = catalog
        self.stats = Stats()
        self._predict.set_max_batch_size(max_batch_size)
        self._predict.set_batch_wait_timeout_s(batch_wait_s)
        self.models = Models(catalog, max_models)
        # Before the replica takes traffic: /v2/health/ready then says whether they load here.
        self.models.preload([(name, spec.promoted) for name, spec in catalog.models.items()])
        self._app = make_app(self, serve.get_replica_context().replica_id.unique_id)

    def __serve_build_asgi_app__(self):
        return self._app

    async def infer(self, model: str, version: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The load is awaited here, outside the batch, so a slow or failing load holds only its own requests.
        loaded = await self.models.get(model, version)
        result = await self._predict((model, version, loaded, x))
        if isinstance(result, Exception):
            log.error("serving %s/%s failed: %s", model, version, result)
            raise ModelUnavailable(f"version {version!r} of {model!r} cannot be run now; see the server log")
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, batch_size_fn=batch_size)
    async def _predict(self, requests: list[tuple[str, str, Any, np.ndarray]]) -> list[Any]:
        return await predict_batch(requests, self.stats.execution)

    def loaded(self) -> list[str]:
        return self.models.loaded()

    def state(self, model: str, version: str) -> VersionState:
        state = self.models.state(model, version)
        if state.state == "failed" and state.retry_in_s == 0 and version == self.catalog.models[model].promoted:
            # A promoted version stays failed (and the replica not ready) until a load succeeds; a balancer
            # that holds traffic back from an unready replica would never send the request that retries
            # it, so readiness probes retry it themselves, at most once per retry period.
            task = asyncio.ensure_future(self.models.get(model, version))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return state


def build_app(args: ServeArgs | dict) -> Application:
    """The application serving every chosen variant of the sources.

    `serve run`/`serve deploy` pass the config file's `args` as a dict; it is validated here, and the
    sources are verified here, once, before any replica starts (against their `digests` where pinned).
    S3 settings reach the replicas through their own environment (AWS_* variables), never through these
    arguments, which Ray shows to anyone who can read the deployed config."""
    args = ServeArgs.model_validate(args) if isinstance(args, dict) else args
    # Replicas get this catalog, built from the checked bytes of each manifest, and read no manifest again.
    return deployment(open_sources(args.sources, args.variants, args.digests), args.serve)


def deployment(catalog: Catalog, cfg: ServeConfig) -> Application:
    """The application for a catalog already opened (and verified)."""
    resources = {cfg.node_resource: 0.01} if cfg.node_resource else {}
    actor_options = {"num_cpus": cfg.cpus_per_replica, "resources": resources}
    if cfg.memory_mb:
        actor_options["memory"] = cfg.memory_mb * 2**20
    return InferenceServer.options(
        name="raypipe",
        max_ongoing_requests=cfg.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "initial_replicas": cfg.min_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
        },
        ray_actor_options=actor_options,
        health_check_period_s=2,
        logging_config={"enable_access_log": cfg.access_log},
    ).bind(catalog, cfg.max_batch_size, cfg.batch_wait_ms / 1000, cfg.max_models_per_replica)


def proxy_env(proxy: str) -> dict[str, str]:
    """The environment `serve.proxy` needs, less what the user set already."""
    return {k: v for k, v in PROXY_ENV[proxy].items() if k not in os.environ}
