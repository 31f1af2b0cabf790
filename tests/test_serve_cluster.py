"""`raypipe serve --address` on a shared cluster it did not start (a loopback head of ours, with token auth):
it never replaces another user's Serve application, Ctrl-C deletes its own alone, and a deployment that
cannot be placed yet waits with Ctrl-C still working."""

import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import requests

from tests.conftest import REPO, Head, free_port, raypipe


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with another user's Serve application ("other", at /other) already deployed on it."""
    head = Head.start("--num-cpus=2")
    port = free_port()
    script = tmp_path_factory.mktemp("other") / "other.py"
    script.write_text(textwrap.dedent(f"""
        import ray
        from ray import serve

        ray.init(address="{head.gcs_address}")
        serve.start(http_options={{"host": "127.0.0.1", "port": {port}}})

        @serve.deployment(ray_actor_options={{"num_cpus": 0.1}})
        def other(request):
            return "other"

        serve.run(other.bind(), name="other", route_prefix="/other")
    """))
    try:
        done = subprocess.run([sys.executable, str(script)], env=head.env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        yield head, f"http://127.0.0.1:{port}"
    finally:
        head.stop()


def _serve(head: Head, run: str, *args: str) -> tuple[subprocess.Popen, list[str]]:
    process = subprocess.Popen([sys.executable, "-m", "raypipe", "serve", run, "--address", head.gcs_address, *args],
                               cwd=REPO, env=head.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, lines


def _wait_for_line(process: subprocess.Popen, lines: list[str], needle: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not any(needle in line for line in lines):
        assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.5)


def _apps(head: Head) -> dict:
    reply = requests.get(f"{head.dashboard}/api/serve/applications/", headers=head.auth_header, timeout=30)
    reply.raise_for_status()
    return reply.json()["applications"]


def test_an_application_of_the_same_name_is_never_replaced(cluster, smoke_run):
    head, base = cluster
    done = raypipe("serve", smoke_run.uri, "--address", head.gcs_address, "--set", "serve.app_name=other",
                   env=head.env, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "serve.app_name: an application named 'other' is already deployed" in done.stderr
    assert requests.get(f"{base}/other", timeout=30).text == "other"


def test_a_deployment_waiting_for_room_stops_on_ctrl_c(cluster, smoke_run):
    head, _ = cluster
    process, lines = _serve(head, smoke_run.uri, "--set", "serve.app_name=waiting", "--set", "serve.node_resource=edge")
    _wait_for_line(process, lines, "no node offers the resource 'edge' now; waiting for the autoscaler")
    time.sleep(2)
    stopped = time.monotonic()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=90) == 0, "".join(lines)[-3000:]
    assert time.monotonic() - stopped < 60
    assert "waiting" not in _apps(head)


def test_ctrl_c_deletes_its_own_application_and_nothing_else(cluster, smoke_run):
    head, base = cluster
    process, lines = _serve(head, smoke_run.uri, "--set", "serve.app_name=mine")
    _wait_for_line(process, lines, "serve: ready as 'mine' at /v2 of the cluster's Serve HTTP address")
    assert {"mine", "other"} <= set(_apps(head))
    reply = requests.get(f"{base}/v2/models/digits", timeout=30)
    assert reply.status_code == 200 and reply.json()["name"] == "digits"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, "".join(lines)[-3000:]
    apps = _apps(head)
    assert "mine" not in apps and apps["other"]["status"] == "RUNNING"
    assert requests.get(f"{base}/other", timeout=30).text == "other"
