"""The compress stage: recipes of steps turn the trained model into variants; each is evaluated and guarded.

A recipe (`compress.recipes`) is an ordered list of steps, run on the best checkpoint:
- `prune`: structured pruning with torch-pruning. Whole neurons and channels with the smallest weights
  (L2) go, with every layer that depends on them (the next layer's inputs, batch norms, both sides of a
  residual add), so the network itself shrinks; the classifier keeps its outputs. `ratio` is the fraction
  of parameters removed: the per-layer fraction of channels that reaches it is found by bisection.
- `finetune`: recovers accuracy on Ray Train with the train stage's own loop, data, workers, precision and
  checkpointing (under compress/<variant>/checkpoints/).
- `quantize`: ONNX Runtime int8, the maintained path (not the deprecated `torch.ao.quantization` eager
  API): `static` QDQ, int8 weights per output channel and uint8 activations calibrated on train rows;
  `dynamic` int8 weights with activations quantized per call (Linear-only models).
Every variant ends as an ONNX file taking raw inputs (the standardization is inside). `fp32`, the trained
model as it is, is always built: the guard's baseline. Recipes that begin with the same steps share them.

The guard and promotion decide on validation accuracy: the test split is scored too, and reported, but no
choice looks at it, so the promoted variant's test accuracy is an unbiased estimate.
"""

from __future__ import annotations

import copy
import json
import logging
import posixpath
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import ray.data
import torch
import torch_pruning as tp
from onnxruntime.quantization import (
    CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static,
)
from torch import nn

from raypipe import console, evaluate, models, train
from raypipe.config import Config, FinetuneStep, PruneStep, QuantizeStep, step_as_config
from raypipe.records import DataStats, Variant
from raypipe.storage import RunPaths, sha256_bytes

log = logging.getLogger("raypipe")

INPUT, OUTPUT = "input", "logits"
FINETUNES = "compress"  # <run>/compress/<variant>-<digest>/checkpoints/: each finetune's own
OPSET = 18
PROMOTE_KEYS = {
    "smallest": lambda v: (v.size_bytes, -v.val_accuracy),
    "most_accurate": lambda v: (-v.val_accuracy, v.size_bytes),
}


def export_onnx(model: nn.Module, features: int) -> bytes:
    """The fp32 model as ONNX with a dynamic batch dimension (torch's dynamo exporter), slimmed."""
    # The exporter warns for every torchvision op it cannot register (torchvision is not used here) and
    # about a pytree API torch itself still calls: not the user's concern, and not shown.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        program = torch.onnx.export(
            model, (torch.zeros(1, features),), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "model.onnx"
        program.save(str(target))
        return _slim(target.read_bytes())


def _slim(blob: bytes) -> bytes:
    """What a runtime never reads, removed, so the file is the weights and little else: the exporter's
    per-node metadata (source lines and module paths: 6 KB on the digits MLP, more than its int8 biases and
    scales together), doc strings, node names, intermediate shape annotations, and long tensor names,
    renamed t0, t1, ... (the input and output keep theirs). The int8 weights' all-zero zero points stay:
    without them ONNX Runtime no longer fuses the quantized MatMul, and batch 64 runs 2x slower."""
    model = onnx.load_from_string(blob)
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = node.name = ""
    del graph.value_info[:]
    keep = {v.name for v in (*graph.input, *graph.output)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        return name if not name or name in keep else names.setdefault(name, f"t{len(names)}")

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _Calibration(CalibrationDataReader):
    def __init__(self, rows: np.ndarray, batch: int = 64):
        self.batches = iter([{INPUT: rows[i : i + batch]} for i in range(0, len(rows), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(fp32: bytes, calibration: np.ndarray, mode: str = "static") -> bytes:
    """int8 with ONNX Runtime. static: QDQ, int8 weights per output channel and uint8 activations whose
    ranges come from `calibration`; dynamic: int8 weights, activations quantized on the fly per call."""
    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / n for n in ("fp32.onnx", "prep.onnx", "int8.onnx"))
        source.write_bytes(fp32)
        quant_pre_process(str(source), str(prepared))
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(target), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
        else:
            quantize_static(
                str(prepared), str(target), _Calibration(calibration.astype(np.float32)),
                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                # Every op ONNX Runtime has an int8 kernel for (pooling, adds, ...), not only the convolutions
                # and matrix products: tensors stay int8 between them, 1.9x faster than fp32 at batch 64
                # on the conv nets here where convolutions alone gave 1.6x.
                # fp32 biases: the same bytes as int32 ones, without an fp32 scale per output channel beside
                extra_options={"QuantizeBias": False},
            )
        return _slim(target.read_bytes())


def _classifier(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_and_params(model: nn.Module, features: int) -> tuple[int, int]:
    """Multiply-accumulates per sample and parameters of a torch model."""
    macs, params = tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, features))
    return int(macs), int(params)


def widths(model: nn.Module) -> list[int]:
    """Output channels or neurons of each convolution and linear layer but the classifier."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in layers]


def prune(model: nn.Module, ratio: float, features: int) -> nn.Module:
    """A copy of `model` with about `ratio` of its parameters removed as whole neurons and channels (L2
    magnitude, torch-pruning's dependency graph keeping coupled layers consistent). Layers keep a multiple
    of 16 or 8 channels, the blocks CPU kernels work in (AVX-512, AVX2): a conv net cut from [32, 64, 64]
    to [24, 48, 48] channels ran no faster at batch 64 than the whole net, and cut to [16, 48, 48], with
    as many parameters left, 2.4x faster. Of the cuts reachable so, the one whose parameter count comes
    closest to the ratio asked wins (multiples of 16 on a tie)."""
    example = torch.zeros(1, features)
    target = (1 - ratio) * param_count(model)

    def pruned(channel_ratio: float, round_to: int) -> nn.Module:
        copied = copy.deepcopy(model).eval()
        tp.pruner.MetaPruner(copied, example, importance=tp.importance.MagnitudeImportance(p=2), round_to=round_to,
                             pruning_ratio=channel_ratio, ignored_layers=[_classifier(copied)]).step()
        return copied

    candidates = {}  # parameter count -> the first (round_to, channel fraction) giving it
    for round_to in (16, 8):
        for channel_ratio in np.linspace(0.02, 0.95, 32):
            cut = pruned(float(channel_ratio), round_to)
            if min(widths(cut), default=1) > 0:  # a layer narrower than round_to would keep no channel at all
                candidates.setdefault(param_count(cut), (round_to, float(channel_ratio)))
    round_to, channel_ratio = candidates[min(candidates, key=lambda count: abs(count - target))]
    return pruned(channel_ratio, round_to)


class _Builder:
    """Runs recipes' steps, each distinct sequence of leading steps once."""

    def __init__(self, cfg: Config, datasets: dict[str, ray.data.Dataset], stats: DataStats, paths: RunPaths,
                 trained: nn.Module, calibration: np.ndarray, source: str):
        self.cfg, self.datasets, self.stats, self.paths, self.source = cfg, datasets, stats, paths, source
        self.calibration = calibration
        self.models: dict[str, tuple[nn.Module, list[dict]]] = {"[]": (trained, [])}
        self.exports: dict[str, bytes] = {}

    def build(self, name: str, steps: list) -> tuple[bytes, nn.Module, list[dict]]:
        """(ONNX file, the fp32 torch model it comes from, the steps as run) of one recipe."""
        quantize = steps[-1] if steps and isinstance(steps[-1], QuantizeStep) else None
        torch_steps = steps[:-1] if quantize else steps
        for count in range(1, len(torch_steps) + 1):
            key, before = self._key(torch_steps[:count]), self._key(torch_steps[: count - 1])
            if key not in self.models:
                model, done = self.models[before]
                self.models[key] = self._run(name, torch_steps[count - 1], model, done)
        key = self._key(torch_steps)
        model, done = self.models[key]
        if key not in self.exports:
            self.exports[key] = export_onnx(models.with_standardize(model, self.stats), self.stats.features)
        blob = self.exports[key]
        if quantize:
            blob = quantize_int8(blob, self.calibration, quantize.mode)
            done = [*done, step_as_config(quantize)]
        return blob, model, done

    @staticmethod
    def _key(steps: list) -> str:
        return json.dumps([step_as_config(s) for s in steps])

    def _run(self, name: str, step, model: nn.Module, done: list[dict]) -> tuple[nn.Module, list[dict]]:
        features = self.stats.features
        if isinstance(step, PruneStep):
            pruned = prune(model, step.ratio, features)
            before, after = param_count(model), param_count(pruned)
            log.info("compress: %s: widths %s -> %s, parameters %d -> %d", name, widths(model), widths(pruned),
                     before, after)
            kept = {"widths": widths(pruned), "params_kept": round(after / before, 4)}
            return pruned, [*done, {"prune": {"ratio": step.ratio, **kept}}]
        assert isinstance(step, FinetuneStep)
        return self._finetune(name, step, model, done)

    def _finetune(self, name: str, step: FinetuneStep, model: nn.Module,
                  done: list[dict]) -> tuple[nn.Module, list[dict]]:
        lr = step.lr or self.cfg.train.lr
        tcfg = self.cfg.train.model_copy(update={"epochs": step.epochs, "lr": lr, "warmup_epochs": 0.0})
        cfg = self.cfg.model_copy(update={"train": tcfg})
        # Named by everything it depends on (the trained checkpoint, the steps before it, the training settings),
        # so that the same finetune finds (and resumes, or reuses) its own checkpoints and no other ever does:
        # two finetunes in one recipe, a recipe replaced by another, a model trained further since.
        depends = [self.source, done, step_as_config(step), tcfg.model_dump(mode="json")]
        folder = f"{FINETUNES}/{name}-{sha256_bytes(json.dumps(depends).encode())[:8]}"
        summary = train.fit(cfg, self.datasets, self.stats, self.paths, model=model, folder=folder,
                            label=f"compress: {name} finetune epoch")
        tuned = train.load_model(cfg, self.stats, self.paths, summary.checkpoint, model=copy.deepcopy(model))
        record = {"finetune": {"epochs": step.epochs, "lr": lr, "best_epoch": summary.best_epoch,
                               "val_accuracy": round(summary.best_val_accuracy, 4),
                               "checkpoint": self.paths.child_uri(summary.checkpoint)}}
        return tuned, [*done, record]


def _rows(dataset: ray.data.Dataset, limit: int) -> np.ndarray:
    batches = dataset.limit(limit).iter_batches(batch_size=None, batch_format="numpy")
    return np.concatenate([b["x"] for b in batches]).astype(np.float32)


def run(cfg: Config, checkpoint: str, datasets: dict[str, ray.data.Dataset], stats: DataStats, paths: RunPaths,
        kept: dict[str, Variant] | None = None) -> list[Variant]:
    """Build, evaluate and store fp32 and every recipe but the variants `kept` from an earlier compress of
    the run (their files stay; they are timed again beside the rest). Returns every variant's record, fp32
    first, in the config's order; the guard is the caller's."""
    kept = kept or {}
    trained = train.load_model(cfg, stats, paths, checkpoint)
    recipes = {"fp32": [], **{n: steps for n, steps in cfg.compress.recipes.items() if n not in kept}}
    builder = _Builder(cfg, datasets, stats, paths, trained, _rows(datasets["train"], cfg.compress.calibration_rows),
                       source=paths.sha256(checkpoint)[0])
    sample, built = builder.calibration[:1], {}
    progress = console.Progress(len(recipes), "compress:", log_updates=False)
    for name, steps in recipes.items():
        blob, model, done = builder.build(name, steps)
        macs, params = macs_and_params(model, stats.features)
        built[name] = Variant(
            name=name, format="onnx", uri=paths.child_uri(f"models/{name}/model.onnx"), sha256=sha256_bytes(blob),
            size_bytes=len(blob), val_accuracy=evaluate.accuracy(blob, datasets["val"]),
            test_accuracy=evaluate.accuracy(blob, datasets["test"]), latency_ms={},
            input=INPUT, output=OUTPUT, recipe=done, params=params, macs=macs)
        paths.write_bytes(f"models/{name}/model.onnx", blob)
        progress.update(len(built), f"{name} built and evaluated")
    progress.close()
    for name, variant in kept.items():
        if variant.val_accuracy is None:  # made before validation accuracy was recorded: the guard needs it
            variant.val_accuracy = evaluate.accuracy(paths.read_bytes(f"models/{name}/model.onnx"), datasets["val"])
    variants = [built.get(name) or kept[name] for name in ("fp32", *cfg.compress.recipes)]
    # All timed together at the end, kept ones too, in interleaved rounds: no Ray Data task competes for the
    # CPU then, and what noise there is falls on every variant alike.
    timed = evaluate.latencies({v.name: paths.read_bytes(f"models/{v.name}/model.onnx") for v in variants},
                               sample, cfg.compress.latency_repeats)
    for variant in variants:
        figures = timed[variant.name]
        variant.latency_spread = figures.pop("batch_64_spread")
        variant.latency_ms = figures
    for variant in variants:
        variant.size_ratio = round(variants[0].size_bytes / variant.size_bytes, 3)
        variant.speedup_b64 = round(variants[0].latency_ms["batch_64"] / variant.latency_ms["batch_64"], 3)
    _forget_finetunes(paths, variants)
    return variants


def _forget_finetunes(paths: RunPaths, variants: list[Variant]) -> None:
    """Remove the checkpoints of finetunes that no variant comes from any more (replaced recipes). Folders
    are matched by name, not by whole URI: a run copied or moved elsewhere still knows its own."""
    used = {_finetune_folder(step["finetune"]["checkpoint"]).split("/")[0]
            for v in variants for step in v.recipe if "finetune" in step}
    if paths.exists(FINETUNES):
        for name in (posixpath.basename(folder.rstrip("/")) for folder in paths.fs.ls(paths.path(FINETUNES),
                                                                                       detail=False)):
            if name not in used:
                paths.remove(f"{FINETUNES}/{name}")


def _finetune_folder(checkpoint: str) -> str:
    """`<variant>-<digest>/checkpoints/...` of a finetune checkpoint's URI, wherever the run lives."""
    return checkpoint.rpartition(f"/{FINETUNES}/")[2]


def relocate(variant: Variant, paths: RunPaths) -> Variant:
    """A variant record read back from `paths`, its URIs (the model file, its finetunes' checkpoints) made
    from where the run is now: a run copied or moved elsewhere still names its own files."""
    recipe = copy.deepcopy(variant.recipe)
    for step in recipe:
        if "finetune" in step:
            folder = _finetune_folder(step["finetune"]["checkpoint"])
            step["finetune"]["checkpoint"] = paths.child_uri(f"{FINETUNES}/{folder}")
    return variant.model_copy(update={"uri": paths.child_uri(f"models/{variant.name}/model.onnx"), "recipe": recipe})


def guard(variants: list[Variant], max_drop: float) -> None:
    """Mark each variant accepted or rejected against the fp32 baseline's validation accuracy (the test
    split stays out of every decision)."""
    baseline = next(v for v in variants if v.name == "fp32").val_accuracy
    for variant in variants:
        drop = baseline - variant.val_accuracy
        variant.accepted = drop <= max_drop + 1e-12
        variant.reason = (
            "baseline" if variant.name == "fp32"
            else f"validation accuracy drop {drop:.4f} <= {max_drop}" if variant.accepted
            else f"validation accuracy drop {drop:.4f} exceeds compress.max_accuracy_drop {max_drop}"
        )


def promote(variants: list[Variant], by: str = "smallest") -> str:
    """The accepted variant that is smallest, fastest at batch 64, or most accurate on the validation split
    (fp32 is always accepted); ties go to the more accurate, then the smaller. For `fastest`, variants whose
    latency is within the measured noise of the fastest one's (the largest `latency_spread`, at least 5%)
    count as equally fast: a timing blip never decides."""
    accepted = [v for v in variants if v.accepted]
    if by == "fastest":
        best = min(v.latency_ms["batch_64"] for v in accepted)
        noise = max([0.05, *(v.latency_spread for v in accepted)])
        accepted = [v for v in accepted if v.latency_ms["batch_64"] <= best * (1 + noise)]
        return min(accepted, key=PROMOTE_KEYS["most_accurate"]).name
    return min(accepted, key=PROMOTE_KEYS[by]).name
