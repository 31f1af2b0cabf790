"""The train stage on Ray Train: a TorchTrainer whose workers each stream their own shard.

The per-worker loop follows Ray's idiom: `get_dataset_shard`, `prepare_model` (DDP), a rank-0
checkpoint holding model, optimizer, grad scaler, scheduler, epoch and history, `report` once per epoch,
and resume through `get_checkpoint()`. A worker-group restart after a failure resumes from the latest
checkpoint, so a lost worker costs at most `train.checkpoint_every` epochs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import posixpath
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from raypipe import console, data, models
from raypipe.config import Config, TrainConfig
from raypipe.records import DataStats, TrainSummary
from raypipe.storage import RunPaths

log = logging.getLogger("raypipe")

CHECKPOINT_FILE = "checkpoint.pt"
# The best checkpoint by validation accuracy, kept apart from Ray's rolling last `keep_checkpoints`.
BEST_CHECKPOINT = "checkpoints/best/" + CHECKPOINT_FILE


def best_checkpoint(folder: str = "") -> str:
    """The best checkpoint of a training whose checkpoints live under `folder` of the run ("": the train
    stage; compress/<variant>: a finetune)."""
    return posixpath.join(folder, BEST_CHECKPOINT)


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU (bf16 there is slow on
    most CPUs without AMX); an explicit choice is kept."""
    if precision != "auto":
        return precision
    if device == "cuda" and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor.tolist()


def _with_last(items):
    """(item, is_last) for each item: one item of look-ahead, so the last is known when it comes."""
    iterator = iter(items)
    current = next(iterator, _END := object())
    while current is not _END:
        upcoming = next(iterator, _END)
        yield current, upcoming is _END
        current = upcoming


def lr_factor(progress: float, epochs: int, warmup_epochs: float) -> float:
    """Learning-rate multiplier at `progress` epochs into training: linear warmup, then cosine decay.

    A pure function of progress (not of a step count), so it is exact across resumes and across
    elastic resizes, where the number of steps per epoch changes."""
    if progress < warmup_epochs:
        return (progress + 1e-3) / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup_epochs) / span)))


@ray.remote(num_cpus=0)
class Attempts:
    """Counts the starts of the training function (first start, restarts after failures, resizes), and
    holds each finished epoch's metrics for the driver's progress display."""

    def __init__(self):
        self.worlds: list[int] = []
        self.epochs: list[int] = []
        self.finished: list[dict[str, Any]] = []

    def start(self, world: int, epoch: int) -> None:
        self.worlds.append(world)
        self.epochs.append(epoch)

    def epoch(self, metrics: dict[str, Any]) -> None:
        self.finished.append(metrics)

    def since(self, count: int) -> list[dict[str, Any]]:
        return self.finished[count:]

    def summary(self) -> dict[str, Any]:
        changes = [now != before for before, now in zip(self.worlds, self.worlds[1:])]
        return {"restarts": changes.count(False), "resizes": changes.count(True), "start_epochs": self.epochs,
                "start_workers": self.worlds}


def train_loop_per_worker(loop: dict[str, Any]) -> dict[str, Any]:
    """Runs on every worker. Returns (on rank 0) the history and throughput for the report."""
    cfg = Config.model_validate(loop["config"])
    tcfg, stats = cfg.train, loop["stats"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.rng_seed())
    device = ray.train.torch.get_device()
    precision = resolve_precision(tcfg.precision, device.type)

    # A finetune starts from the model it is given (pruned: its own shape); training from `model.*`.
    model = ray.train.torch.prepare_model(models.build(cfg.model, stats) if loop["model"] is None else loop["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    # A grad scaler only does anything for fp16; it is saved and restored either way.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # The global batch per optimizer step stays `batch_size` whatever the worker count:
    # each worker takes batch_size / (workers x accumulation steps) rows per micro-batch.
    micro_batch = max(1, tcfg.batch_size // (world * tcfg.grad_accum_steps))
    if rank == 0 and micro_batch * world * tcfg.grad_accum_steps != tcfg.batch_size:
        log.warning("train.batch_size %d is not a multiple of %d workers x %d accumulation steps: each optimizer "
                    "step sees %d rows", tcfg.batch_size, world, tcfg.grad_accum_steps,
                    micro_batch * world * tcfg.grad_accum_steps)

    start_epoch, history, best = 0, [], {"epoch": 0, "val_accuracy": -1.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            blob = Path(folder, CHECKPOINT_FILE).read_bytes()
        state = torch.load(io.BytesIO(blob), weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        if rank == 0 and best["epoch"] == start_epoch:
            # Lost after reporting its best checkpoint but before copying it to best/: copy it now.
            keep_best(loop["paths"], loop["best"], blob, start_epoch)
    if rank == 0:
        ray.get(loop["attempts"].start.remote(world, start_epoch))

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = max(1, math.ceil(stats.rows["train"] / (micro_batch * world * tcfg.grad_accum_steps)))
    rates = []
    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        began, loss_sum, seen, step, micro = time.perf_counter(), 0.0, 0, 0, 0
        ingest = data.IngestCollate(stats, cfg.data.augment, cfg.rng_seed(), epoch)
        batches = train_shard.iter_torch_batches(batch_size=micro_batch, collate_fn=ingest, prefetch_batches=2,
                                                 device=device)
        for micro, ((x, y), last_of_epoch) in enumerate(_with_last(batches), start=1):
            # Gradients all-reduce only on the micro-batch that ends an accumulation, and always on the
            # epoch's last one: a partial accumulation must not step on gradients never all-reduced.
            last_micro = micro % tcfg.grad_accum_steps == 0 or last_of_epoch
            sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with _autocast(precision, device):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss / tcfg.grad_accum_steps).backward()
            if last_micro:
                step = _step(optimizer, scaler, tcfg, epoch + step / steps_per_epoch, step)
            loss_sum += loss.item() * len(y)
            seen += len(y)
        elapsed = time.perf_counter() - began
        val_loss, val_correct, val_seen = _evaluate(model, val_shard, stats, loss_fn, precision, device)
        loss_sum, seen, val_loss, val_correct, val_seen, elapsed = _all_reduce(
            [loss_sum, seen, val_loss, val_correct, val_seen, elapsed]
        )
        # Data-parallel workers must hold the same weights: the spread of a checksum shows any drift.
        checksum = float(sum(p.detach().double().sum() for p in _unwrap(model).parameters()))
        drift = _all_reduce([checksum], op="max")[0] - _all_reduce([checksum], op="min")[0]
        # Global samples per second of mean worker time; the first epoch of each start pays for warm-up.
        if epoch > start_epoch:
            rates.append(seen / (elapsed / world))
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "val_loss": val_loss / max(val_seen, 1),
            "val_accuracy": val_correct / max(val_seen, 1),
            "workers": world,
            "weights_drift": drift,
        }
        history.append(metrics)
        if rank == 0:  # waited on, so the driver's last look at it sees every epoch
            ray.get(loop["attempts"].epoch.remote(metrics))
        done = epoch + 1 == tcfg.epochs
        if rank == 0 and ((epoch + 1) % tcfg.checkpoint_every == 0 or done):
            improved = metrics["val_accuracy"] > best["val_accuracy"]
            if improved:
                best = {"epoch": epoch + 1, "val_accuracy": metrics["val_accuracy"]}
            state = {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                # The schedule is a function of progress: its whole state is where it stands.
                "scheduler": {"progress_epochs": epoch + 1, "lr": optimizer.param_groups[0]["lr"]},
                "rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "history": history,
                "best": best,
                "precision": precision,
            }
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state, os.path.join(folder, CHECKPOINT_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
                if improved:  # after the report: best/ never holds an epoch the resumable history lacks
                    keep_best(loop["paths"], loop["best"], Path(folder, CHECKPOINT_FILE).read_bytes(), epoch + 1)
        else:
            ray.train.report(metrics)
    return {
        "history": history,
        "samples_per_second": float(np.median(rates)) if rates else None,
        "precision": precision,
        "device": device.type,
        "workers": world,
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
    }


def _step(optimizer, scaler, tcfg: TrainConfig, progress: float, step: int) -> int:
    for group in optimizer.param_groups:
        group["lr"] = tcfg.lr * lr_factor(progress, tcfg.epochs, tcfg.warmup_epochs)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step + 1


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def _evaluate(model, shard, stats, loss_fn, precision, device) -> tuple[float, float, float]:
    model.eval()
    loss_sum = correct = seen = 0.0
    ingest = data.IngestCollate(stats, None, 0, 0)
    for x, y in shard.iter_torch_batches(batch_size=256, collate_fn=ingest, device=device):
        with _autocast(precision, device):
            logits = model(x)
        loss_sum += loss_fn(logits.float(), y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return loss_sum, correct, seen


def scaling_config(tcfg: TrainConfig) -> ScalingConfig:
    low, high = tcfg.worker_range()
    return ScalingConfig(
        num_workers=low if low == high else (low, high),
        elastic_resize_monitor_interval_s=tcfg.elastic_monitor_s,
        use_gpu=tcfg.device == "cuda",
        # use_gpu adds one GPU per worker; the autoscaler starts nodes that hold all of these.
        resources_per_worker={"CPU": tcfg.cpus_per_worker, **tcfg.resources_per_worker},
    )


def fit(cfg: Config, datasets: dict, stats: DataStats, paths: RunPaths, model: nn.Module | None = None,
        folder: str = "", label: str = "train: epoch") -> TrainSummary:
    """Train on the run's data; returns history, throughput, restarts and the best checkpoint's path.

    `model` given (a finetune), training starts from it rather than from a new `model.*` network, and its
    checkpoints go under `<run>/<folder>/checkpoints/`. Ray Train resumes by itself from the latest
    checkpoint there: after a worker failure within this call, and across calls on the same run
    (`raypipe train --resume`)."""
    attempts, best = Attempts.remote(), best_checkpoint(folder)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.public_dict(), "stats": stats, "attempts": attempts, "paths": paths,
                           "model": model, "best": best},
        scaling_config=scaling_config(cfg.train),
        datasets={"train": datasets["train"], "val": datasets["val"]},
        dataset_config=DataConfig(datasets_to_split=["train", "val"]),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=paths.path(folder),
            storage_filesystem=paths.arrow_fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Ray keeps the latest `keep_checkpoints` (the resume points); rank 0 keeps the best apart.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # Its controller's and workers' informational lines stay in <session>/logs/train/ (unless -v).
            logging_config=ray.train.LoggingConfig(log_level=console.ray_log_level()),
        ),
    )
    with _following(attempts, cfg.train.epochs, label):
        result = trainer.fit()
    summary = TrainSummary(**result.return_value, **ray.get(attempts.summary.remote()), checkpoint=best)
    log.info("%s: best checkpoint %s (epoch %d, val_accuracy %.4f)", label.split(":")[0], best, summary.best_epoch,
             summary.best_val_accuracy)
    return summary


@contextlib.contextmanager
def _following(attempts, epochs: int, label: str):
    """Show each epoch as it finishes: a bar with loss and validation accuracy on a terminal, a line
    otherwise."""
    progress, stop, shown = console.Progress(epochs, label), threading.Event(), 0

    def show() -> None:
        nonlocal shown
        for m in ray.get(attempts.since.remote(shown), timeout=30):
            shown += 1
            progress.update(m["epoch"], f"train_loss {m['train_loss']:.4f}, val_accuracy {m['val_accuracy']:.4f}, "
                                        f"{m['workers']} workers")

    def follow() -> None:
        while not stop.wait(0.5):
            try:
                show()
            except Exception:  # progress is a courtesy: training goes on, and the next look tries again
                log.debug("train: progress not read", exc_info=True)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        yield
    finally:
        stop.set()
        follower.join()
        try:
            show()  # the epochs since the last look
        except Exception:  # progress only: never fails (or masks the error of) the training itself
            log.debug("train: progress not read", exc_info=True)
        progress.close()


def keep_best(paths: RunPaths, best: str, checkpoint: bytes, epoch: int) -> None:
    """Make the file `best` hold `checkpoint` (of `epoch`), unless it already holds that epoch."""
    if paths.exists(best):
        held = torch.load(io.BytesIO(paths.read_bytes(best)), weights_only=True, map_location="cpu")
        if held["epoch"] == epoch:
            return
    paths.write_bytes(best, checkpoint)


def load_model(cfg: Config, stats: DataStats, paths: RunPaths, checkpoint: str,
               model: nn.Module | None = None) -> nn.Module:
    """The model from a checkpoint file in the run, in eval mode: into `model` (a finetune's own shape), or
    a new `model.*` network."""
    state = torch.load(io.BytesIO(paths.read_bytes(checkpoint)), weights_only=True, map_location="cpu")
    model = models.build(cfg.model, stats) if model is None else model
    model.load_state_dict(state["model"])
    return model.eval()
