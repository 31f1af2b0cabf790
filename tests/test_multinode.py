"""On a cluster of more than one node, a local storage.root is refused unless it is marked shared.

`ray.cluster_utils.Cluster` starts real Ray nodes on loopback. Elastic growth onto nodes an autoscaler adds
is shown on cluster/local.yaml in test_autoscaling.py."""

import pytest
import ray
from ray.cluster_utils import Cluster

from raypipe.config import load


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_local_root_is_refused_on_a_multi_node_cluster(cluster, tmp_path, monkeypatch):
    from raypipe import cli
    from raypipe.config import ConfigError

    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # the module's Ray stays up for its teardown
    with pytest.raises(ConfigError, match="storage.root: .* is a local path and the cluster has"):
        cli._check_storage_reaches_every_node(load(None, {"storage.root": str(tmp_path)}))
    cli._check_storage_reaches_every_node(load(None, {"storage.root": str(tmp_path), "storage.shared": True}))
    cli._check_storage_reaches_every_node(load(None, {"storage.root": "s3://bucket/runs"}))
