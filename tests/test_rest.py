"""The V2 routes in-process (FastAPI TestClient) over a real ONNX model: status codes and bodies."""

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from raypipe import compress, models
from raypipe.config import ModelConfig
from raypipe.predict import OnnxModel
from raypipe.serving.rest import Catalog, LocalBackend, make_app

STATS = {"features": 64, "num_classes": 10, "image_shape": [1, 8, 8],
         "standardize": {"mean": [4.0] * 64, "std": [6.0] * 64}}


@pytest.fixture(scope="module")
def client():
    torch.manual_seed(0)
    net = models.with_standardize(models.build(ModelConfig(hidden=[16]), STATS), STATS)
    model = OnnxModel(compress.export_onnx(net, 64))
    catalog = Catalog("digits", "fp32", 64, 10, {"fp32": {"test_accuracy": 0.9}, "int8": {"test_accuracy": 0.9}})
    return TestClient(make_app(LocalBackend(catalog, {"fp32": model, "int8": model})))


def _infer(client, data, shape, path="/v2/models/digits/infer", **extra):
    return client.post(path, json={"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}],
                                   **extra})


def test_flat_and_nested_data_give_the_same_answer(client):
    x = np.random.default_rng(0).uniform(0, 16, (4, 64)).round(2)
    flat = _infer(client, x.ravel().tolist(), [4, 64]).json()
    nested = _infer(client, x.tolist(), [4, 64]).json()
    assert flat == nested
    probs = np.array(flat["outputs"][1]["data"]).reshape(4, 10)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_error_statuses(client):
    assert _infer(client, [0] * 64, [1, 64], path="/v2/models/other/infer").status_code == 404
    assert _infer(client, [0] * 64, [1, 64], path="/v2/models/digits/versions/x/infer").status_code == 404
    assert _infer(client, [0] * 64, [64]).status_code == 400
    assert _infer(client, [0] * 64, [0, 64]).status_code == 400
    assert _infer(client, [True] * 64, [1, 64]).status_code == 400
    assert _infer(client, [0] * 5000 * 64, [5000, 64]).json()["error"].startswith("batch of 5000 rows")
    reply = client.post("/v2/models/digits/infer", json={"inputs": "nope"})
    assert reply.status_code == 400 and "inputs" in reply.json()["error"]
    reply = client.post("/v2/models/digits/infer", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert reply.status_code == 400


def test_nan_is_rejected_not_a_500(client):
    reply = client.post("/v2/models/digits/infer", content=b'{"inputs":[{"name":"input","shape":[1,64],'
                        b'"datatype":"FP32","data":[' + b",".join([b"NaN"] * 64) + b"]}]}",
                        headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "finite" in reply.json()["error"]


def test_openapi_documents_the_infer_body(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/InferenceRequest"
    assert "RequestInput" in spec["components"]["schemas"]
