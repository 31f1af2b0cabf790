"""The V2 routes in-process (FastAPI TestClient) over real ONNX models: status codes, bodies, extensions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from raypipe import compress, models
from raypipe.config import ModelConfig
from raypipe.predict import OnnxModel
from raypipe.serving.catalog import Catalog, ModelSpec, VersionSpec
from raypipe.serving.edge import EdgeBackend
from raypipe.serving.rest import make_app
from raypipe.storage import sha256_bytes
from tests.conftest import data_stats

STATS = data_stats([1, 8, 8], mean=4.0, std=6.0)


def _spec(name: str, blob: bytes, folder) -> ModelSpec:
    path = folder / f"{name}.onnx"
    path.write_bytes(blob)
    version = VersionSpec(uri=str(path), sha256=sha256_bytes(blob), size_bytes=len(blob), test_accuracy=0.9)
    return ModelSpec(name=name, promoted="fp32", features=64, classes=10, source=str(folder),
                     versions={"fp32": version, "int8": version})


@pytest.fixture(scope="module")
def blob():
    torch.manual_seed(0)
    net = models.with_standardize(models.build(ModelConfig(hidden=[16]), STATS), STATS)
    return compress.export_onnx(net, 64)


@pytest.fixture(scope="module")
def client(blob, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    catalog = Catalog.combine([_spec("digits", blob, folder), _spec("letters", blob, folder)])
    backend = EdgeBackend(catalog)
    client = TestClient(make_app(backend, replica="r1"))
    client.app_backend = backend
    return client


def _infer(client, data, shape, path="/v2/models/digits/infer", **extra):
    return client.post(path, json={"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}],
                                   **extra})


def test_flat_and_nested_data_give_the_same_answer(client, blob):
    x = np.random.default_rng(0).uniform(0, 16, (4, 64)).round(2)
    flat = _infer(client, x.ravel().tolist(), [4, 64])
    nested = _infer(client, x.tolist(), [4, 64])
    assert flat.status_code == 200 and flat.json() == nested.json()
    assert flat.headers["raypipe-replica"] == "r1"
    probs = np.array(flat.json()["outputs"][1]["data"]).reshape(4, 10)
    assert np.allclose(probs, OnnxModel(blob).predict(x)[1], atol=1e-6)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_two_models_each_answer_under_their_name(client):
    for name in ("digits", "letters"):
        reply = _infer(client, [1.0] * 64, [1, 64], path=f"/v2/models/{name}/versions/int8/infer")
        assert reply.status_code == 200 and reply.json()["model_name"] == name
    assert client.get("/v2/models/letters").json()["name"] == "letters"


def test_error_statuses(client):
    reply = _infer(client, [0] * 64, [1, 64], path="/v2/models/other/infer")
    assert reply.status_code == 404 and "other" in reply.json()["error"]
    assert _infer(client, [0] * 64, [1, 64], path="/v2/models/digits/versions/x/infer").status_code == 404
    assert _infer(client, [0] * 64, [64]).status_code == 400
    assert _infer(client, [0] * 64, [0, 64]).status_code == 400
    assert _infer(client, [True] * 64, [1, 64]).status_code == 400
    assert _infer(client, [True] + [1.5] * 63, [1, 64]).status_code == 400  # not coerced to 1.0
    assert _infer(client, [[0] * 60, [0] * 4], [1, 64]).status_code == 400  # ragged
    assert _infer(client, [None] * 64, [1, 64]).status_code == 400
    assert _infer(client, [0] * 5000 * 64, [5000, 64]).json()["error"].startswith("batch of 5000 rows")
    reply = client.post("/v2/models/digits/infer", json={"inputs": "nope"})
    assert reply.status_code == 400 and "inputs" in reply.json()["error"]
    reply = client.post("/v2/models/digits/infer", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert reply.status_code == 400


@pytest.mark.parametrize("value", [b"NaN", b"1e39", b"-1e39", b"1" + b"0" * 400])
def test_values_fp32_cannot_hold_are_400_not_500(client, value):
    raw = b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[' + b",".join([value] * 64) + b"]}]}"
    reply = client.post("/v2/models/digits/versions/fp32/infer", content=raw,
                        headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "finite numbers that fit FP32" in reply.json()["error"]
    assert "'input'" in reply.json()["error"]


def test_binary_tensor_extension_in_and_out(client, blob):
    x = np.random.default_rng(1).uniform(0, 16, (3, 64)).astype(np.float32)
    header = json.dumps({
        "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "probabilities"}],
    }).encode()
    reply = client.post("/v2/models/digits/infer", content=header + x.tobytes(),
                        headers={"Inference-Header-Content-Length": str(len(header)),
                                 "content-type": "application/octet-stream"})
    assert reply.status_code == 200, reply.text
    split = int(reply.headers["inference-header-content-length"])
    body = json.loads(reply.content[:split])
    label, probabilities = body["outputs"]
    assert label["parameters"]["binary_data_size"] == 24 and "data" not in label
    labels = np.frombuffer(reply.content[split:], dtype="<i8")
    expected_labels, expected_probs = OnnxModel(blob).predict(x)
    assert (labels == expected_labels).all()
    assert np.allclose(probabilities["data"], expected_probs.ravel(), atol=1e-6)


def test_binary_data_that_does_not_match_the_shape_is_400(client):
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    reply = client.post("/v2/models/digits/infer", content=header + bytes(256),
                        headers={"Inference-Header-Content-Length": str(len(header))})
    assert reply.status_code == 400 and "binary_data_size" in reply.json()["error"]
    reply = client.post("/v2/models/digits/infer", content=header, headers={"Inference-Header-Content-Length": "x"})
    assert reply.status_code == 400 and "Inference-Header-Content-Length" in reply.json()["error"]


def test_stats_count_requests_rows_and_failures(client):
    before = client.get("/v2/models/letters/versions/fp32/stats").json()["model_stats"][0]
    assert _infer(client, [2.0] * 128, [2, 64], path="/v2/models/letters/versions/fp32/infer").status_code == 200
    assert _infer(client, [2.0] * 64, [2, 64], path="/v2/models/letters/versions/fp32/infer").status_code == 400
    after = client.get("/v2/models/letters/versions/fp32/stats").json()
    assert after["replica"] == "r1" and "letters/fp32" in after["loaded"]
    entry = after["model_stats"][0]
    assert entry["inference_count"] - before["inference_count"] == 2
    assert entry["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    assert entry["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert entry["execution_count"] - before["execution_count"] == 1
    every = client.get("/v2/models/stats").json()["model_stats"]
    assert {(s["name"], s["version"]) for s in every} == {(m, v) for m in ("digits", "letters") for v in ("fp32", "int8")}
    assert client.get("/v2/models/nope/stats").status_code == 404


def test_server_metadata_lists_the_extensions(client):
    assert set(client.get("/v2").json()["extensions"]) >= {"binary_tensor_data", "statistics"}


def test_openapi_documents_the_infer_body(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/InferenceRequest"
    assert "RequestInput" in spec["components"]["schemas"]
    assert "/v2/models/{model}/versions/{version}/stats" in spec["paths"]


@pytest.mark.parametrize("header", ["\xff", "+13", " 13", "1_3", "0", "99999999", "1" * 5000])
def test_a_bad_header_length_is_400(client, header):
    reply = client.post("/v2/models/digits/infer", content=b'{"inputs": []}',
                        headers={"Inference-Header-Content-Length": header.encode("latin-1")})
    assert reply.status_code == 400 and "Inference-Header-Content-Length" in reply.json()["error"]


def test_outputs_are_checked_before_the_model_runs(client):
    before = client.get("/v2/models/digits/versions/int8/stats").json()["model_stats"][0]["execution_count"]
    for outputs, needle in (([{"name": "logits"}], "logits"),
                            ([{"name": "label", "parameters": {"binary_data": "false"}}], "binary_data")):
        reply = _infer(client, [1.0] * 64, [1, 64], path="/v2/models/digits/versions/int8/infer", outputs=outputs)
        assert reply.status_code == 400 and needle in reply.json()["error"]
    after = client.get("/v2/models/digits/versions/int8/stats").json()["model_stats"][0]["execution_count"]
    assert after == before


def test_nested_data_must_have_the_declared_shape(client):
    x = np.arange(128, dtype=float).reshape(64, 2)
    reply = _infer(client, x.tolist(), [2, 64])
    assert reply.status_code == 400 and "does not match shape [2, 64]" in reply.json()["error"]


def test_a_body_over_the_limit_is_413(client):
    from raypipe.serving.rest import MAX_BODY

    reply = client.post("/v2/models/digits/infer", content=b" " * (MAX_BODY + 1),
                        headers={"content-type": "application/json"})
    assert reply.status_code == 413


def test_concurrent_requests_each_get_their_own_rows(client, blob):
    """The edge batcher joins requests that arrive while the model is busy: each must get its own answer."""
    import asyncio

    backend = client.app_backend
    rows = np.random.default_rng(3).uniform(0, 16, (40, 64)).astype(np.float32)
    sizes = [1, 3, 2, 5, 1, 4, 7, 2, 6, 9]

    async def run():
        starts = np.cumsum([0, *sizes[:-1]])
        return await asyncio.gather(*(backend.infer("digits", "fp32", rows[s:s + n]) for s, n in zip(starts, sizes)))

    def calls():
        return backend.stats.report([("digits", "fp32")], "r", [])["model_stats"][0]["execution_count"]

    before = calls()
    results = asyncio.run(run())
    expected_labels, expected_probs = OnnxModel(blob).predict(rows[:sum(sizes)])
    assert np.array_equal(np.concatenate([labels for labels, _ in results]), expected_labels)
    assert np.allclose(np.concatenate([probs for _, probs in results]), expected_probs, atol=1e-6)
    assert calls() - before <= 2  # joined into one or two model calls, not run one by one


@pytest.mark.parametrize("body, header, needle", [
    ({"inputs": [{"name": "input", "shape": ["1", 64.0], "datatype": "FP32", "data": [0] * 64}]}, None, "shape"),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}],
      "outputs": [{"name": "label"}, {"name": "label"}]}, None, "twice"),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}, True, "follow the JSON"),
])
def test_loose_or_contradictory_requests_are_400(client, body, header, needle):
    raw = json.dumps(body).encode()
    headers = {"Inference-Header-Content-Length": str(len(raw))} if header else {}
    reply = client.post("/v2/models/digits/infer", content=raw + (b"junk" if header else b""), headers=headers)
    assert reply.status_code == 400 and needle in reply.json()["error"], reply.text


def _json_body(values: int, shape: list[int]) -> bytes:
    return (b'{"inputs":[{"name":"input","shape":' + json.dumps(shape).encode()
            + b',"datatype":"FP32","data":[' + b",".join([b"1.5"] * values) + b"]}]}")


def test_a_large_json_body_with_a_small_shape_is_refused_before_it_is_parsed(client):
    import time
    import tracemalloc

    raw = _json_body(1_500_000, [1, 64])  # 6 MiB: under the model's JSON limit, far over what [1, 64] needs
    tracemalloc.start()
    try:
        start = time.perf_counter()
        reply = client.post("/v2/models/digits/infer", content=raw, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Parsed into Python numbers, the body took about 70 MiB; refused unparsed, about its own size twice.
    assert peak < 3 * len(raw), f"peak {peak / 2**20:.0f} MiB"
    assert elapsed < 5
    assert reply.status_code == 400 and "larger than shape [1, 64] can need" in reply.json()["error"]


def test_a_json_body_over_its_models_limit_is_413_naming_binary_tensors(client):
    from raypipe.serving.rest import json_limit

    raw = _json_body(64, [1, 64])
    raw = raw[:-1] + b" " * (json_limit(64) - len(raw) + 1) + b"}"
    reply = client.post("/v2/models/digits/infer", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "binary tensors" in reply.json()["error"]
    assert reply.headers["raypipe-replica"] == "r1"
    # The largest batch itself, written as json.dumps writes float64 values, fits.
    x = np.random.default_rng(4).uniform(0, 1e-5, (4096, 64))
    reply = _infer(client, x.tolist(), [4096, 64])
    assert reply.status_code == 200, reply.text


def test_an_unknown_version_is_404_before_its_body_is_sized(client):
    from raypipe.serving.rest import json_limit

    raw = b" " * (json_limit(64) + 1)
    reply = client.post("/v2/models/digits/versions/nine/infer", content=raw,
                        headers={"content-type": "application/json"})
    assert reply.status_code == 404 and "unknown version 'nine'" in reply.json()["error"]


def test_pretty_printed_json_is_sized_without_its_indentation(client):
    x = np.random.default_rng(5).uniform(0, 16, (200, 64))
    body = {"inputs": [{"name": "input", "shape": [200, 64], "datatype": "FP32", "data": x.tolist()}]}
    raw = json.dumps(body, indent=8).encode()
    assert len(raw) > 200 * 64 * 32  # more than the numbers may take: the spaces and newlines are most of it
    reply = client.post("/v2/models/digits/infer", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text


def test_bodies_received_at_once_are_bounded(client):
    """A second body that would take the process over its bound of bodies held at once is a 503."""
    import asyncio

    app = client.app
    app.max_receiving = 1000
    scope = {"type": "http", "method": "POST", "path": "/v2/models/digits/infer", "headers": [], "query_string": b""}

    async def post(first: bytes, gate: asyncio.Event, answers: list):
        sent = []

        async def receive():
            if not sent:
                sent.append(first)
                return {"type": "http.request", "body": first, "more_body": True}
            await gate.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            answers.append(message)

        await app(scope, receive, send)

    async def run():
        gate, held, second = asyncio.Event(), [], []
        first = asyncio.create_task(post(b" " * 600, gate, held))
        await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(post(b" " * 600, gate, second), 5)
        finally:
            gate.set()
            await first
        return second

    try:
        second = asyncio.run(run())
    finally:
        del app.max_receiving
    assert second[0]["status"] == 503 and (b"raypipe-replica", b"r1") in second[0]["headers"]
    assert b"retry shortly" in second[1]["body"]
    from raypipe.serving.rest import V2App

    assert V2App.receiving == 0  # released when the requests end


@pytest.mark.parametrize("method, path, status", [
    ("get", "/v2/nowhere", 404), ("get", "/v2/models/digits/infer", 405), ("delete", "/v2/models/digits", 405),
    ("post", "/v2/models/other/infer", 404), ("get", "/v2/models/other/ready", 404)])
def test_every_error_is_json_error_and_names_the_replica(client, method, path, status):
    reply = getattr(client, method)(path)
    assert reply.status_code == status
    assert list(reply.json()) == ["error"], reply.text
    assert reply.headers["raypipe-replica"] == "r1"


def test_model_index_lists_every_model(client):
    reply = client.get("/v2/models")
    assert reply.status_code == 200 and reply.headers["raypipe-replica"] == "r1"
    assert reply.json() == {"models": [{"name": "digits", "versions": ["fp32", "int8"], "promoted": "fp32"},
                                       {"name": "letters", "versions": ["fp32", "int8"], "promoted": "fp32"}]}


def test_a_model_named_stats_is_reachable(blob, tmp_path):
    catalog = Catalog.combine([_spec("stats", blob, tmp_path)])
    stats_client = TestClient(make_app(EdgeBackend(catalog), replica="r2"))
    assert stats_client.get("/v2/models/stats").json()["name"] == "stats"
    assert _infer(stats_client, [1.0] * 64, [1, 64], path="/v2/models/stats/infer").status_code == 200
    assert stats_client.get("/v2/models/stats/ready").json()["ready"] is True
    assert stats_client.get("/v2/models/stats/stats").json()["model_stats"][0]["inference_count"] == 1


class LazyBackend:
    """The Serve replica's loading (an LRU that loads on first use and remembers failures) behind the
    routes, with a loader that counts its calls and fails for fp32."""

    def __init__(self, catalog: Catalog):
        from raypipe.serving.app import Models
        from raypipe.serving.rest import Stats

        self.catalog, self.stats, self.loads = catalog, Stats(), []
        self.models = Models(catalog, capacity=2, retry_s=60, load=self._load)

    def _load(self, spec):
        from raypipe.config import ConfigError

        self.loads.append(spec.uri)
        if "fp32" in spec.uri:
            raise ConfigError(f"{spec.uri}: sha256 does not match the recorded digest")
        return OnnxModel(Path(spec.uri).read_bytes())

    async def infer(self, model, version, x):
        return (await self.models.get(model, version)).predict(x)

    def state(self, model, version):
        return self.models.state(model, version)

    def loaded(self):
        return self.models.loaded()


def test_readiness_reports_state_and_never_loads(blob, tmp_path):
    for version in ("fp32", "int8"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "m.onnx").write_bytes(blob)
    versions = {v: VersionSpec(uri=str(tmp_path / v / "m.onnx"), sha256=sha256_bytes(blob), size_bytes=len(blob),
                               test_accuracy=0.9) for v in ("fp32", "int8")}
    catalog = Catalog.combine([ModelSpec(name="digits", promoted="fp32", features=64, classes=10,
                                         source=str(tmp_path), versions=versions)])
    backend = LazyBackend(catalog)
    lazy = TestClient(make_app(backend, replica="r3"))
    for _ in range(3):
        reply = lazy.get("/v2/models/digits/versions/int8/ready")
        assert reply.status_code == 200 and reply.json()["state"] == "available"
    assert lazy.get("/v2/health/ready").status_code == 200
    assert backend.loads == []  # asking is not loading

    for _ in range(3):
        reply = _infer(lazy, [1.0] * 64, [1, 64])
        assert reply.status_code == 503 and "'fp32' of 'digits' cannot be loaded now" in reply.json()["error"]
    assert len(backend.loads) == 1  # the failure is remembered, not retried per request
    reply = lazy.get("/v2/models/digits/ready")
    assert reply.status_code == 503 and reply.json()["state"] == "failed" and reply.json()["retry_in_s"] > 0
    assert "sha256" in reply.json()["reason"] and reply.headers["raypipe-replica"] == "r3"
    reply = lazy.get("/v2/health/ready")
    assert reply.status_code == 503 and "digits/fp32" in reply.json()["error"]

    assert _infer(lazy, [1.0] * 64, [1, 64], path="/v2/models/digits/versions/int8/infer").status_code == 200
    assert lazy.get("/v2/models/digits/versions/int8/ready").json()["state"] == "loaded"
