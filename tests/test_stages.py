"""Stages against one in-process Ray for the module (loopback only)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from sklearn.datasets import load_digits

from raypipe import data
from raypipe.config import StorageConfig, load
from raypipe.storage import RunPaths


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_advertises_loopback_only():
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def _dirty_digits(limit=None):
    """300 digits plus 3 rows with NaN/inf and 5 exact duplicates."""
    x = load_digits().data[:300].astype(np.float32)
    y = load_digits().target[:300]
    bad = x[:3].copy()
    bad[0, 5], bad[1, 0], bad[2, 63] = np.nan, np.inf, -np.inf
    rows = np.concatenate([x, bad, x[10:15]])
    labels = np.concatenate([y, y[:3], y[10:15]])
    ds = ray.data.from_items([{"x": r, "label": int(l)} for r, l in zip(rows, labels)], override_num_blocks=3)
    return ds, {"source": "digits", "image_shape": [1, 8, 8], "classes": 10, "feature_names": None}


def _split_keys(paths: RunPaths, split: str) -> list[str]:
    tables = [pq.read_table(p) for p in sorted((paths.fs.glob(paths.path(f"data/{split}/*.parquet"))))]
    return sorted(k for t in tables for k in t.column("key").to_pylist())


def test_data_stage_cleans_counts_and_splits_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "read_digits", _dirty_digits)
    cfg = load(None)
    runs = [RunPaths.create(StorageConfig(root=str(tmp_path)), f"d{i}") for i in range(2)]
    stats = [data.build(cfg.data, cfg.seed, run) for run in runs]
    assert stats[0]["rows_read"] == 308
    assert stats[0]["rows_dropped"] == {"nan": 3, "duplicate": 5}
    assert sum(stats[0]["rows"].values()) == 300
    assert stats[0] == stats[1]
    for split in data.SPLITS:
        keys = _split_keys(runs[0], split)
        assert keys == _split_keys(runs[1], split) and len(keys) == stats[0]["rows"][split]
    # Standardization was fitted on the train split only.
    train = np.concatenate([np.stack(pq.read_table(p).column("x").to_numpy(zero_copy_only=False))
                            for p in runs[0].fs.glob(runs[0].path("data/train/*.parquet"))])
    assert np.allclose(stats[0]["standardize"]["mean"][0], train.mean(), atol=1e-3)
