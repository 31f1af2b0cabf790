"""An elastic run (train.workers {min: 1, max: 2}) starts at one worker and grows when a node joins.

`ray.cluster_utils.Cluster` starts real Ray nodes on loopback: a head with room for one 3-CPU worker,
then, once training is under way, a second node with room for another."""

import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from raypipe import data, train
from raypipe.config import load
from raypipe.storage import RunPaths


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 5, "node_ip_address": "127.0.0.1"})
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _refresh_cluster_view():
    """Ray Train sizes an elastic run from the reservations of Ray Data's AutoscalingCoordinator actor,
    which re-reads the node list every 20 s; have it re-read now, so the test need not outlast that."""
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("raypipe-elastic-test", recompute=True))


def test_elastic_run_grows_when_a_node_joins(cluster, tmp_path):
    # 3 logical CPUs a worker: one fits on the 5-CPU head (two left for Ray Data), the second needs a new node.
    cfg = load(None, {"storage.root": str(tmp_path), "data.limit": 400, "train.epochs": 20,
                      "train.workers": {"min": 1, "max": 2}, "train.cpus_per_worker": 3,
                      "train.elastic_monitor_s": 1, "model.hidden": [32]})
    paths = RunPaths.create(cfg.storage, "elastic")
    stats = data.build(cfg.data, cfg.seed, paths)
    outcome: dict = {}

    def fit():
        try:
            outcome["summary"] = train.fit(cfg, data.load(paths), stats, paths)
        except BaseException as error:  # surfaced by the assertion below
            outcome["error"] = error

    trainer = threading.Thread(target=fit)
    trainer.start()
    deadline = time.monotonic() + 120
    while not list((tmp_path / paths.run_id / "checkpoints").glob("checkpoint_*")):
        assert trainer.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.5)
    cluster.add_node(num_cpus=5, node_ip_address="127.0.0.1")  # Ray nodes start from the main thread only
    _refresh_cluster_view()
    trainer.join(timeout=300)
    assert not trainer.is_alive() and "error" not in outcome, outcome

    summary = outcome["summary"]
    workers = [h.workers for h in summary.history]
    assert workers[0] == 1 and workers[-1] == 2, workers
    assert summary.resizes >= 1 and summary.workers == 2
    assert summary.history[-1].train_loss < summary.history[0].train_loss
    assert [h.epoch for h in summary.history] == list(range(1, 21))
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def test_a_local_root_is_refused_on_a_multi_node_cluster(cluster, tmp_path, monkeypatch):
    from raypipe import cli
    from raypipe.config import ConfigError

    if sum(node["Alive"] for node in ray.nodes()) < 2:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # the module's Ray stays up for its teardown
    with pytest.raises(ConfigError, match="storage.root: .* is a local path and the cluster has"):
        cli._check_storage_reaches_every_node(load(None, {"storage.root": str(tmp_path)}))
    cli._check_storage_reaches_every_node(load(None, {"storage.root": str(tmp_path), "storage.shared": True}))
    cli._check_storage_reaches_every_node(load(None, {"storage.root": "s3://bucket/runs"}))
