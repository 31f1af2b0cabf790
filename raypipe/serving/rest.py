"""The REST API: the Open Inference Protocol (KServe V2) over HTTP, as one FastAPI app over any backend.

`make_app(backend)` builds the routes; a backend predicts by (model, version). Ray Serve's ingress replica
(raypipe.serving.app) and the Ray-free edge server (raypipe.serving.edge) both pass themselves. Every
error is JSON `{"error": ...}` with the exact status; nothing a client sends yields a 500. Inputs come as
JSON tensors or, with the binary tensor data extension (as Triton's clients send it), as raw bytes after
the JSON header. A JSON body is bounded by what MAX_BATCH rows can need and by its declared shape before
it is parsed, and one process holds at most MAX_RECEIVING bytes of bodies at once.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Protocol

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raypipe.serving.catalog import Catalog, ModelSpec

log = logging.getLogger("raypipe")

MAX_BATCH = 4096
MAX_BODY = 64 * 2**20  # bytes: 4,096 rows of 32x32x3 FP32 values as binary tensors take 48 MiB
# A JSON number with its separator and indentation, generously: json.dumps writes a float64 in at most
# 24 characters ("-1.2345678901234567e-05"), and an indented nested body adds a few spaces and a newline.
NUMBER_BYTES = 32
JSON_SLACK = 64 * 2**10  # bytes of a JSON body besides its numbers: names, id, parameters, brackets
MAX_RECEIVING = 4 * MAX_BODY  # bytes of request bodies one process holds at once; more wait for a retry
INPUT_NAME = "input"
OUTPUTS = ("label", "probabilities")
HEADER_LENGTH = "inference-header-content-length"
REPLICA_HEADER = "raypipe-replica"
EXTENSIONS = ["binary_tensor_data", "statistics"]
_OUTPUT_TYPES = {"label": ("INT64", "<i8"), "probabilities": ("FP32", "<f4")}


# ---- the protocol's request body --------------------------------------------------------------------

class RequestInput(BaseModel):
    name: str = Field(description="Input tensor name, as the model metadata declares it.")
    shape: list[StrictInt] = Field(description="Tensor shape, e.g. [N, 64].")
    datatype: str = Field(description="Tensor datatype, e.g. FP32.")
    parameters: dict[str, Any] | None = Field(
        None, description="Optional; `binary_data_size` says the values follow the JSON header as raw bytes.")
    data: list[Any] | None = Field(
        None, description="Tensor values, flat or nested in row-major order (absent for binary data).")


class RequestOutput(BaseModel):
    name: str = Field(description="Output tensor to return: label or probabilities.")
    parameters: dict[str, Any] | None = Field(
        None, description="Optional; `binary_data: true` returns this output as raw bytes.")


class InferenceRequest(BaseModel):
    id: str | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        None, description="Optional; `binary_data_output: true` returns every output as raw bytes.")
    inputs: list[RequestInput] = Field(min_length=1, description="Exactly one input tensor.")
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return (default: all).")


class BadRequest(HTTPException):
    def __init__(self, message: str):
        super().__init__(status_code=400, detail=message)


class ModelUnavailable(HTTPException):
    """The server cannot load the model now (a 503: the client's request was fine)."""

    def __init__(self, message: str):
        super().__init__(status_code=503, detail=message)


def _json_bound(rows: int, features: int) -> int:
    """Bytes a JSON body of `rows` x `features` numbers may take."""
    return rows * features * NUMBER_BYTES + JSON_SLACK


def json_limit(features: int) -> int:
    """The largest JSON infer body a model of `features` inputs accepts: MAX_BATCH rows of numbers."""
    return min(MAX_BODY, _json_bound(MAX_BATCH, features))


_DECLARED_ROWS = re.compile(rb'"shape"\s*:\s*\[\s*(\d{1,9})\s*,')


def check_json_size(body: bytes, features: int) -> None:
    """Refuse a JSON body far larger than its declared shape needs, before it is parsed into Python
    objects (millions of numbers take many times their text's size). Any `"shape": [N, ...]` in the body
    counts, the largest N winning, so a body can only claim more room than it declares, never less
    than the rows it really sends, and never more than MAX_BATCH rows."""
    if len(body) <= _json_bound(1, features):  # room for one row: nothing to check
        return
    declared = [int(rows) for rows in _DECLARED_ROWS.findall(body)]
    if not declared:  # no plain shape to go by: json_limit still bounds the body
        return
    bound = _json_bound(min(max(declared), MAX_BATCH), features)
    # Indentation is not counted: a pretty-printed body is as cheap to parse as a compact one.
    size = len(body) - body.count(b" ") - body.count(b"\n")
    if size > bound:
        raise BadRequest(f"input {INPUT_NAME!r}: a JSON body of {size} bytes (whitespace aside) is larger than "
                         f"shape [{max(declared)}, {features}] can need (at most {bound} bytes)")


def parse(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON part of a request and the binary tail that follows it (empty without the extension).
    Output names and flags are checked here too, before any model runs."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 12
                and 0 < int(header_length) <= len(body)):
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not a length within "
                             f"the body ({len(body)} bytes)")
        body, tail = body[:int(header_length)], body[int(header_length):]
    else:
        tail = b""
    try:
        request = InferenceRequest.model_validate_json(body)
    except ValidationError as err:
        raise BadRequest(_first_error(err.errors())) from None
    names = [out.name for out in request.outputs or []]
    if len(set(names)) != len(names):
        raise BadRequest(f"outputs name one output twice: {names}")
    for out in request.outputs or []:
        if out.name not in OUTPUTS:
            raise BadRequest(f"unknown output {out.name!r}: the model's outputs are {list(OUTPUTS)}")
        if not isinstance((out.parameters or {}).get("binary_data", False), bool):
            raise BadRequest(f"outputs[{out.name!r}].parameters.binary_data must be true or false")
    if not isinstance((request.parameters or {}).get("binary_data_output", False), bool):
        raise BadRequest("parameters.binary_data_output must be true or false")
    return request, tail


def decode(request: InferenceRequest, tail: bytes, features: int) -> np.ndarray:
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
    count = tensor.shape[0] * features
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if binary_size != len(tail) or len(tail) != 4 * count:
            raise BadRequest(f"input {INPUT_NAME!r}: binary_data_size {binary_size!r} with {len(tail)} bytes "
                             f"after the header; shape {tensor.shape} of FP32 needs {4 * count}")
        values = np.frombuffer(tail, dtype="<f4").astype(np.float32)
    else:
        if tail:
            raise BadRequest(f"{len(tail)} bytes follow the JSON header, but input {INPUT_NAME!r} declares no "
                             "parameters.binary_data_size")
        if tensor.data is None:
            raise BadRequest(f"input {INPUT_NAME!r} has neither data nor parameters.binary_data_size")
        values = _numbers(tensor.data, tensor.shape)
        if values.size != count:
            raise BadRequest(f"input {INPUT_NAME!r} holds {values.size} values; shape {tensor.shape} needs {count}")
    # Cast first, then check: a value float32 cannot hold (1e39) becomes inf and is refused here.
    with np.errstate(over="ignore", invalid="ignore"):
        values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise BadRequest(f"input {INPUT_NAME!r} must hold finite numbers that fit FP32")
    return values.reshape(tensor.shape)


def _numbers(data: list[Any], shape: list[int]) -> np.ndarray:
    """JSON values as a flat float64 array; booleans, text, nulls and ragged nesting are refused (a plain
    np.array would turn `[true, 1.5]` into numbers), and nested data must have the declared shape."""
    try:
        cells = np.array(data, dtype=object)
    except ValueError:  # ragged nesting numpy cannot even hold as objects
        cells = np.array([data], dtype=object)
    if cells.ndim > 1 and list(cells.shape) != shape:
        raise BadRequest(f"input {INPUT_NAME!r}: nested data of shape {list(cells.shape)} does not match shape {shape}")
    cells = cells.ravel()
    if not set(map(type, cells)) <= {int, float}:  # a list here means ragged nesting
        raise BadRequest(f"input {INPUT_NAME!r} must hold finite numbers that fit FP32, flat or nested row-major")
    try:
        return cells.astype(np.float64)
    except OverflowError:  # an integer beyond float64: not finite as FP32 either
        return np.full(cells.size, np.inf)


def encode(request: InferenceRequest, model: str, version: str, labels: np.ndarray,
           probabilities: np.ndarray) -> Response:
    """The response: JSON, or a JSON header followed by raw bytes for outputs asked as binary."""
    arrays = {"label": labels, "probabilities": probabilities}
    wanted = request.outputs or [RequestOutput(name=name) for name in OUTPUTS]
    all_binary = (request.parameters or {}).get("binary_data_output") is True
    outputs, blobs = [], []
    for out in wanted:
        if out.name not in arrays:
            raise BadRequest(f"unknown output {out.name!r}: the model's outputs are {list(OUTPUTS)}")
        array, (datatype, dtype) = arrays[out.name], _OUTPUT_TYPES[out.name]
        tensor: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(array.shape)}
        if all_binary or (out.parameters or {}).get("binary_data") is True:
            blob = np.ascontiguousarray(array, dtype=dtype).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        outputs.append(tensor)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        body["id"] = request.id
    header = orjson.dumps(body)
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(b"".join([header, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


# ---- statistics ------------------------------------------------------------------------------------

class Stats:
    """Triton-style counters per (model, version), for this process (one replica or edge worker)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_version: dict[tuple[str, str], dict[str, Any]] = {}

    def _entry(self, model: str, version: str) -> dict[str, Any]:
        return self._by_version.setdefault((model, version), {
            "last_inference": 0, "inference_count": 0, "execution_count": 0,
            "success": [0, 0], "fail": [0, 0], "compute_infer": [0, 0]})

    def request(self, model: str, version: str, rows: int, ns: int, ok: bool) -> None:
        with self._lock:
            entry = self._entry(model, version)
            entry["success" if ok else "fail"][0] += 1
            entry["success" if ok else "fail"][1] += ns
            if ok:
                entry["inference_count"] += rows
                entry["last_inference"] = int(time.time() * 1000)

    def execution(self, model: str, version: str, ns: int) -> None:
        """One model call (a batch of one or more requests)."""
        with self._lock:
            entry = self._entry(model, version)
            entry["execution_count"] += 1
            entry["compute_infer"][0] += 1
            entry["compute_infer"][1] += ns

    def report(self, versions: list[tuple[str, str]], replica: str, loaded: list[str]) -> dict[str, Any]:
        with self._lock:
            stats = []
            for model, version in versions:
                entry = self._entry(model, version)
                stats.append({
                    "name": model, "version": version, "last_inference": entry["last_inference"],
                    "inference_count": entry["inference_count"], "execution_count": entry["execution_count"],
                    "inference_stats": {key: {"count": entry[key][0], "ns": entry[key][1]}
                                        for key in ("success", "fail", "compute_infer")},
                })
        return {"replica": replica, "loaded": loaded, "model_stats": stats}


# ---- the app ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionState:
    """Where one version stands in this process. `loaded`: in memory; `available`: verified when the
    server opened its catalog (and not failed since), loaded by the first request that needs it;
    `loading`: a load runs now and requests wait for it; `failed`: the last load failed, and requests
    get a 503 until `retry_in_s` passes, when the next request tries again."""

    state: Literal["loaded", "available", "loading", "failed"]
    reason: str | None = None
    retry_in_s: float | None = None

    @property
    def ready(self) -> bool:
        return self.state != "failed"


class Backend(Protocol):
    """What the routes need: the catalog, predictions by (model, version), readiness, counters."""

    catalog: Catalog
    stats: Stats

    async def infer(self, model: str, version: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def state(self, model: str, version: str) -> VersionState:
        """The version's state, without loading anything (a client must not force loads)."""

    def loaded(self) -> list[str]:
        """The `model/version` keys this process holds in memory now."""


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


_HEADER_LENGTH = HEADER_LENGTH.encode()
_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


class V2App(FastAPI):
    """FastAPI for the docs and every route but one: `infer`, the hot route, is answered here at the ASGI
    level, without FastAPI's middleware, routing and parameter solving, which cost more CPU than a small
    model does. It is still a FastAPI app, so Ray Serve's ingress takes it as one."""

    answer_infer: Callable[[str, str | None, bytes, str | None], Awaitable[Response]]
    json_limits: dict[str, int]  # by model name
    versions: dict[str, set[str]]  # by model name
    replica_header: tuple[bytes, bytes]
    receiving = 0  # bytes of infer bodies this process holds now (received, being answered)
    max_receiving = MAX_RECEIVING

    async def __call__(self, scope, receive, send) -> None:
        match = scope["type"] == "http" and scope["method"] == "POST" and _INFER_PATH.match(scope["path"])
        if not match:
            if scope["type"] != "http":
                return await super().__call__(scope, receive, send)

            async def send_named(message) -> None:  # every answer names the replica, errors included
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), self.replica_header]
                await send(message)

            return await super().__call__(scope, receive, send_named)
        header_length = declared = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
            elif key == _HEADER_LENGTH:
                header_length = value.decode("latin-1")
        limit = self.json_limits.get(match[1])
        if limit is None or (match[2] is not None and match[2] not in self.versions[match[1]]):
            # an unknown model or version: its 404 needs no body
            return await (await self.answer_infer(match[1], match[2], b"", None))(scope, receive, send)
        if header_length is not None:  # binary tensors: raw values after a small JSON header
            limit = MAX_BODY
        over = (f"request body over {limit} bytes" if limit == MAX_BODY else
                f"JSON request body over {limit} bytes ({MAX_BATCH} rows); send large inputs as binary tensors")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(413, over, scope, receive, send)
        chunks, more, size = [], True, 0
        try:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                V2App.receiving += len(chunks[-1])
                if size > limit:  # refused before it is parsed into memory many times its size
                    return await self._refuse(413, over, scope, receive, send)
                if V2App.receiving > self.max_receiving:
                    return await self._refuse(503, f"the server holds {self.max_receiving} bytes of request "
                                                   "bodies already; retry shortly", scope, receive, send,
                                              {"Retry-After": "1"})
                more = message.get("more_body", False)
            response = await self.answer_infer(match[1], match[2], b"".join(chunks), header_length)
            await response(scope, receive, send)
        finally:
            V2App.receiving -= size

    async def _refuse(self, status: int, message: str, scope, receive, send, headers=None) -> None:
        response = _error(status, message, headers)
        response.headers.append(*(part.decode("latin-1") for part in self.replica_header))
        await response(scope, receive, send)


def make_app(backend: Backend, replica: str | None = None) -> FastAPI:
    """The V2 routes over `backend`; `replica` names this process in a `raypipe-replica` header."""
    app = V2App(
        title="raypipe inference",
        description="The Open Inference Protocol (KServe V2) over REST, with the binary tensor data and "
                    "statistics extensions. Inputs are raw values; standardization happens server-side.",
        version="2",
    )
    catalog, stats = backend.catalog, backend.stats
    replica = replica or f"pid-{os.getpid()}"
    replica_header = {REPLICA_HEADER: replica}
    app.replica_header = (REPLICA_HEADER.encode(), replica.encode("latin-1"))
    app.json_limits = {name: json_limit(spec.features) for name, spec in catalog.models.items()}
    app.versions = {name: set(spec.versions) for name, spec in catalog.models.items()}
    infer_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/InferenceRequest"}}}}}

    # Starlette's own exception (unknown routes, 405) as well as FastAPI's, which subclasses it.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(400, _first_error(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal error")

    def spec_of(model: str, version: str | None) -> tuple[ModelSpec, str]:
        spec = catalog.models.get(model)
        if spec is None:
            raise HTTPException(404, f"unknown model {model!r}; this server has {sorted(catalog.models)}")
        version = version or spec.promoted
        if version not in spec.versions:
            raise HTTPException(404, f"unknown version {version!r} of {model!r}; served: {list(spec.versions)}")
        return spec, version

    async def answer_infer(model: str, version: str | None, raw: bytes, header_length: str | None) -> Response:
        """An infer request's response, errors included (never raises)."""
        start, rows = time.perf_counter_ns(), 0
        try:
            spec, version = spec_of(model, version)
        except HTTPException as err:
            return _error(err.status_code, str(err.detail), replica_header)
        try:
            if header_length is None:
                check_json_size(raw, spec.features)
            body, tail = parse(raw, header_length)
            x = decode(body, tail, spec.features)
            body.inputs[0].data = None  # the values live on in x: free the Python numbers before the model runs
            rows = len(x)
            labels, probabilities = await backend.infer(model, version, x)
            response = encode(body, model, version, labels, probabilities)
        except HTTPException as err:
            stats.request(model, version, rows, time.perf_counter_ns() - start, ok=False)
            return _error(err.status_code, str(err.detail), {**replica_header, **(err.headers or {})})
        except Exception:
            stats.request(model, version, rows, time.perf_counter_ns() - start, ok=False)
            log.exception("unexpected error serving %s/%s", model, version)
            return _error(500, "internal error", replica_header)
        stats.request(model, version, rows, time.perf_counter_ns() - start, ok=True)
        response.headers.update(replica_header)
        return response

    app.answer_infer = answer_infer

    # Documents the route and answers it when V2App's fast path is bypassed (it never is over HTTP).
    @app.post("/v2/models/{model}/infer", summary="Infer (promoted version)", openapi_extra=infer_body)
    @app.post("/v2/models/{model}/versions/{version}/infer", summary="Infer", openapi_extra=infer_body)
    async def infer(model: str, request: Request, version: str | None = None):
        return await answer_infer(model, version, await request.body(), request.headers.get(HEADER_LENGTH))

    @app.get("/v2/health/live", summary="Liveness")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness: the catalog verified, and no promoted version failing "
                                         "to load in this replica")
    async def ready():
        failing = {f"{name}/{spec.promoted}": state.reason for name, spec in catalog.models.items()
                   if not (state := backend.state(name, spec.promoted)).ready}
        if failing:
            return _error(503, f"not ready: promoted versions that cannot be loaded now: {failing}")
        return {"ready": True}

    @app.get("/v2", summary="Server metadata")
    async def server_metadata():
        return {"name": "raypipe", "version": _version(), "extensions": EXTENSIONS}

    @app.get("/v2/models", summary="Every served model: its versions and the promoted one")
    async def model_index():
        return {"models": [{"name": name, "versions": list(spec.versions), "promoted": spec.promoted}
                           for name, spec in catalog.models.items()]}

    @app.get("/v2/models/{model}/stats", summary="Statistics of a model's versions, in this replica")
    @app.get("/v2/models/{model}/versions/{version}/stats", summary="Statistics of one version, in this replica")
    async def model_stats(model: str | None = None, version: str | None = None):
        if model is None:
            versions = [(m, v) for m, spec in catalog.models.items() for v in spec.versions]
        elif version is None:
            spec, _ = spec_of(model, None)
            versions = [(model, v) for v in spec.versions]
        else:
            versions = [(model, spec_of(model, version)[1])]
        return stats.report(versions, replica, backend.loaded())

    # Registered before /v2/models/{model}, which would take "stats" for a model name; but a model named
    # `stats` keeps that path for its metadata (the core protocol's route wins over the extension's).
    if "stats" not in catalog.models:
        app.get("/v2/models/stats", summary="Statistics of every served version, in this replica")(model_stats)

    @app.get("/v2/models/{model}", summary="Model metadata (promoted version)")
    @app.get("/v2/models/{model}/versions/{version}", summary="Model metadata")
    async def model_metadata(model: str, version: str | None = None):
        spec, version = spec_of(model, version)
        return spec.metadata(version)

    @app.get("/v2/models/{model}/ready", summary="Model readiness (promoted version); never loads it")
    @app.get("/v2/models/{model}/versions/{version}/ready", summary="Model readiness; never loads it")
    async def model_ready(model: str, version: str | None = None):
        spec, version = spec_of(model, version)
        state = backend.state(model, version)
        body: dict[str, Any] = {"name": model, "version": version, "ready": state.ready, "state": state.state}
        if state.ready:
            return body
        body.update(reason=state.reason, retry_in_s=state.retry_in_s,
                    error=f"version {version!r} of {model!r} cannot be loaded now: {state.reason}")
        return JSONResponse(body, status_code=503)

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
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raypipe")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown"
