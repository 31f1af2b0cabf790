"""The Ray Serve application: one autoscaling ingress deployment that runs the models itself.

`build_app(args)` is the typed builder behind `raypipe serve`, `serve run raypipe.serving.app:build_app`
and the files in serve/. Each replica runs the V2 FastAPI app and calls the model in-process (one hop: no
second deployment per request). Models load lazily, on the replicas that get their traffic, through
Serve's model multiplexing (an LRU of `serve.max_models_per_replica` per replica), so many small models
share a few replicas. `@serve.batch` with no wait joins requests that are already queued into one model
call, so batches form only under load. With the HAProxy ingress (`serve.proxy: haproxy`, set up by the CLI
before Ray starts) each replica serves HTTP on its own port and HAProxy balances across them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from raypipe.config import ServeConfig
from raypipe.predict import OnnxModel
from raypipe.serving.catalog import Catalog, open_sources, read_model
from raypipe.serving.rest import ModelUnavailable, Stats, make_app

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


class ServeArgs(BaseModel):
    """Arguments of the application builder (the `args` of a serve/*.yaml application)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1, description="Sealed runs or bundles to serve (local paths or "
                                                         "s3:// URIs); each model under its config `name`.")
    variants: list[str] | None = Field(None, description="Serve only these variants (e.g. [int8]); "
                                                         "default: every accepted one.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Replicas, batching and placement.")


@serve.deployment(logging_config={"enable_access_log": False})
@serve.ingress()
class InferenceServer:
    """The HTTP entry point and the models, in one replica."""

    def __init__(self, catalog: Catalog, max_batch_size: int, batch_wait_s: float, max_models: int):
        self.catalog = catalog
        self.stats = Stats()
        self._predict.set_max_batch_size(max_batch_size)
        self._predict.set_batch_wait_timeout_s(batch_wait_s)

        # Models held now, by key: an entry goes when the LRU drops the model (weak references).
        self._loaded: weakref.WeakValueDictionary[str, OnnxModel] = weakref.WeakValueDictionary()

        async def load(key: str) -> OnnxModel:
            model, version = key.split("/", 1)
            blob = await asyncio.to_thread(read_model, catalog.models[model].versions[version])
            self._loaded[key] = loaded = await asyncio.to_thread(OnnxModel, blob)
            return loaded

        # Serve's model multiplexing: loads on first use, evicts the least recently used.
        self._model = serve.multiplexed(max_num_models_per_replica=max_models)(load)
        self._app = make_app(self, serve.get_replica_context().replica_id.unique_id)

    def __serve_build_asgi_app__(self):
        return self._app

    async def infer(self, model: str, version: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = await self._predict((f"{model}/{version}", x))
        if isinstance(result, Exception):
            log.error("serving %s/%s failed: %s", model, version, result)
            raise ModelUnavailable(f"version {version!r} of {model!r} cannot be loaded or run now; see the server log")
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _predict(self, requests: list[tuple[str, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One model call per model in the batch; requests keep their order."""
        results: list = [None] * len(requests)
        for key in dict.fromkeys(key for key, _ in requests):
            indexes = [i for i, (k, _) in enumerate(requests) if k == key]
            start = time.perf_counter_ns()
            x = np.concatenate([requests[i][1] for i in indexes])
            try:
                model = await self._model(key)
                if len(x) <= INLINE_ROWS:  # small: no thread hop (nothing worth overlapping)
                    labels, probabilities = model.predict(x)
                else:  # in a thread: ONNX Runtime releases the GIL, so the loop keeps reading requests
                    labels, probabilities = await asyncio.to_thread(model.predict, x)
            except Exception as err:  # this model's requests fail alone; the batch's others go on
                for i in indexes:
                    results[i] = err
                continue
            self.stats.execution(*key.split("/", 1), time.perf_counter_ns() - start)
            offset = 0
            for i in indexes:
                rows = len(requests[i][1])
                results[i] = (labels[offset:offset + rows], probabilities[offset:offset + rows])
                offset += rows
        return results

    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    async def version_ready(self, model: str, version: str) -> bool:
        try:
            await self._model(f"{model}/{version}")
            return True
        except Exception:
            return False


def build_app(args: ServeArgs | dict) -> Application:
    """The application serving every chosen variant of the sources.

    `serve run`/`serve deploy` pass the config file's `args` as a dict; it is validated here, and the
    sources are verified here, once, before any replica starts. S3 settings reach the replicas through
    their own environment (AWS_* variables), never through these arguments, which Ray shows to anyone
    who can read the deployed config."""
    args = ServeArgs.model_validate(args) if isinstance(args, dict) else args
    return deployment(open_sources(args.sources, args.variants), args.serve)


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
