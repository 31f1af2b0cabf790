"""cluster/local.yaml on Ray's fake multi-node provider: the autoscaler adds nodes for work the head cannot
hold, runs finish on them, idle nodes go away, and an elastic run grows onto the nodes it asked for.

The head is ours (`ray start --head` in its own temp dir, on loopback) and is ended by its PIDs; the nodes
the autoscaler adds are processes under the same temp dir. Jobs go through `ray job submit` as a user's
would, without --working-dir: every fake node shares this machine's session folder, and one node's cleanup
of an unpacked working_dir removes it under the others' workers.
"""

import json
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO, Head, free_port

HEAD_CPUS = 2


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    config = yaml.safe_load((REPO / "cluster/local.yaml").read_text())
    port = free_port()
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"  # the only change: a free port, not 6379
    path = tmp_path_factory.mktemp("cluster") / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    head = Head.start(f"--num-cpus={HEAD_CPUS}", "--object-store-memory=500000000", f"--autoscaling-config={path}",
                      port=port, env={"RAY_FAKE_CLUSTER": "1"})
    try:
        head.wait_for_job_server()
        yield head, config
    finally:
        head.stop()


def alive_nodes(head: Head) -> list[dict]:
    reply = requests.get(f"{head.dashboard}/api/v0/nodes", params={"limit": 100, "detail": 1},
                         headers=head.auth_header, timeout=30)
    reply.raise_for_status()
    return [n for n in reply.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


class NodeWatch:
    """Counts the cluster's live nodes every few seconds while a job runs."""

    def __init__(self, head: Head):
        self.head, self.counts, self._stop = head, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.counts.append(len(alive_nodes(self.head)))
            except requests.RequestException:
                pass
            self._stop.wait(3)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def submit_run(head: Head, root: Path, *overrides: str) -> dict:
    """`ray job submit -- python -m raypipe run --smoke-test ...`; returns the run's report.json."""
    done = head.ray("job", "submit", "--address", head.dashboard, "--", "python", "-m", "raypipe", "run",
                    "--smoke-test", "--set", "storage.shared=true", "--set", f"storage.root={root}",
                    "--set", "compress.recipes={int8: [quantize]}", *overrides)  # no finetune: not the point here
    assert done.returncode == 0 and "succeeded" in done.stdout, (done.stdout + done.stderr)[-4000:]
    runs = list(root.glob("digits-*"))
    assert len(runs) == 1 and (runs[0] / "MANIFEST.json").is_file()
    return json.loads((runs[0] / "report.json").read_text())


def wait_for_nodes(head: Head, count: int, timeout: float) -> float:
    began = time.monotonic()
    while len(alive_nodes(head)) != count:
        assert time.monotonic() - began < timeout, f"still {len(alive_nodes(head))} nodes after {timeout:.0f} s"
        time.sleep(2)
    return time.monotonic() - began


def test_an_elastic_run_grows_onto_nodes_the_autoscaler_adds(fake_cluster, tmp_path):
    head, _ = fake_cluster
    # First on a fresh cluster: Ray Train sizes an elastic start from a view of the cluster that Ray Data's
    # AutoscalingCoordinator refreshes every 20 s, so right after other nodes went it may count them still.
    assert len(alive_nodes(head)) == 1
    report = submit_run(head, tmp_path / "runs", "--set", "train.workers={min: 1, max: 3}",
                        "--set", "train.cpus_per_worker=2", "--set", "train.elastic_monitor_s=1",
                        "--set", "train.epochs=8")
    # The growth shows in the starts of the worker group: it can come before the first epoch ends, when the
    # first start is slow and the nodes are quick, and then every epoch in the history has the larger group.
    train = report["train"]
    assert train["start_workers"][0] < train["start_workers"][-1] == train["history"][-1]["workers"], train
    assert train["resizes"] >= 1
    assert [h["epoch"] for h in report["train"]["history"]] == list(range(1, 9))


def test_a_job_larger_than_the_head_gets_nodes_that_go_when_idle(fake_cluster, tmp_path):
    head, config = fake_cluster
    wait_for_nodes(head, 1, timeout=90)  # the elastic run's nodes have gone
    # Three training workers of 2 CPUs each: the 2-CPU head holds at most one of them.
    with NodeWatch(head) as watch:
        report = submit_run(head, tmp_path / "runs", "--set", "train.workers=3", "--set", "train.cpus_per_worker=2")
    assert max(watch.counts) >= 3, watch.counts
    assert {h["workers"] for h in report["train"]["history"]} == {3}
    assert report["variants"][0]["test_accuracy"] > 0.6
    assert {n["node_ip"] for n in alive_nodes(head)} == {"127.0.0.1"}
    # Idle nodes go after idle_timeout_minutes (15 s), plus an autoscaler round or two.
    idle_s = config["idle_timeout_minutes"] * 60
    wait_for_nodes(head, 1, timeout=idle_s + 60)
