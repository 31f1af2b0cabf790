"""Bundles and the Ray-free edge server: `raypipe export`, `raypipe edge`, pulls from disk and S3."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
import requests
import s3fs

from raypipe.predict import OnnxModel
from raypipe.serving import bundle, edge
from raypipe.serving.catalog import open_sources
from tests.conftest import REPO, free_port, raypipe, wait_until_up


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    target = tmp_path_factory.mktemp("bundles") / "digits-v1"
    done = raypipe("export", smoke_run.uri, "--to", str(target), "--variants", "fp32,int8", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    digest, uri = done.stdout.strip().splitlines()[-2:]
    return target, digest


def test_a_bundle_is_a_triton_model_repository_with_a_digest(exported, smoke_run):
    target, digest = exported
    manifest = json.loads((target / "bundle.json").read_text())
    assert digest == bundle.bundle_digest((target / "bundle.json").read_bytes())
    versions = manifest["models"]["digits"]["versions"]
    assert {v: e["file"] for v, e in versions.items()} == {"fp32": "digits/1/model.onnx", "int8": "digits/2/model.onnx"}
    # The run's promoted variant when it is among those exported, else the first of them.
    promoted = smoke_run.report()["promoted"]
    assert manifest["models"]["digits"]["promoted"] == (promoted if promoted in versions else "fp32")
    for rel, entry in manifest["files"].items():
        assert bundle.sha256_bytes((target / rel).read_bytes()) == entry["sha256"]
    config = (target / "digits/config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "dims: [ 64 ]" in config and "version_policy: { all: {} }" in config
    # The files are the run's own artifacts, byte for byte.
    assert (target / "digits/2/model.onnx").read_bytes() == (smoke_run.path / "models/int8/model.onnx").read_bytes()


def test_export_refuses_a_destination_that_holds_files(exported, smoke_run):
    target, _ = exported
    done = raypipe("export", smoke_run.uri, "--to", str(target), timeout=120)
    assert done.returncode == 2 and "already holds files" in done.stderr


def test_a_tampered_bundle_is_refused_naming_the_file(exported, tmp_path):
    target, digest = exported
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(target), str(copy)], check=True)
    with (copy / "digits/2/model.onnx").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    done = raypipe("edge", str(copy), "--port", str(free_port()), "--cache", str(tmp_path / "cache"), timeout=60)
    assert done.returncode == 2 and "digits/2/model.onnx: sha256 does not match bundle.json" in done.stderr
    wrong = "sha256:" + "0" * 64
    done = raypipe("edge", str(target), "--digest", wrong, "--cache", str(tmp_path / "cache"), timeout=60)
    assert done.returncode == 2 and f"is not the expected {wrong}" in done.stderr
    assert not (tmp_path / "cache" / digest.removeprefix("sha256:")).exists()


def test_edge_serves_the_bundle_with_two_workers_and_no_ray_or_torch(exported, smoke_run, tmp_path):
    target, digest = exported
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "raypipe", "edge", str(target), "--port", str(port), "--workers", "2",
         "--digest", digest, "--cache", str(tmp_path / "cache")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, f"{base}/v2/health/ready")
        x = np.random.default_rng(0).uniform(0, 16, (5, 64)).astype(np.float32)
        body = {"inputs": [{"name": "input", "shape": [5, 64], "datatype": "FP32", "data": x.tolist()}]}
        reply = requests.post(f"{base}/v2/models/digits/versions/int8/infer", json=body, timeout=10)
        assert reply.status_code == 200, reply.text
        expected = OnnxModel((target / "digits/2/model.onnx").read_bytes()).predict(x)
        assert reply.json()["outputs"][0]["data"] == expected[0].tolist()
        assert requests.get(f"{base}/v2/models/cats", timeout=5).status_code == 404
        workers = [p for p in psutil.Process(process.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        assert reply.headers["raypipe-replica"] in {f"pid-{p.pid}" for p in workers}
        assert (tmp_path / "cache" / digest.removeprefix("sha256:") / "bundle.json").is_file()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=40)
    assert process.returncode == 0


def test_the_edge_app_imports_neither_ray_nor_torch(exported):
    target, _ = exported
    code = ("import sys; from raypipe.serving import edge; edge.create_app(); import raypipe.cli; "
            "print(sorted(m for m in ('ray', 'torch', 'pyarrow') if m in sys.modules))")
    catalog = open_sources([str(target)]).model_dump_json()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, edge.CATALOG_ENV: catalog})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_pull_from_s3_verifies_and_caches_by_digest(exported, smoke_run, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "edge-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "edge-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="edge-test", secret="edge-test-secret")
    fs.mkdir("edge-bundles")
    digest = bundle.export([smoke_run.uri], "s3://edge-bundles/digits-v1")
    assert fs.exists("edge-bundles/digits-v1/bundle.json") and fs.exists("edge-bundles/digits-v1/digits/config.pbtxt")

    local = bundle.pull("s3://edge-bundles/digits-v1", tmp_path, digest).path
    assert local == tmp_path / digest.removeprefix("sha256:")
    catalog = open_sources([str(local)])
    assert list(catalog.models["digits"].versions) == [smoke_run.report()["promoted"]]
    # A second node start finds the copy by digest and fetches nothing: the objects may even be gone.
    fs.rm("edge-bundles/digits-v1/digits", recursive=True)
    assert bundle.pull("s3://edge-bundles/digits-v1", tmp_path, digest).path == local


def test_serving_verifies_what_it_reads_and_only_that(smoke_run, tmp_path):
    import shutil

    from raypipe.config import ConfigError

    copy = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, copy)
    shard = next((copy / "data/train").glob("*.parquet"))
    shard.write_bytes(b"changed")  # a file serving never reads: no reason to refuse
    assert "digits" in open_sources([str(copy)]).models
    promoted = smoke_run.report()["promoted"]
    (copy / f"models/{promoted}/model.onnx").write_bytes(b"changed")
    with pytest.raises(ConfigError, match=f"models/{promoted}/model.onnx"):
        open_sources([str(copy)])


def test_seal_reuses_hashes_taken_earlier_in_the_run(smoke_run, tmp_path):
    import shutil

    from raypipe.storage import RunPaths

    copy = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, copy)
    paths = RunPaths.open(str(copy))
    known = paths.hashes(["data/"])
    assert known and all(rel.startswith("data/") for rel in known)
    marked = {rel: ("f" * 64, size) for rel, (_, size) in known.items()}  # not what the files hash to
    manifest = paths.seal(known=marked)
    assert {rel: e["sha256"] for rel, e in manifest["files"].items() if rel.startswith("data/")} == \
        {rel: "f" * 64 for rel in known}
    report = smoke_run.report()
    assert manifest["files"][report["train"]["checkpoint"].removeprefix(smoke_run.uri + "/")]["sha256"] == \
        report["lineage"]["checkpoint"]


def test_a_rejected_variant_is_neither_promoted_nor_served(smoke_run, tmp_path):
    import shutil

    from raypipe import compress
    from raypipe.storage import RunPaths

    from raypipe.records import Variant

    variants = [Variant(name=name, format="onnx", uri=f"/m/{name}", sha256="0" * 64, size_bytes=size,
                        val_accuracy=accuracy, test_accuracy=accuracy, latency_ms={"batch_1": 0.1, "batch_64": 1.0})
                for name, accuracy, size in (("fp32", 0.95, 200), ("int8", 0.90, 60))]
    compress.guard(variants, max_drop=0.01)
    assert [v.accepted for v in variants] == [True, False] and "0.05" in variants[1].reason
    assert compress.promote(variants) == "fp32"  # the smaller variant lost too much

    copy = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, copy)
    report = json.loads((copy / "report.json").read_text())
    for variant in report["variants"][1:]:  # every variant but fp32 rejected
        variant.update(accepted=False, reason="accuracy drop 0.0500 > 0.01")
    report["promoted"] = "fp32"
    (copy / "report.json").write_text(json.dumps(report))
    RunPaths.open(str(copy)).seal()
    assert list(open_sources([str(copy)]).models["digits"].versions) == ["fp32"]
    done = raypipe("export", str(copy), "--to", str(tmp_path / "b"), "--variants", "int8", timeout=60)
    assert done.returncode == 2 and "no accepted variant 'int8'" in done.stderr


def test_a_bundle_whose_paths_leave_it_is_refused(exported, tmp_path):
    import shutil

    target, _ = exported
    copy = tmp_path / "evil"
    shutil.copytree(target, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["files"]["../escaped.txt"] = {"sha256": bundle.sha256_bytes(b"x"), "size": 1}
    (copy / "bundle.json").write_text(json.dumps(manifest))
    done = raypipe("edge", str(copy), "--cache", str(tmp_path / "cache" / "inner"), timeout=60)
    assert done.returncode == 2 and "'../escaped.txt' leaves the bundle" in done.stderr
    assert not list(tmp_path.rglob("escaped.txt"))  # written nowhere, inside the cache or out of it
