"""The data stage streams a data set several times larger than Ray's object store."""

import resource

import pytest
import ray

from raypipe import data, datagen
from raypipe.config import StorageConfig, load
from raypipe.storage import RunPaths

OBJECT_STORE = 96 * 2**20
ROWS = 100_000  # 32x32x3 uint8: 293 MiB of pixels, three times the object store


@pytest.fixture(scope="module", autouse=True)
def small_object_store():
    ray.init(address="local", num_cpus=2, object_store_memory=OBJECT_STORE, _node_ip_address="127.0.0.1", include_dashboard=False)
    yield
    ray.shutdown()


def test_streams_past_the_object_store(tmp_path):
    folder = tmp_path / "synth"
    datagen.generate(str(folder), rows=ROWS, rows_per_file=5_000)
    assert ROWS * 32 * 32 * 3 > 3 * OBJECT_STORE
    cfg = load(None, {"data.source": str(folder), "data.shard_mb": 16}).data
    paths = RunPaths.create(StorageConfig(root=str(tmp_path / "runs")), "big")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = data.build(cfg, 0, paths, data.inspect_source(cfg))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert stats.rows_read == ROWS and stats.image_shape == [3, 32, 32]
    assert sum(stats.rows.values()) == ROWS - stats.rows_dropped["duplicate"]
    assert stats.shards["train"] >= 4
    # The driver held keys and labels, never the pixels (293 MiB).
    assert grown_mib < 150, grown_mib
