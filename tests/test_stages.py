"""The data and train stages on one in-process Ray (loopback only): every source format, counts by
reason, stable splits, an S3 round trip with checkpoints and a resume from S3."""

import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
import torch
from sklearn.datasets import load_digits

from raypipe import data, datagen, train
from raypipe.config import S3Config, StorageConfig, load
from raypipe.storage import RunPaths


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_advertises_loopback_only():
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def _table(n=300, seed=0) -> pd.DataFrame:
    """A tabular set with 4 NaN/inf rows, 5 exact duplicates, 3 unknown labels and 2 wild outliers."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(0, 1, (n, 5)).round(4), columns=[f"f{i}" for i in range(5)])
    frame["label"] = rng.integers(0, 3, n)
    bad = frame.iloc[:4].copy()
    bad.iloc[0, 0], bad.iloc[1, 2], bad.iloc[2, 4], bad.iloc[3, 1] = np.nan, np.inf, -np.inf, np.nan
    dups = frame.iloc[10:15].copy()
    unknown = frame.iloc[20:23].copy().assign(f0=lambda d: d.f0 + 0.5, label=7)
    wild = frame.iloc[30:32].copy().assign(f3=lambda d: d.f3 + 40.0)
    return pd.concat([frame, bad, dups, unknown, wild], ignore_index=True)


def _config(**data_overrides):
    return load(None, {f"data.{k}": v for k, v in data_overrides.items()}).data


def _run(tmp_path, name="r"):
    return RunPaths.create(StorageConfig(root=str(tmp_path / "runs")), name)


def _split_keys(paths: RunPaths, split: str) -> list[int]:
    files = sorted(paths.fs.glob(paths.path(f"data/{split}/*.parquet")))
    return sorted(k for f in files for k in pq.read_table(f, filesystem=paths.arrow_fs).column("key").to_pylist())


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_tabular_sources_clean_with_counts_by_reason(tmp_path, fmt):
    source = tmp_path / "raw"
    source.mkdir()
    table = _table()
    for i, part in enumerate([table.iloc[:100], table.iloc[100:200], table.iloc[200:]]):
        part.to_parquet(source / f"part{i}.parquet") if fmt == "parquet" else part.to_csv(source / f"part{i}.csv", index=False)
    cfg = _config(source=str(source), classes=[0, 1, 2], augment={"ops": ["noise"]})
    paths = _run(tmp_path)
    stats = data.build(cfg, 0, paths)
    assert stats.format == fmt and stats.rows_read == len(table) == 314
    assert stats.rows_dropped == {"nan": 4, "label": 3, "duplicate": 5, "outlier": stats.rows_dropped["outlier"]}
    assert 2 <= stats.rows_dropped["outlier"] <= 12  # the two planted ones, plus a few far tails
    # Every count is taken where its rows are dropped, so they must add up to the rows read.
    assert sum(stats.rows.values()) == 314 - sum(stats.rows_dropped.values())
    kept = np.concatenate([np.stack(pq.read_table(f).column("x").to_numpy(zero_copy_only=False))
                           for f in sorted(paths.fs.glob(paths.path("data/*/*.parquet")))])
    assert len(kept) == sum(stats.rows.values()) and np.abs(kept).max() < 30  # the planted +40 rows are gone
    assert stats.features == 5 and stats.num_classes == 3 and stats.image_shape == [5]


def test_a_limit_takes_the_same_rows_on_every_pass(tmp_path):
    source = tmp_path / "raw"
    source.mkdir()
    table = _table()
    for i in range(6):
        table.iloc[i * 50:(i + 1) * 50 + 14 * (i == 5)].to_parquet(source / f"part{i}.parquet")
    cfg = _config(source=str(source), classes=[0, 1, 2], augment={"ops": ["noise"]}, limit=170)
    paths = _run(tmp_path)
    stats = data.build(cfg, 0, paths)
    assert stats.rows_read == 170
    assert sum(stats.rows.values()) + sum(stats.rows_dropped.values()) == 170, stats
    written = [k for split in ("train", "val", "test") for k in _split_keys(paths, split)]
    assert len(written) == len(set(written)) == sum(stats.rows.values())


def test_split_is_identical_across_runs_and_formats(tmp_path):
    source = tmp_path / "raw"
    source.mkdir()
    _table().to_parquet(source / "all.parquet")
    _table().to_csv(source / "all.csv", index=False)
    runs = [_run(tmp_path, f"s{i}") for i in range(2)]
    data.build(_config(source=str(source / "all.parquet")), 0, runs[0])
    data.build(_config(source=str(source / "all.csv")), 0, runs[1])
    for split in data.SPLITS:
        keys = _split_keys(runs[0], split)
        assert keys and keys == _split_keys(runs[1], split)


def test_digits_with_planted_problems(tmp_path, monkeypatch):
    x = load_digits().data[:300].astype(np.float32)
    y = load_digits().target[:300].astype(str)
    bad = x[:3].copy()
    bad[0, 5], bad[1, 0], bad[2, 63] = np.nan, np.inf, -np.inf
    rows = np.concatenate([x, bad, x[10:15]])
    labels = np.concatenate([y, y[:3], y[10:15]])

    def read(cfg, info, s3=None):
        return ray.data.from_items([{"x": r, "label_raw": lab} for r, lab in zip(rows, labels)], override_num_blocks=3)

    monkeypatch.setattr(data, "read_source", read)
    cfg = _config()
    stats = data.build(cfg, 0, _run(tmp_path))
    assert stats.rows_read == 308
    assert stats.rows_dropped == {"nan": 3, "label": 0, "duplicate": 5, "outlier": 0}
    assert sum(stats.rows.values()) == 300
    train = np.concatenate([np.stack(pq.read_table(p).column("x").to_numpy(zero_copy_only=False))
                            for p in (tmp_path / "runs").glob("*/data/train/*.parquet")])
    # Standardization was fitted on the train split only (per channel: one mean for all pixels).
    assert np.allclose(stats.standardize.mean[0], train.mean(), atol=1e-3)


def test_image_folder_source(tmp_path):
    folder = tmp_path / "images"
    datagen.generate(str(folder), rows=120, shape=(16, 16, 3), classes=3, fmt="images")
    assert sorted(p.name for p in folder.iterdir()) == ["class_0", "class_1", "class_2"]
    stats = data.build(_config(source=str(folder), augment={"ops": ["crop", "flip"]}), 0, _run(tmp_path))
    assert stats.format == "images" and stats.image_shape == [3, 16, 16]
    assert stats.classes == ["class_0", "class_1", "class_2"] and sum(stats.rows.values()) == 120
    assert stats.rows_dropped["outlier"] == 0


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_each_image_model_learns_with_two_workers(tmp_path, arch):
    """The small CNN on the digits, the ResNet-style network on synthetic 32x32 colour images (the MLP
    on the digits is the smoke run's), two Ray Train workers each: the loss falls and validation
    accuracy clears a floor far above chance (0.1)."""
    overrides = {"storage.root": str(tmp_path), "model.arch": arch, "model.channels": [16, 32],
                 "train.workers": 2, "train.batch_size": 32, "train.lr": 0.005, "data.augment": {"ops": []}}
    if arch == "cnn":
        overrides |= {"data.limit": 800, "train.epochs": 6}
    else:
        datagen.generate(str(tmp_path / "synth"), rows=800, rows_per_file=400)
        overrides |= {"data.source": str(tmp_path / "synth"), "data.features": ["image"], "train.epochs": 3}
    cfg = load(None, overrides)
    paths = RunPaths.create(cfg.storage, arch)
    stats = data.build(cfg.data, cfg.seed, paths)
    summary = train.fit(cfg, data.load(paths), stats, paths)
    history = summary.history
    assert summary.workers == 2 and history[-1].train_loss < history[0].train_loss / 2
    assert max(h.val_accuracy for h in history) >= 0.85, history


def test_workers_stay_identical_when_accumulation_ends_mid_epoch(tmp_path):
    """Two workers, 2-step accumulation, and an odd number of micro-batches per epoch: the epoch's last
    micro-batch must all-reduce, or the workers step on different gradients and drift apart."""
    cfg = load(None, {"storage.root": str(tmp_path), "data.limit": 300, "data.augment": {"ops": []},
                      "model.hidden": [16], "train.workers": 2, "train.cpus_per_worker": 0.5,
                      "train.grad_accum_steps": 2, "train.batch_size": 48, "train.epochs": 2})
    paths = RunPaths.create(cfg.storage, "accum")
    stats = data.build(cfg.data, cfg.seed, paths)
    micro_batches = -(-stats.rows["train"] // 2 // 12)  # per worker: its half of the rows, 12 a micro-batch
    assert micro_batches % 2 == 1, stats.rows
    history = train.fit(cfg, data.load(paths), stats, paths).history
    assert [h.weights_drift for h in history] == [0.0, 0.0], history


def test_s3_round_trip(s3_endpoint):
    s3 = S3Config(endpoint_url=s3_endpoint, access_key_id="k", secret_access_key="s", region="us-east-1")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="k", secret="s")
    fs.mkdir("raw-data")
    datagen.generate("s3://raw-data/synth", rows=400, shape=(8, 8, 3), classes=4, rows_per_file=150, s3=s3)
    assert len(fs.glob("raw-data/synth/*.parquet")) >= 2
    cfg = _config(source="s3://raw-data/synth", shard_mb=0.01)  # about 50 rows a shard
    paths = RunPaths.create(StorageConfig(root="s3://raw-data/runs", s3=s3), "s3run")
    stats = data.build(cfg, 0, paths, data.inspect_source(cfg, s3))
    assert stats.image_shape == [3, 8, 8] and stats.rows_read == 400
    shards = {split: fs.glob(f"{paths.path('data')}/{split}/*.parquet") for split in data.SPLITS}
    assert all(shards.values()) and len(shards["train"]) >= 2
    back = {split: sum(pq.read_metadata(f, filesystem=paths.arrow_fs).num_rows for f in files)
            for split, files in shards.items()}
    assert back == stats.rows and sum(back.values()) == 400 - stats.rows_dropped["duplicate"]
    assert paths.read_json("data/stats.json") == stats.model_dump(mode="json")
    assert not fs.exists(paths.path("data/_split"))

    # Checkpoints go to the same S3 run, and a second fit resumes from the latest one there.
    cfg = load(None, {"train.epochs": 2, "model.hidden": [32], "data.augment": {"ops": ["crop"]}})
    first = train.fit(cfg, data.load(paths), stats, paths)
    assert len(fs.glob(f"{paths.path('checkpoints')}/checkpoint_*/checkpoint.pt")) == 2
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})})
    second = train.fit(longer, data.load(paths), stats, paths)
    assert [h.epoch for h in second.history] == [1, 2, 3]
    assert second.history[:2] == first.history and second.restarts == 0
    # Retention: Ray keeps the latest two (train.keep_checkpoints), the best is kept apart.
    kept = sorted(fs.glob(f"{paths.path('checkpoints')}/checkpoint_*/checkpoint.pt"))
    assert [torch.load(io.BytesIO(fs.cat(f)), weights_only=True)["epoch"] for f in kept] == [2, 3]
    best = torch.load(io.BytesIO(paths.read_bytes(second.checkpoint)), weights_only=True)
    assert second.checkpoint == "checkpoints/best/checkpoint.pt" and best["epoch"] == second.best_epoch
    assert best["history"][-1]["val_accuracy"] == max(h.val_accuracy for h in second.history)
