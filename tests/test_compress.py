"""Compression: recipes of steps, structured pruning that really shrinks, int8 that is about 4x smaller,
the guard and promotion, re-compressing a sealed run, and variant files that stand on their own.

The pure parts run in this process (no Ray); the rest reads the session's smoke run or runs `raypipe` in a
subprocess on a copy of it (its own embedded Ray, one at a time).
"""

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
import torch
import yaml

from raypipe import compress, config, models, report
from raypipe.config import ModelConfig
from raypipe.records import Variant
from raypipe.storage import RunPaths
from tests.conftest import REPO, data_stats, free_port, raypipe

ARCHS = {
    "mlp": (ModelConfig(arch="mlp", hidden=[256, 128]), [64]),
    "cnn": (ModelConfig(arch="cnn", channels=[32, 64, 64]), [3, 32, 32]),
    "resnet": (ModelConfig(arch="resnet", channels=[16, 32, 64]), [3, 32, 32]),
}


def _model(arch: str):
    torch.manual_seed(0)
    cfg, shape = ARCHS[arch]
    stats = data_stats(shape, mean=100.0, std=50.0)
    return models.build(cfg, stats).eval(), stats


@pytest.mark.parametrize(("recipes", "needle"), [
    ("{x: [prun: {ratio: 0.5}]}", "compress.recipes.x.0: unknown step 'prun' (steps: prune, finetune, quantize)"),
    ("{x: [prune: {ratoi: 0.5}]}", "compress.recipes.x.0.prune.ratoi: unknown key"),
    ("{x: [prune: {ratio: 1.5}]}", "compress.recipes.x.0.prune.ratio: Input should be less than 1"),
    ("{x: [quantize, prune: {ratio: 0.5}]}", "compress.recipes.x.0: quantize must be the last step"),
    ("{fp32: [quantize]}", "compress.recipes.fp32: a variant name is"),
    ("{x: [finetune: {epochs: 0}]}", "compress.recipes.x.0.finetune.epochs: Input should be greater than"),
    ("{x: [finetune: {lr: .inf}]}", "compress.recipes.x.0.finetune.lr: Input should be a finite number"),
    ("{a.b: [quantize]}", "compress.recipes.a.b: a variant name is up to 64 letters"),
    ("{Int8: [quantize], int8: [quantize]}", "compress.recipes.int8: another variant has this name but for case"),
])
def test_a_bad_recipe_exits_2_naming_the_key(recipes, needle):
    done = raypipe("run", "--set", f"compress.recipes={recipes}", timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("raypipe: error: "), done.stderr
    assert needle in lines[0], lines[0]


def test_dynamic_int8_is_refused_on_convolutions():
    done = raypipe("run", "--set", "model.arch=cnn", "--set", "compress.recipes={x: [quantize: {mode: dynamic}]}",
                   timeout=60)
    assert done.returncode == 2
    assert "compress.recipes.x.0.quantize.mode: dynamic is for Linear-only models" in done.stderr, done.stderr


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_really_shrinks_the_network(arch):
    model, stats = _model(arch)
    macs, params = compress.macs_and_params(model, stats.features)
    full = compress.export_onnx(models.with_standardize(model, stats), stats.features)
    pruned = compress.prune(model, 0.5, stats.features)
    pruned_macs, pruned_params = compress.macs_and_params(pruned, stats.features)
    small = compress.export_onnx(models.with_standardize(pruned, stats), stats.features)
    # About half: whole channels in multiples of 8 cannot hit 50% exactly.
    assert 0.4 <= pruned_params / params <= 0.62, pruned_params / params
    # MACs fall less where the early, full-resolution layers are already narrow (the ResNet's 16 channels).
    assert pruned_macs / macs <= 0.7, pruned_macs / macs
    assert 0.4 <= len(small) / len(full) <= 0.62, len(small) / len(full)
    before, after = compress.widths(model), compress.widths(pruned)
    assert len(after) == len(before) and all(0 < w <= b and w % 8 == 0 for w, b in zip(after, before)), after
    # A smaller graph, not a masked one: fewer weights in the file, the same classes out.
    weights = sum(int(np.prod(t.dims)) for t in onnx.load_from_string(small).graph.initializer)
    assert weights < 0.65 * sum(int(np.prod(t.dims)) for t in onnx.load_from_string(full).graph.initializer)
    x = torch.rand(3, stats.features) * 255
    assert models.with_standardize(pruned, stats)(x).shape == (3, 10)
    assert compress.macs_and_params(compress.prune(model, 0.9, stats.features), stats.features)[1] < 0.2 * params


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_int8_is_about_four_times_smaller_and_carries_no_exporter_metadata(arch):
    model, stats = _model(arch)
    fp32 = compress.export_onnx(models.with_standardize(model, stats), stats.features)
    rows = np.random.default_rng(0).uniform(0, 255, (128, stats.features)).astype(np.float32)
    int8 = compress.quantize_int8(fp32, rows)
    assert len(fp32) / len(int8) >= 3.5, len(fp32) / len(int8)
    for blob in (fp32, int8):
        graph = onnx.load_from_string(blob).graph
        assert not any(node.metadata_props or node.doc_string for node in graph.node)
        assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    if arch == "cnn":  # per-channel standardization: C numbers in the file, not C x H x W
        sizes = [int(np.prod(t.dims)) for t in onnx.load_from_string(fp32).graph.initializer]
        assert 3 in sizes and stats.features not in sizes


def test_dynamic_int8_quantizes_a_linear_model():
    model, stats = _model("mlp")
    fp32 = compress.export_onnx(models.with_standardize(model, stats), stats.features)
    dynamic = compress.quantize_int8(fp32, np.zeros((1, 64), np.float32), mode="dynamic")
    ops = {node.op_type for node in onnx.load_from_string(dynamic).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops, ops
    assert len(fp32) / len(dynamic) >= 3


def _variant(name, accuracy, size, b64, test_accuracy=None):
    return Variant(name=name, format="onnx", uri=name, sha256="0", size_bytes=size, val_accuracy=accuracy,
                   test_accuracy=accuracy if test_accuracy is None else test_accuracy,
                   latency_ms={"batch_1": 1.0, "batch_64": b64})


def test_promote_picks_among_accepted_variants_by_the_rule():
    variants = [_variant("fp32", 0.95, 400, 10.0), _variant("int8", 0.945, 100, 5.0),
                _variant("pruned", 0.95, 200, 4.0), _variant("tiny", 0.70, 20, 1.0)]
    compress.guard(variants, max_drop=0.01)
    assert [v.accepted for v in variants] == [True, True, True, False]
    assert "exceeds compress.max_accuracy_drop 0.01" in variants[3].reason
    assert compress.promote(variants, "smallest") == "int8"
    assert compress.promote(variants, "fastest") == "pruned"
    assert compress.promote(variants, "most_accurate") == "pruned"  # as accurate as fp32, and smaller
    front = report.pareto_front([v.model_dump() for v in variants])
    assert front == {"int8", "pruned", "tiny"}  # fp32 is beaten by pruned: as accurate, faster, smaller


def test_fastest_is_decided_only_beyond_the_measured_noise():
    fast, close = _variant("int8", 0.94, 100, 4.0), _variant("pruned", 0.95, 200, 4.1)
    variants = [_variant("fp32", 0.95, 400, 10.0), fast, close]
    compress.guard(variants, max_drop=0.02)
    # 2.5% apart: within the 5% floor, so equally fast, and the more accurate one wins.
    assert compress.promote(variants, "fastest") == "pruned"
    close.latency_ms["batch_64"] = 4.4  # 10% slower: beyond the noise
    assert compress.promote(variants, "fastest") == "int8"
    fast.latency_spread = 0.15  # but timings that wandered 15% cannot tell them apart
    assert compress.promote(variants, "fastest") == "pruned"


def test_latencies_are_timed_in_interleaved_rounds_with_their_spread():
    from raypipe import evaluate

    torch.manual_seed(0)
    stats = data_stats([1, 8, 8], mean=4.0, std=6.0)
    small = compress.export_onnx(models.with_standardize(models.build(ModelConfig(hidden=[8]), stats), stats), 64)
    large = compress.export_onnx(models.with_standardize(models.build(ModelConfig(hidden=[1024, 1024]), stats), stats), 64)
    timed = evaluate.latencies({"small": small, "large": large}, np.ones((1, 64), np.float32), repeats=10)
    assert set(timed["small"]) == {"batch_1", "batch_64", "batch_64_spread"}
    assert timed["large"]["batch_64"] > timed["small"]["batch_64"] > 0
    assert timed["small"]["batch_64_spread"] >= 0


def test_the_guard_and_promotion_decide_on_validation_and_never_look_at_test():
    # Test figures that would reverse every decision: only the validation ones may count.
    variants = [_variant("fp32", 0.95, 400, 10.0, test_accuracy=0.80),
                _variant("int8", 0.90, 100, 5.0, test_accuracy=0.99),
                _variant("pruned", 0.96, 200, 4.0, test_accuracy=0.70)]
    compress.guard(variants, max_drop=0.01)
    assert [v.accepted for v in variants] == [True, False, True]
    assert variants[1].reason == "validation accuracy drop 0.0500 exceeds compress.max_accuracy_drop 0.01"
    assert compress.promote(variants, "most_accurate") == "pruned"
    assert compress.promote(variants, "smallest") == "pruned"
    # A record written before validation accuracy was recorded still opens.
    old = Variant.model_validate({k: v for k, v in variants[0].model_dump().items() if k != "val_accuracy"})
    assert old.val_accuracy is None and old.test_accuracy == 0.80


def test_a_kept_variant_names_the_files_of_the_run_it_is_in_now(tmp_path):
    from raypipe import pipeline

    run = tmp_path / "moved" / "digits-20260101-000000-abcdef"
    (run / "models/pruned").mkdir(parents=True)
    (run / "models/pruned/model.onnx").write_bytes(b"onnx")
    first = "/where/it/was/made/digits-20260101-000000-abcdef"
    recipe = [{"prune": {"ratio": 0.5}},
              {"finetune": {"epochs": 1, "checkpoint": f"{first}/compress/pruned-0123abcd/checkpoints/best/x.pt"}}]
    record = _variant("pruned", 0.9, 4, 1.0).model_copy(update={
        "uri": f"{first}/models/pruned/model.onnx", "sha256": hashlib.sha256(b"onnx").hexdigest(), "recipe": recipe})
    (run / "models/pruned/meta.json").write_text(record.model_dump_json())
    kept = pipeline._kept(RunPaths.open(str(run)), "pruned")
    assert kept.uri == f"{run}/models/pruned/model.onnx"
    assert kept.recipe[1]["finetune"]["checkpoint"] == f"{run}/compress/pruned-0123abcd/checkpoints/best/x.pt"


def test_recompress_names_the_recipes_set_and_reads_runs_made_before_recipes():
    assert config.recipes_named({"compress.recipes": {"a": ["quantize"], "b": ["quantize"]}}) == ["a", "b"]
    assert config.recipes_named({"compress.recipes.c": ["quantize"], "train.lr": 0.1}) == ["c"]
    assert config.recipes_named({"compress.promote": "fastest"}) is None
    assert config.recipes_named({"compress.recipes": {}}) == []  # names none: keeps every variant there is
    assert config.recipes_named({"compress": {"recipes": {"d": ["quantize"]}}}) == ["d"]
    old = {"compress": {"int8": True, "max_accuracy_drop": 0.02}}
    assert config.validate(config.upgrade(old)).compress.recipes.keys() == {"int8"}
    assert config.validate(config.upgrade({"compress": {"int8": False}})).compress.recipes == {}
    # An old report (no ratios, recipes or counts) still prints its summary.
    variant = {"name": "fp32", "size_bytes": 2048, "test_accuracy": 0.9, "accepted": True, "reason": "baseline",
               "latency_ms": {"batch_1": 0.01, "batch_64": 0.1}}
    summary = report.summary({"run_id": "r", "uri": "/r", "promoted": "fp32", "variants": [variant],
                              "data": {"rows_read": 1, "rows_dropped": {}, "rows": {"train": 1}},
                              "train": {"epochs": 1, "workers": 1, "device": "cpu", "precision": "fp32",
                                        "restarts": 0, "best_epoch": 1,
                                        "history": [{"epoch": 1, "val_accuracy": 0.9}]}})
    assert "fp32 *" in summary and "      -" in summary


def test_every_variant_reports_its_recipe_size_and_speed(smoke_run):
    variants = {v["name"]: v for v in smoke_run.report()["variants"]}
    assert list(variants) == ["fp32", "int8", "pruned", "pruned-int8"]
    fp32, int8, pruned, both = (variants[n] for n in ("fp32", "int8", "pruned", "pruned-int8"))
    assert fp32["recipe"] == [] and int8["recipe"] == [{"quantize": {"mode": "static"}}]
    assert [list(step) for step in pruned["recipe"]] == [["prune"], ["finetune"]]
    tuned = pruned["recipe"][1]["finetune"]
    assert tuned["epochs"] == 2 and 0 < tuned["val_accuracy"] <= 1  # --smoke-test: finetunes of 2 epochs
    # The finetune's own Ray Train checkpoints, in a folder named by the recipe and a digest of its steps.
    best = list((smoke_run.path / "compress").glob("pruned-*/checkpoints/best/checkpoint.pt"))
    assert len(best) == 1 and tuned["checkpoint"] == str(best[0])
    assert both["recipe"][:2] == pruned["recipe"]  # the shared steps ran once
    assert int8["params"] == fp32["params"] > 0 and int8["macs"] == fp32["macs"] > 0
    assert 0.4 <= pruned["params"] / fp32["params"] <= 0.62 and pruned["macs"] < 0.7 * fp32["macs"]
    assert pruned["recipe"][0]["prune"]["params_kept"] == pytest.approx(pruned["params"] / fp32["params"], abs=1e-3)
    for v in variants.values():
        assert v["size_ratio"] == pytest.approx(fp32["size_bytes"] / v["size_bytes"], abs=1e-3)
        assert v["speedup_b64"] == pytest.approx(fp32["latency_ms"]["batch_64"] / v["latency_ms"]["batch_64"],
                                                 abs=1e-3)
    assert int8["size_ratio"] >= 3.4 and both["size_ratio"] >= 5
    markdown = (smoke_run.path / "report.md").read_text()
    assert "| pruned-int8" in markdown and "prune 0.5, finetune 2, quantize static" in markdown
    assert "{'" not in markdown  # counts by reason as words, not Python dicts
    for v in variants.values():  # decided on validation, reported on test: both figures are there
        assert 0 < v["val_accuracy"] <= 1 and 0 < v["test_accuracy"] <= 1


RECOUNT = """
import json, sys
from pathlib import Path
import numpy as np, onnxruntime as ort, pyarrow.parquet as pq
run = Path(sys.argv[1])
x, y = [], []
for shard in sorted((run / "data/test").glob("*.parquet")):
    table = pq.read_table(shard)
    x += list(table.column("x").to_numpy(zero_copy_only=False))
    y += list(table.column("label").to_numpy())
x, y = np.stack(x).astype(np.float32), np.array(y)
accuracy = {}
for model in sorted((run / "models").glob("*/model.onnx")):
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x})[0]
    accuracy[model.parent.name] = float((logits.argmax(1) == y).mean())
print(json.dumps({"accuracy": accuracy, "imported": sorted(m for m in ("torch", "ray") if m in sys.modules)}))
"""


def test_each_variant_file_predicts_alone_and_recounts_its_reported_accuracy(smoke_run):
    done = subprocess.run([sys.executable, "-c", RECOUNT, str(smoke_run.path)], capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    recount = json.loads(done.stdout)
    assert recount["imported"] == []  # onnxruntime alone: neither torch nor ray
    reported = {v["name"]: v["test_accuracy"] for v in smoke_run.report()["variants"]}
    assert recount["accuracy"].keys() == reported.keys()
    for name, accuracy in reported.items():
        assert recount["accuracy"][name] == pytest.approx(accuracy, abs=1e-9), name


def test_a_variant_whose_file_no_longer_matches_its_record_is_built_again(smoke_run, tmp_path):
    from raypipe import pipeline

    run = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, run)
    paths = RunPaths.open(str(run))
    assert pipeline._kept(paths, "int8").sha256 == smoke_run.report()["variants"][1]["sha256"]
    # A compress that failed half way: the new file written, its record not yet.
    (run / "models/int8/model.onnx").write_bytes((run / "models/pruned-int8/model.onnx").read_bytes())
    assert pipeline._kept(paths, "int8") is None
    assert pipeline._kept(paths, "absent") is None


def test_recompress_adds_a_variant_the_guard_rejects_and_never_serves(smoke_run, tmp_path):
    run = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, run)
    before = {v["name"]: v for v in smoke_run.report()["variants"]}
    files = {name: (run / f"models/{name}/model.onnx").stat().st_ino for name in before}
    # int8 as a run made before validation accuracy was recorded stores it: measured now, for the guard.
    meta = json.loads((run / "models/int8/meta.json").read_text())
    del meta["val_accuracy"]
    (run / "models/int8/meta.json").write_text(json.dumps(meta))
    done = raypipe("compress", str(run), "--set", "compress.recipes={extreme: [prune: {ratio: 0.9}]}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(run)
    after = json.loads((run / "report.json").read_text())
    variants = {v["name"]: v for v in after["variants"]}
    assert list(variants) == ["fp32", "int8", "pruned", "pruned-int8", "extreme"]
    extreme = variants["extreme"]
    assert not extreme["accepted"] and "exceeds compress.max_accuracy_drop" in extreme["reason"]
    assert extreme["params"] < 0.2 * variants["fp32"]["params"]
    assert after["promoted"] != "extreme" and variants[after["promoted"]]["accepted"]
    for name in ("int8", "pruned", "pruned-int8"):  # kept as they were, not rebuilt (a write renames a new file in)
        assert (run / f"models/{name}/model.onnx").stat().st_ino == files[name], name
        assert variants[name]["sha256"] == before[name]["sha256"]
        assert variants[name]["test_accuracy"] == before[name]["test_accuracy"]
        assert variants[name]["val_accuracy"] == pytest.approx(before[name]["val_accuracy"], abs=1e-9)
        assert variants[name]["uri"] == f"{run}/models/{name}/model.onnx"  # the copy's file, not the original's
    checkpoint = variants["pruned"]["recipe"][1]["finetune"]["checkpoint"]
    assert checkpoint.startswith(f"{run}/compress/pruned-") and Path(checkpoint).is_file()
    assert (run / "models/fp32/model.onnx").stat().st_ino != files["fp32"]  # the baseline is rebuilt and retimed
    assert list((run / "compress").glob("pruned-*/checkpoints/best/checkpoint.pt"))  # still what pruned came from
    assert RunPaths.open(str(run)).verify() == []  # re-sealed: the manifest vouches for every file again
    recipes = yaml.safe_load((run / "config.yaml").read_text())["compress"]["recipes"]
    assert list(recipes) == ["int8", "pruned", "pruned-int8", "extreme"]
    # The edge server (the same REST app, no Ray) serves the accepted variants and not this one.
    port = free_port()
    edge = subprocess.Popen([sys.executable, "-m", "raypipe", "edge", str(run), "--port", str(port), "--workers", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}/v2/models/digits"
        for _ in range(120):
            try:
                if requests.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert edge.poll() is None, edge.stderr.read()
            time.sleep(0.5)
        versions = requests.get(base, timeout=5).json()["versions"]
        assert "extreme" not in versions and "int8" in versions
        assert requests.get(f"{base}/versions/extreme/ready", timeout=5).status_code == 404
    finally:
        edge.terminate()
        edge.communicate(timeout=30)
