"""What serving trusts: pinned digests, the edge cache, names that become paths, re-compressing a sealed run.

Runs and bundles here are made by hand (a tiny ONNX model, a sealed run folder): no Ray.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from raypipe import cli
from raypipe.config import Config, ConfigError
from raypipe.serving import bundle, edge
from raypipe.serving.catalog import bundle_digest, open_sources
from raypipe.storage import RunPaths, S3Config, sha256_bytes
from tests.conftest import REPO, data_stats, free_port, raypipe, wait_until_up


def onnx_model(seed: int, features: int = 64, classes: int = 10) -> bytes:
    """A linear model as the pipeline exports one: `input` [N, features] -> `logits` [N, classes]."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(seed).normal(size=(features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"])], "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, classes])],
        [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def make_run(root: Path, name: str = "digits", variants: tuple[str, ...] = ("fp32", "int8"),
             run_id: str = "digits-20260101-000000-abcdef") -> Path:
    """A sealed run holding what serving and `raypipe compress` read, one small model per variant."""
    paths = RunPaths(str(root), run_id, S3Config())
    cfg = Config(name="digits").public_dict()
    cfg["name"] = name  # as a hand-edited or damaged run would hold it
    paths.write_bytes("config.yaml", yaml.safe_dump(cfg).encode())
    data_stats([64], 8.0, 4.0).write(paths, "data/stats.json")
    paths.write_json("train.json", {})
    records = []
    for seed, variant in enumerate(variants):
        blob = onnx_model(seed)
        paths.write_bytes(f"models/{variant}/model.onnx", blob)
        records.append({"name": variant, "format": "onnx", "uri": paths.child_uri(f"models/{variant}/model.onnx"),
                        "sha256": sha256_bytes(blob), "size_bytes": len(blob), "test_accuracy": 0.9,
                        "latency_ms": {"batch_1": 0.1, "batch_64": 1.0}, "accepted": True})
    paths.write_json("report.json", {"run_id": run_id, "config": cfg, "variants": records, "promoted": variants[0]})
    paths.seal()
    return Path(paths.uri)


def manifest_digest(run: Path) -> str:
    return bundle_digest((run / "MANIFEST.json").read_bytes())


@pytest.fixture
def exported(tmp_path) -> tuple[Path, str]:
    run = make_run(tmp_path / "runs")
    target = tmp_path / "bundles" / "digits-v1"
    return target, bundle.export([str(run)], str(target), ["fp32", "int8"])


def edge_main(monkeypatch, *args: str):
    """`raypipe edge ARGS` in this process, up to where uvicorn would start: the catalog it would serve."""
    started = {}
    monkeypatch.setattr(edge, "serve", lambda catalog, *rest: started.update(catalog=catalog))
    args = cli.build_parser().parse_args(["edge", *args])
    assert args.func(args) == 0
    return started["catalog"]


def poison(copy: Path) -> None:
    """Point the int8 version of a bundle copy at other bytes, its bundle.json made to agree."""
    other = onnx_model(99)
    (copy / "digits/2/model.onnx").write_bytes(other)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["files"]["digits/2/model.onnx"]["sha256"] = sha256_bytes(other)
    manifest["models"]["digits"]["versions"]["int8"]["sha256"] = sha256_bytes(other)
    (copy / "bundle.json").write_text(json.dumps(manifest))


# ---- the edge cache ---------------------------------------------------------------------------------

def test_a_cached_bundle_json_that_is_not_the_digest_is_never_served(exported, tmp_path, monkeypatch):
    target, digest = exported
    cache = tmp_path / "cache"
    copy = bundle.pull(str(target), cache, digest).path
    poison(copy)  # a cached manifest, consistent with its cached files, but not the bundle the digest names

    pulled = bundle.pull(str(target), cache, digest)
    assert pulled.fetched and bundle_digest((pulled.path / "bundle.json").read_bytes()) == digest
    poison(copy)
    int8 = edge_main(monkeypatch, str(target), "--digest", digest, "--cache", str(cache)).models["digits"].versions["int8"]
    assert int8.sha256 == sha256_bytes((target / "digits/2/model.onnx").read_bytes())
    # Unpinned, the source's bundle.json names the digest: the poisoned copy is replaced just the same.
    poison(copy)
    assert bundle.pull(str(target), cache).fetched
    assert bundle_digest((copy / "bundle.json").read_bytes()) == digest


def test_edge_workers_serve_the_catalog_their_parent_verified(exported, tmp_path, monkeypatch):
    target, digest = exported
    cache = tmp_path / "cache"
    from fastapi.testclient import TestClient

    catalog = edge_main(monkeypatch, str(target), "--digest", digest, "--cache", str(cache))
    monkeypatch.setenv(edge.CATALOG_ENV, catalog.model_dump_json())
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
    with TestClient(edge.create_app()) as client:
        assert client.post("/v2/models/digits/versions/int8/infer", json=body).status_code == 200
    # Cached files and bundle.json changed together after the parent's check: a worker starting now
    # does not take the new bundle.json's word for the new bytes.
    poison(cache / digest.removeprefix("sha256:"))
    with pytest.raises(ConfigError, match="digits/2/model.onnx: sha256 does not match"):
        edge.create_app()


def test_a_damaged_local_source_is_named_when_its_cached_copy_is_served(exported, tmp_path, monkeypatch, caplog):
    target, digest = exported
    cache = tmp_path / "cache"
    bundle.pull(str(target), cache, digest)
    with (target / "digits/2/model.onnx").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    edge_main(monkeypatch, str(target), "--cache", str(cache))
    assert "is damaged (digits/2/model.onnx: sha256 does not match bundle.json)" in caplog.text
    assert "every file verified" not in caplog.text
    # With nothing cached, the same source is refused naming the file.
    with pytest.raises(ConfigError, match="digits/2/model.onnx: sha256 does not match bundle.json"):
        edge_main(monkeypatch, str(target), "--cache", str(tmp_path / "empty"))


def test_a_pinned_cached_bundle_starts_without_its_source(exported, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="raypipe")
    target, digest = exported
    cache = tmp_path / "cache"
    edge_main(monkeypatch, str(target), "--digest", digest, "--cache", str(cache))
    # An S3 endpoint nobody listens on: never asked.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    catalog = edge_main(monkeypatch, "s3://gone/digits-v1", "--digest", digest, "--cache", str(cache))
    assert "s3://gone/digits-v1 not read" in caplog.text
    assert catalog.models["digits"].versions["int8"].uri.startswith(str(cache))
    wrong = "sha256:" + "1" * 64
    with pytest.raises(ConfigError, match=f"is not the expected {wrong}"):
        edge_main(monkeypatch, str(target), "--digest", wrong, "--cache", str(cache))
    with pytest.raises(ConfigError, match=r"--digest: pinned digest 'sha256:../x' is not"):
        edge_main(monkeypatch, str(target), "--digest", "sha256:../x", "--cache", str(cache))


def test_edge_starts_offline_from_the_cache_when_pinned(exported, tmp_path):
    target, digest = exported
    cache = tmp_path / "cache"
    bundle.pull(str(target), cache, digest)
    shutil.rmtree(target)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "raypipe", "edge", str(target), "--digest", digest, "--cache", str(cache),
         "--port", str(port), "--workers", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}/v2/models/digits/versions/int8/ready")
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=40)
    assert process.returncode == 0


# ---- pins on Serve's builder ------------------------------------------------------------------------

def test_sources_pinned_by_digest(exported, tmp_path):
    from raypipe.serving.app import ServeArgs, build_app

    target, digest = exported
    run = make_run(tmp_path / "runs2")
    pins = {str(target): digest, str(run): manifest_digest(run)}
    assert set(open_sources([str(target)], digests=pins).models) == {"digits"}
    assert set(open_sources([str(run)], digests=pins).models) == {"digits"}
    report = json.loads((run / "report.json").read_text())
    report["variants"][1]["test_accuracy"] = 0.99
    (run / "report.json").write_text(json.dumps(report))
    RunPaths.open(str(run)).seal()  # resealed: whole again, but not the run that was pinned
    with pytest.raises(ConfigError, match="MANIFEST.json: digest sha256:[0-9a-f]+ is not the expected"):
        open_sources([str(run)], digests=pins)
    with pytest.raises(ConfigError, match=f"{target}/bundle.json: digest .* is not the expected"):
        build_app({"sources": [str(target)], "digests": {str(target): "sha256:" + "0" * 64}})
    with pytest.raises(ValueError, match="digests./elsewhere: not one of the sources"):
        ServeArgs.model_validate({"sources": [str(target)], "digests": {"/elsewhere": digest}})
    with pytest.raises(ValueError, match="is not 'sha256:' and 64"):
        ServeArgs.model_validate({"sources": [str(target)], "digests": {str(target): digest.upper()}})


def test_a_run_is_parsed_from_the_bytes_that_were_checked(tmp_path, monkeypatch):
    """report.json replaced just after it was read (and hashed): what is served is what was checked."""
    from fsspec.implementations.local import LocalFileSystem

    run = make_run(tmp_path / "runs")
    swapped = json.loads((run / "report.json").read_text())
    swapped["config"]["name"] = "other"
    opens = []
    real_open = LocalFileSystem._open

    def open_then_swap(self, path, *args, **kwargs):
        if path.endswith("report.json"):
            opens.append(path)
            if len(opens) == 2:
                Path(path).write_text(json.dumps(swapped))
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", open_then_swap)
    assert list(open_sources([str(run)]).models) == ["digits"]


# ---- names that become paths ------------------------------------------------------------------------

def test_a_run_whose_name_climbs_out_is_refused_naming_the_field(tmp_path):
    run = make_run(tmp_path / "runs", name="../../x")
    with pytest.raises(ConfigError, match=r"report.json: config.name: String should match pattern .* \(got '../../x'\)"):
        open_sources([str(run)])
    done = raypipe("export", str(run), "--to", str(tmp_path / "out" / "b"), timeout=60)
    assert done.returncode == 2 and "report.json: config.name" in done.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "out").exists()


def test_a_variant_name_with_a_slash_is_refused(tmp_path):
    run = make_run(tmp_path / "runs")
    report = json.loads((run / "report.json").read_text())
    report["variants"][1]["name"] = "int8/../../fp32"
    (run / "report.json").write_text(json.dumps(report))
    RunPaths.open(str(run)).seal()
    with pytest.raises(ConfigError, match=r"report.json: variants.1.name: String should match pattern"):
        open_sources([str(run)])


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["models"].update({"a/b": m["models"].pop("digits")}), "models: key 'a/b'"),
    (lambda m: m["models"]["digits"]["versions"].update({"../v": m["models"]["digits"]["versions"]["int8"]}),
     "models.digits.versions: key '../v'"),
    (lambda m: m["models"]["digits"].update(promoted="x/y"), "models.digits.promoted"),
])
def test_a_bundle_name_that_would_break_paths_is_refused(exported, tmp_path, edit, field):
    target, _ = exported
    manifest = json.loads((target / "bundle.json").read_text())
    edit(manifest)
    (target / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"bundle.json: {field}"):
        open_sources([str(target)])
    with pytest.raises(ConfigError, match=f"bundle.json: {field}"):
        bundle.pull(str(target), tmp_path / "cache")


# ---- re-compressing a sealed run --------------------------------------------------------------------

def test_recompressing_with_a_name_differing_only_in_case_is_refused(tmp_path):
    run = make_run(tmp_path / "runs")
    before = (run / "config.yaml").read_bytes()
    done = raypipe("compress", str(run), "--set", "compress.recipes={INT8: [quantize]}", timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "compress.recipes.INT8: another variant has this name but for case" in done.stderr
    assert (run / "config.yaml").read_bytes() == before and (run / "MANIFEST.json").exists()
