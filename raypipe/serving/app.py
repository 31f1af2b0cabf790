"""The Ray Serve application: a FastAPI ingress in front of one autoscaling deployment per variant.

`build_app(args)` is the typed builder that `raypipe serve`, `serve run raypipe.serving.app:build_app run=URI`
and the files in serve/ all use. Models load in each replica's `__init__`; Serve balances requests
across replicas (power of two choices) and scales them between serve.min_replicas and max_replicas.
"""

from __future__ import annotations

import asyncio

import numpy as np
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from raypipe.config import ConfigError, S3Config, ServeConfig
from raypipe.predict import OnnxModel
from raypipe.serving.rest import Catalog, make_app
from raypipe.storage import RunPaths, sha256_bytes


class ServeArgs(BaseModel):
    """Arguments of the application builder."""

    run: str = Field(description="The run to serve: a local folder or s3:// URI printed by `raypipe run`.")
    s3: S3Config = Field(default_factory=S3Config, description="S3 settings when the run is on s3://.")
    scaling: ServeConfig | None = Field(None, description="Replica settings; default: the run's serve config.")


@serve.deployment
class ModelReplica:
    """One variant's ONNX Runtime session."""

    def __init__(self, run: str, s3: S3Config, variant: str, sha256: str):
        paths = RunPaths.open(run, s3)
        blob = paths.read_bytes(f"models/{variant}/model.onnx")
        if sha256_bytes(blob) != sha256:
            raise RuntimeError(f"models/{variant}/model.onnx does not match its recorded sha256")
        self.model = OnnxModel(blob)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict(x)

    def ready(self) -> bool:
        return True


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP entry point: routes V2 requests to the variant's replicas."""

    def __init__(self, catalog: Catalog, replicas: dict[str, DeploymentHandle]):
        self.catalog = catalog
        self.replicas = replicas

    def __serve_build_asgi_app__(self):
        return make_app(self)

    async def infer(self, version: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return await self.replicas[version].predict.remote(x)

    async def version_ready(self, version: str) -> bool:
        try:
            return await asyncio.wait_for(self.replicas[version].ready.remote(), timeout=2)
        except Exception:
            return False


def open_verified(run: str, s3: S3Config | None = None) -> RunPaths:
    """The run, if its MANIFEST.json exists and matches its files; ConfigError otherwise."""
    paths = RunPaths.open(run, s3)
    problems = paths.verify()
    if problems:
        raise ConfigError(f"{run}: refusing to serve: {problems[0]}" +
                          (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return paths


def build_app(args: ServeArgs | dict) -> Application:
    """The application serving every accepted variant of a sealed run.

    `serve run`/`serve deploy` pass the config file's `args` as a dict; it is validated here."""
    args = ServeArgs.model_validate(args) if isinstance(args, dict) else args
    paths = open_verified(args.run, args.s3)
    catalog = Catalog.from_run(paths)
    scaling = args.scaling or ServeConfig.model_validate(paths.read_json("report.json")["config"]["serve"])
    autoscaling = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": scaling.min_replicas,
        "target_ongoing_requests": scaling.target_ongoing_requests,
    }
    replicas = {
        version: ModelReplica.options(
            name=f"{catalog.name}-{version}",
            autoscaling_config=autoscaling,
            ray_actor_options={"num_cpus": scaling.cpus_per_replica},
        ).bind(paths.uri, args.s3, version, meta["sha256"])
        for version, meta in catalog.versions.items()
    }
    return Ingress.options(ray_actor_options={"num_cpus": scaling.cpus_per_replica}).bind(catalog, replicas)
