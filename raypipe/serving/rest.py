"""The REST API: the Open Inference Protocol (KServe V2) over HTTP, as one FastAPI app.

`make_app(backend)` builds the routes over any backend that can predict by version: Ray Serve's ingress
(raypipe.serving.app) passes itself, with model replicas behind it; the edge server passes a local model.
Every error is JSON `{"error": ...}` with the exact status; nothing a client sends yields a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from raypipe.storage import RunPaths

log = logging.getLogger("raypipe")

MAX_BATCH = 4096
INPUT_NAME = "input"
OUTPUTS = ("label", "probabilities")


# ---- the protocol's request body --------------------------------------------------------------------

class RequestInput(BaseModel):
    name: str = Field(description="Input tensor name, as the model metadata declares it.")
    shape: list[int] = Field(description="Tensor shape, e.g. [N, 64].")
    datatype: str = Field(description="Tensor datatype, e.g. FP32.")
    parameters: dict[str, Any] | None = Field(None, description="Optional per-input parameters.")
    data: list[Any] = Field(description="Tensor values, flat or nested in row-major order.")


class RequestOutput(BaseModel):
    name: str = Field(description="Output tensor to return: label or probabilities.")
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(None, description="Optional request parameters.")
    inputs: list[RequestInput] = Field(min_length=1, description="Exactly one input tensor.")
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return (default: all).")


# ---- what is served ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Catalog:
    """A run's servable models: accepted variants only, one version each."""

    name: str
    promoted: str
    features: int
    classes: int
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_run(cls, paths: RunPaths) -> Catalog:
        report = paths.read_json("report.json")
        stats = paths.read_json("data/stats.json")
        versions = {v["name"]: v for v in report["variants"] if v["accepted"]}
        return cls(report["config"]["name"], report["promoted"], stats["features"], stats["num_classes"], versions)

    def metadata(self, version: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, self.features]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, self.classes]},
            ],
            "parameters": {"version": version, "promoted": self.promoted,
                           "test_accuracy": self.versions[version]["test_accuracy"]},
        }


class Backend(Protocol):
    catalog: Catalog

    async def infer(self, version: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    async def version_ready(self, version: str) -> bool: ...


class LocalBackend:
    """Models in this process: for the edge server and for tests of the routes."""

    def __init__(self, catalog: Catalog, models: dict[str, Any]):
        self.catalog = catalog
        self.models = models

    async def infer(self, version: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.models[version].predict(x)

    async def version_ready(self, version: str) -> bool:
        return version in self.models


class BadRequest(HTTPException):
    def __init__(self, message: str):
        super().__init__(status_code=400, detail=message)


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def decode(request: InferenceRequest, features: int) -> np.ndarray:
    """The request's input as float32 [N, features], or BadRequest saying what is wrong."""
    if len(request.inputs) != 1:
        raise BadRequest(f"expected exactly one input tensor named {INPUT_NAME!r}, got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise BadRequest(f"unknown input {tensor.name!r}: the model's input is {INPUT_NAME!r}")
    if tensor.datatype != "FP32":
        raise BadRequest(f"input {INPUT_NAME!r} has datatype {tensor.datatype!r}; expected 'FP32'")
    if len(tensor.shape) != 2 or tensor.shape[1] != features or tensor.shape[0] < 1:
        raise BadRequest(f"input {INPUT_NAME!r} has shape {tensor.shape}; expected [N, {features}] with N >= 1")
    if tensor.shape[0] > MAX_BATCH:
        raise BadRequest(f"batch of {tensor.shape[0]} rows exceeds the limit of {MAX_BATCH}")
    values = _flatten(tensor.data)
    if len(values) != tensor.shape[0] * features:
        raise BadRequest(f"input {INPUT_NAME!r} holds {len(values)} values; shape {tensor.shape} needs "
                         f"{tensor.shape[0] * features}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise BadRequest(f"input {INPUT_NAME!r} must hold finite numbers only")
    return np.asarray(values, dtype=np.float32).reshape(tensor.shape)


def encode(request: InferenceRequest, catalog: Catalog, version: str, labels: np.ndarray,
           probabilities: np.ndarray) -> dict[str, Any]:
    tensors = {
        "label": {"name": "label", "datatype": "INT64", "shape": [len(labels)], "data": labels.tolist()},
        "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": list(probabilities.shape),
                          "data": probabilities.ravel().tolist()},
    }
    wanted = [o.name for o in request.outputs] if request.outputs else list(OUTPUTS)
    unknown = [name for name in wanted if name not in tensors]
    if unknown:
        raise BadRequest(f"unknown output {unknown[0]!r}: the model's outputs are {list(OUTPUTS)}")
    body = {"model_name": catalog.name, "model_version": version, "outputs": [tensors[n] for n in wanted]}
    if request.id is not None:
        body["id"] = request.id
    return body


# ---- the app ---------------------------------------------------------------------------------------

def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _openapi_with_body(app: FastAPI) -> None:
    """Document the infer body, which the routes parse themselves (so 404 comes before 400)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        body = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["InferenceRequest"] = body
        return schema

    app.openapi = openapi


def make_app(backend: Backend) -> FastAPI:
    app = FastAPI(
        title="raypipe inference",
        description="The Open Inference Protocol (KServe V2) over REST. Inputs are raw values; "
                    "standardization happens server-side.",
        version="2",
    )
    catalog = backend.catalog
    infer_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/InferenceRequest"}}}}}

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(400, _first_error(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal error")

    def version_of(model: str, version: str | None) -> str:
        if model != catalog.name:
            raise HTTPException(404, f"unknown model {model!r}; this server has {catalog.name!r}")
        version = version or catalog.promoted
        if version not in catalog.versions:
            raise HTTPException(404, f"unknown version {version!r} of {model!r}; served: {list(catalog.versions)}")
        return version

    @app.get("/v2/health/live", summary="Liveness")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness: every served version loaded")
    async def ready():
        states = await asyncio.gather(*(backend.version_ready(v) for v in catalog.versions))
        waiting = [v for v, ok in zip(catalog.versions, states) if not ok]
        if waiting:
            raise HTTPException(503, f"not ready: {waiting}")
        return {"ready": True}

    @app.get("/v2", summary="Server metadata")
    async def server_metadata():
        return {"name": "raypipe", "version": _version(), "extensions": []}

    @app.get("/v2/models/{model}", summary="Model metadata (promoted version)")
    @app.get("/v2/models/{model}/versions/{version}", summary="Model metadata")
    async def model_metadata(model: str, version: str | None = None):
        return catalog.metadata(version_of(model, version))

    @app.get("/v2/models/{model}/ready", summary="Model readiness (promoted version)")
    @app.get("/v2/models/{model}/versions/{version}/ready", summary="Model readiness")
    async def model_ready(model: str, version: str | None = None):
        version = version_of(model, version)
        if not await backend.version_ready(version):
            raise HTTPException(503, f"version {version!r} is not ready")
        return {"name": model, "ready": True}

    @app.post("/v2/models/{model}/infer", summary="Infer (promoted version)", openapi_extra=infer_body)
    @app.post("/v2/models/{model}/versions/{version}/infer", summary="Infer", openapi_extra=infer_body)
    async def infer(model: str, request: Request, version: str | None = None):
        version = version_of(model, version)
        try:
            body = InferenceRequest.model_validate_json(await request.body())
        except ValidationError as err:
            raise BadRequest(_first_error(err.errors())) from None
        x = decode(body, catalog.features)
        labels, probabilities = await backend.infer(version, x)
        return encode(body, catalog, version, labels, probabilities)

    _openapi_with_body(app)
    return app


def _first_error(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON"
    return f"{where}: {first['msg']}" if where else first["msg"]


def _version() -> str:
    from importlib.metadata import version

    return version("raypipe")
