"""`raypipe serve RUN`: real Ray Serve replicas behind real HTTP on loopback, the V2 protocol."""

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from raypipe.predict import OnnxModel
from tests.conftest import REPO, free_port, raypipe


@pytest.fixture(scope="module")
def server(smoke_run):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "raypipe", "serve", smoke_run.uri, "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, base)
        yield base
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail("raypipe serve did not stop within 60 s of Ctrl-C")
    assert process.returncode == 0, stderr[-3000:]


def _wait_ready(process: subprocess.Popen, base: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            if requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or replicas still starting
            pass
        time.sleep(1)
    pytest.fail(f"raypipe serve did not become ready in {seconds:.0f} s")


def _test_rows(run_path, n=40):
    table = pq.read_table(next((run_path / "data/test").glob("*.parquet")))
    return np.stack(table.column("x").to_numpy(zero_copy_only=False))[:n].astype(np.float32), \
        table.column("label").to_numpy()[:n]


def _body(x, **extra):
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


def test_health_and_metadata(server):
    assert requests.get(f"{server}/v2/health/live").status_code == 200
    assert requests.get(f"{server}/v2/health/ready").status_code == 200
    meta = requests.get(f"{server}/v2").json()
    assert meta["name"] == "raypipe" and "version" in meta and "extensions" in meta
    model = requests.get(f"{server}/v2/models/digits").json()
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"] for o in model["outputs"]} == {"label", "probabilities"}
    assert requests.get(f"{server}/v2/models/digits/versions/fp32/ready").status_code == 200
    assert requests.get(f"{server}/v2/models/digits/ready").status_code == 200
    assert "/v2/models/{model}/infer" in requests.get(f"{server}/openapi.json").json()["paths"]
    assert requests.get(f"{server}/docs").status_code == 200


def test_infer_answers_known_digits(server, smoke_run):
    x, labels = _test_rows(smoke_run.path)
    report = smoke_run.report()
    reply = requests.post(f"{server}/v2/models/digits/infer", json=_body(x, id="req-1"))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model_name"] == "digits" and body["model_version"] == report["promoted"] and body["id"] == "req-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    predicted = np.array(outputs["label"]["data"])
    assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["shape"] == [len(x)]
    assert outputs["probabilities"]["shape"] == [len(x), 10]
    # The server returns exactly what the stored artifact computes on raw pixels ...
    local = OnnxModel((smoke_run.path / f"models/{report['promoted']}/model.onnx").read_bytes())
    assert (predicted == local.predict(x)[0]).all()
    # ... and that is mostly right on digits it never saw (a 4-epoch smoke model).
    assert (predicted == labels).mean() >= 0.6


def test_infer_by_version_nested_data_and_selected_outputs(server, smoke_run):
    x, _ = _test_rows(smoke_run.path, n=3)
    body = {"id": "n", "parameters": {}, "outputs": [{"name": "label"}],
            "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": x.tolist(), "parameters": {}}]}
    reply = requests.post(f"{server}/v2/models/digits/versions/fp32/infer", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model_version"] == "fp32"
    assert [o["name"] for o in reply.json()["outputs"]] == ["label"]


@pytest.mark.parametrize(
    "payload, needle",
    [
        ("not json", "not valid JSON"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}]}, "shape"),
        ({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0] * 64}]}, "holds 64 values"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]}, "datatype"),
        ({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}, "pixels"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["a"] * 64}]}, "numbers"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}],
          "outputs": [{"name": "logits"}]}, "logits"),
    ],
)
def test_bad_requests_get_400_with_a_json_error(server, payload, needle):
    kwargs = {"data": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, str) \
        else {"json": payload}
    reply = requests.post(f"{server}/v2/models/digits/infer", **kwargs)
    assert reply.status_code == 400, reply.text
    assert needle in reply.json()["error"]


def test_unknown_model_or_version_is_404_even_with_a_bad_body(server):
    for path in ("/v2/models/cats/infer", "/v2/models/digits/versions/fp8/infer"):
        reply = requests.post(f"{server}{path}", data="{broken", headers={"content-type": "application/json"})
        assert reply.status_code == 404 and "unknown" in reply.json()["error"]
    assert requests.get(f"{server}/v2/models/cats").status_code == 404
    assert requests.get(f"{server}/v2/models/digits/versions/fp8/ready").status_code == 404


def test_serve_refuses_a_run_that_fails_verification(smoke_run, tmp_path):
    copy = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, copy)
    (copy / "report.json").write_text("{}")
    done = raypipe("serve", str(copy), "--port", str(free_port()), timeout=120)
    assert done.returncode == 2 and "report.json: sha256 does not match" in done.stderr
    (copy / "MANIFEST.json").unlink()
    done = raypipe("serve", str(copy), timeout=120)
    assert done.returncode == 2 and "no MANIFEST.json" in done.stderr
