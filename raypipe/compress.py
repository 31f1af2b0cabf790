"""The compress stage: build variants from the best checkpoint, evaluate each, guard, promote.

Variants are ONNX files that take raw inputs. `fp32` is the trained model exported as it is; `int8` is
statically quantized with ONNX Runtime (QDQ, per-channel weights, activation ranges calibrated on train
rows) - the maintained path, not the deprecated `torch.ao.quantization` eager API. The guard rejects a
variant whose test accuracy falls more than `compress.max_accuracy_drop` below fp32's; the smallest
accepted variant is promoted.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import ray.data
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from raypipe import console, evaluate, models, train
from raypipe.config import Config
from raypipe.records import DataStats, Variant
from raypipe.storage import RunPaths, sha256_bytes

log = logging.getLogger("raypipe")

INPUT, OUTPUT = "input", "logits"
OPSET = 18


def export_onnx(model: torch.nn.Module, features: int) -> bytes:
    """The fp32 model as ONNX with a dynamic batch dimension (torch's dynamo exporter)."""
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
        onnx.checker.check_model(str(target))
        return target.read_bytes()


class _Calibration(CalibrationDataReader):
    def __init__(self, rows: np.ndarray, batch: int = 64):
        self.batches = iter([{INPUT: rows[i : i + batch]} for i in range(0, len(rows), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(fp32: bytes, calibration: np.ndarray) -> bytes:
    """Static int8 (QDQ): int8 weights per output channel, uint8 activations calibrated on `calibration`."""
    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / n for n in ("fp32.onnx", "prep.onnx", "int8.onnx"))
        source.write_bytes(fp32)
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared), str(target), _Calibration(calibration.astype(np.float32)),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        )
        return target.read_bytes()


def _rows(dataset: ray.data.Dataset, limit: int) -> np.ndarray:
    batches = dataset.limit(limit).iter_batches(batch_size=None, batch_format="numpy")
    return np.concatenate([b["x"] for b in batches]).astype(np.float32)


def run(cfg: Config, checkpoint: str, datasets: dict[str, ray.data.Dataset], stats: DataStats,
        paths: RunPaths) -> list[Variant]:
    """Build, evaluate, guard and store every variant; returns their records (meta.json contents)."""
    model = models.with_standardize(train.load_model(cfg, stats, paths, checkpoint), stats)
    names = ["fp32", "int8"] if cfg.compress.int8 else ["fp32"]
    # Steps: export, quantize, then evaluate each variant (accuracy on the test split, latency).
    progress, done = console.Progress(2 * len(names), "compress:", log_updates=False), 0

    def step(note: str) -> None:
        nonlocal done
        done += 1
        progress.update(done, note)

    artifacts = {"fp32": export_onnx(model, stats.features)}
    step("fp32 exported")
    calibration = _rows(datasets["train"], cfg.compress.calibration_rows)
    if cfg.compress.int8:
        artifacts["int8"] = quantize_int8(artifacts["fp32"], calibration)
        step("int8 quantized")

    variants = []
    for name, blob in artifacts.items():
        variants.append(Variant(
            name=name, format="onnx", uri=paths.child_uri(f"models/{name}/model.onnx"), sha256=sha256_bytes(blob),
            size_bytes=len(blob), test_accuracy=evaluate.accuracy(blob, datasets["test"]),
            latency_ms=evaluate.latency_ms(blob, calibration[:1], cfg.compress.latency_repeats),
            input=INPUT, output=OUTPUT))
        step(f"{name} evaluated")
    progress.close()
    guard(variants, cfg.compress.max_accuracy_drop)
    for variant, blob in zip(variants, artifacts.values()):
        paths.write_bytes(f"models/{variant.name}/model.onnx", blob)
        variant.write(paths, f"models/{variant.name}/meta.json")
        log.info("compress: %s %.1f KiB, test accuracy %.4f, %s", variant.name, variant.size_bytes / 1024,
                 variant.test_accuracy, "accepted" if variant.accepted else f"rejected: {variant.reason}")
    return variants


def guard(variants: list[Variant], max_drop: float) -> None:
    """Mark each variant accepted or rejected against the fp32 baseline's test accuracy."""
    baseline = next(v for v in variants if v.name == "fp32").test_accuracy
    for variant in variants:
        drop = baseline - variant.test_accuracy
        variant.accepted = drop <= max_drop + 1e-12
        variant.reason = (
            "baseline" if variant.name == "fp32"
            else f"accuracy drop {drop:.4f} <= {max_drop}" if variant.accepted
            else f"accuracy drop {drop:.4f} exceeds compress.max_accuracy_drop {max_drop}"
        )


def promote(variants: list[Variant]) -> str:
    """The smallest accepted variant (fp32 is always accepted)."""
    return min((v for v in variants if v.accepted), key=lambda v: v.size_bytes).name
