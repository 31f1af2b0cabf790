"""`raypipe serve` on the HAProxy fast path: real Serve replicas behind real HTTP on loopback.

One server for the module serves two runs (the smoke run, through its bundle, and the staged CNN run).
The tests go in order: the protocol, balance, autoscaling up and down, a replica SIGKILLed under load,
and last, Ctrl-C draining requests in flight.
"""

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import requests

from raypipe.predict import OnnxModel
from tests.conftest import REPO, free_port, raypipe

SECRET = "sEcReT-serve-do-not-show"
SCALING = ["--set", "serve.min_replicas=2", "--set", "serve.max_replicas=3", "--set", "serve.target_ongoing_requests=2",
           "--set", "serve.upscale_delay_s=1", "--set", "serve.downscale_delay_s=4",
           "--set", "serve.max_models_per_replica=2"]


class Server:
    def __init__(self, process: subprocess.Popen, base: str):
        self.process, self.base = process, base
        self.lines: list[str] = []  # its stderr, read as it comes (a full pipe would stall its logging)
        self.reader = threading.Thread(target=lambda: self.lines.extend(process.stderr), daemon=True)
        self.reader.start()

    def log(self) -> str:
        return "".join(self.lines)

    def replicas(self) -> dict[int, psutil.Process]:
        """The Serve replica processes under this server (the embedded Ray is its child)."""
        found = {}
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "ServeReplica:raypipe" in " ".join(child.cmdline()):
                    found[child.pid] = child
            except psutil.NoSuchProcess:
                pass
        return found


@pytest.fixture(scope="module")
def bundle(smoke_run, tmp_path_factory):
    target = tmp_path_factory.mktemp("serve-bundle") / "digits"
    done = raypipe("export", smoke_run.uri, "--to", str(target), "--variants", "fp32,int8", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


@pytest.fixture(scope="module")
def server(bundle, staged_run):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "raypipe", "serve", str(bundle), staged_run.uri, "--port", str(port), *SCALING],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET},  # as `_s3_to_env` puts storage.s3 there
    )
    base = f"http://127.0.0.1:{port}"
    server = Server(process, base)
    try:
        _wait_ready(process, base)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
            server.reader.join(timeout=10)
            stderr = server.log()
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("raypipe serve did not stop within 90 s of Ctrl-C")
    assert process.returncode == 0, stderr[-3000:]


def _wait_ready(process: subprocess.Popen, base: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            if requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or replicas still starting
            pass
        time.sleep(1)
    pytest.fail(f"raypipe serve did not become ready in {seconds:.0f} s")


def _test_rows(run_path, n=40):
    table = pq.read_table(next((run_path / "data/test").glob("*.parquet")))
    return np.stack(table.column("x").to_numpy(zero_copy_only=False))[:n].astype(np.float32), \
        table.column("label").to_numpy()[:n]


def _body(x, **extra):
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


class Load:
    """A bounded loopback load: `concurrency` threads, each posting one row at a time, until stopped or
    `seconds` pass. Records (time, status, replica) for every answer and every connection error."""

    def __init__(self, base: str, concurrency: int, seconds: float, path="/v2/models/digits/infer"):
        self.url, self.deadline = base + path, time.monotonic() + seconds
        self.stop, self.lock, self.answers = threading.Event(), threading.Lock(), []
        self.body = _body(np.full((1, 64), 3.0, dtype=np.float32))
        self.threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrency)]

    def _worker(self):
        with requests.Session() as session:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                try:
                    reply = session.post(self.url, json=self.body, timeout=30)
                    answer = (time.monotonic(), reply.status_code, reply.headers.get("raypipe-replica"))
                except requests.RequestException:
                    answer = (time.monotonic(), None, None)
                with self.lock:
                    self.answers.append(answer)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def statuses(self, since: float = 0.0) -> collections.Counter:
        return collections.Counter(s for t, s, _ in self.answers if t >= since)


def _wait_for(condition, seconds: float, step: float = 0.5) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if condition():
            return time.monotonic() - start
        time.sleep(step)
    return float("inf")


def test_health_and_metadata(server):
    base = server.base
    assert requests.get(f"{base}/v2/health/live").status_code == 200
    assert requests.get(f"{base}/v2/health/ready").status_code == 200
    meta = requests.get(f"{base}/v2").json()
    assert meta["name"] == "raypipe" and "binary_tensor_data" in meta["extensions"]
    model = requests.get(f"{base}/v2/models/digits").json()
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"] for o in model["outputs"]} == {"label", "probabilities"}
    assert requests.get(f"{base}/v2/models/digits/versions/fp32/ready").status_code == 200
    assert requests.get(f"{base}/v2/models/digits-cnn/ready").status_code == 200
    assert "/v2/models/{model}/infer" in requests.get(f"{base}/openapi.json").json()["paths"]
    assert requests.get(f"{base}/docs").status_code == 200


def test_two_runs_each_answer_under_their_name(server, bundle, smoke_run, staged_run):
    # Floors: the 4-epoch MLP smoke model, and the 5-epoch CNN trained on the same 500 rows. The digits come
    # from a bundle of two of its variants: its promoted one is the bundle's.
    promoted = {"digits": json.loads((bundle / "bundle.json").read_text())["models"]["digits"]["promoted"],
                "digits-cnn": json.loads((staged_run.path / "report.json").read_text())["promoted"]}
    for run, name, floor in ((smoke_run.path, "digits", 0.6), (staged_run.path, "digits-cnn", 0.3)):
        x, labels = _test_rows(run)
        reply = requests.post(f"{server.base}/v2/models/{name}/infer", json=_body(x, id=f"req-{name}"))
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model_name"] == name and body["model_version"] == promoted[name] and body["id"] == f"req-{name}"
        outputs = {o["name"]: o for o in body["outputs"]}
        predicted = np.array(outputs["label"]["data"])
        assert outputs["label"]["datatype"] == "INT64" and outputs["probabilities"]["shape"] == [len(x), 10]
        # Exactly what the stored artifact computes on raw pixels, and mostly right on unseen digits.
        local = OnnxModel((run / f"models/{promoted[name]}/model.onnx").read_bytes())
        assert (predicted == local.predict(x)[0]).all()
        assert (predicted == labels).mean() >= floor


def test_every_served_variant_answers_as_its_stored_file(server, staged_run):
    # The staged run is served as a run: each accepted variant (fp32, int8, the pruned ones) is a version.
    report = json.loads((staged_run.path / "report.json").read_text())
    accepted = [v["name"] for v in report["variants"] if v["accepted"]]
    assert requests.get(f"{server.base}/v2/models/digits-cnn").json()["versions"] == accepted
    x, _ = _test_rows(staged_run.path, n=16)
    for version in accepted:
        reply = requests.post(f"{server.base}/v2/models/digits-cnn/versions/{version}/infer", json=_body(x))
        assert reply.status_code == 200, reply.text
        outputs = {o["name"]: o for o in reply.json()["outputs"]}
        labels, probabilities = OnnxModel((staged_run.path / f"models/{version}/model.onnx").read_bytes()).predict(x)
        assert outputs["label"]["data"] == labels.tolist(), version
        assert np.allclose(outputs["probabilities"]["data"], probabilities.ravel(), atol=1e-6), version
    for variant in report["variants"]:
        if not variant["accepted"]:
            reply = requests.post(f"{server.base}/v2/models/digits-cnn/versions/{variant['name']}/infer",
                                  json=_body(x))
            assert reply.status_code == 404, variant["name"]


def test_edge_and_serve_answer_identically_from_the_same_bundle(server, bundle, smoke_run, tmp_path):
    port = free_port()
    edge = subprocess.Popen([sys.executable, "-m", "raypipe", "edge", str(bundle), "--port", str(port),
                             "--workers", "1", "--cache", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(edge, f"http://127.0.0.1:{port}", seconds=60)
        x, _ = _test_rows(smoke_run.path, n=25)
        for version in ("fp32", "int8"):
            path = f"/v2/models/digits/versions/{version}/infer"
            answers = [requests.post(f"{base}{path}", json=_body(x)).json()["outputs"]
                       for base in (server.base, f"http://127.0.0.1:{port}")]
            assert answers[0] == answers[1]
    finally:
        edge.send_signal(signal.SIGINT)
        edge.communicate(timeout=40)


def test_models_load_lazily_and_each_replica_keeps_at_most_its_lru_bound(server):
    # Every version of both models (three or four), requested in turn; each replica may hold two.
    keys = [(m, v) for m in ("digits", "digits-cnn") for v in requests.get(f"{server.base}/v2/models/{m}").json()["versions"]]
    assert len(keys) >= 3
    body = _body(np.full((1, 64), 2.0, dtype=np.float32))
    for model, version in keys:
        for _ in range(4):
            reply = requests.post(f"{server.base}/v2/models/{model}/versions/{version}/infer", json=body)
            assert reply.status_code == 200, reply.text
    served, held = {f"{m}/{v}" for m, v in keys}, []
    for _ in range(10):
        stats = requests.get(f"{server.base}/v2/models/stats").json()
        assert len(stats["loaded"]) <= 2 and set(stats["loaded"]) <= served, stats["loaded"]
        held.append(len(stats["loaded"]))
    assert max(held) == 2  # the bound is reached, and models really are held


def test_infer_by_version_nested_data_and_selected_outputs(server, smoke_run):
    x, _ = _test_rows(smoke_run.path, n=3)
    body = {"id": "n", "parameters": {}, "outputs": [{"name": "label"}],
            "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": x.tolist(), "parameters": {}}]}
    reply = requests.post(f"{server.base}/v2/models/digits/versions/fp32/infer", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model_version"] == "fp32"
    assert [o["name"] for o in reply.json()["outputs"]] == ["label"]


@pytest.mark.parametrize(
    "payload, needle",
    [
        ("not json", "not valid JSON"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}]}, "shape"),
        ({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0] * 64}]}, "holds 64 values"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]}, "datatype"),
        ({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}, "pixels"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["a"] * 64}]}, "numbers"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1e39] * 64}]}, "fit FP32"),
        ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}],
          "outputs": [{"name": "logits"}]}, "logits"),
    ],
)
def test_bad_requests_get_400_with_a_json_error(server, payload, needle):
    kwargs = {"data": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, str) \
        else {"json": payload}
    reply = requests.post(f"{server.base}/v2/models/digits/infer", **kwargs)
    assert reply.status_code == 400, reply.text
    assert needle in reply.json()["error"]


def test_unknown_model_or_version_is_404_even_with_a_bad_body(server):
    for path in ("/v2/models/cats/infer", "/v2/models/digits/versions/fp8/infer"):
        reply = requests.post(f"{server.base}{path}", data="{broken", headers={"content-type": "application/json"})
        assert reply.status_code == 404 and "unknown" in reply.json()["error"]
    assert requests.get(f"{server.base}/v2/models/cats").status_code == 404
    assert requests.get(f"{server.base}/v2/models/digits/versions/fp8/ready").status_code == 404


def test_requests_spread_across_replicas(server):
    assert _wait_for(lambda: len(server.replicas()) == 2, 30) < 30
    with Load(server.base, concurrency=6, seconds=6) as load:
        time.sleep(6)
    per_replica = collections.Counter(r for _, s, r in load.answers if s == 200)
    assert load.statuses() == {200: sum(per_replica.values())}, load.statuses()
    assert len(per_replica) == 2, per_replica
    assert min(per_replica.values()) >= 0.15 * sum(per_replica.values()), per_replica


def test_replicas_scale_up_under_load_and_back_down_when_idle(server):
    with Load(server.base, concurrency=12, seconds=60) as load:
        up = _wait_for(lambda: len(server.replicas()) == 3, 45)
    assert up < 45, f"still {len(server.replicas())} replicas under load"
    assert set(load.statuses()) == {200}, load.statuses()
    down = _wait_for(lambda: len(server.replicas()) == 2, 60)
    assert down < 60, f"still {len(server.replicas())} replicas when idle"
    # What the terminal said about it: one line per change in running replicas.
    assert _wait_for(lambda: "serve: 3 -> 2 replicas" in server.log(), 10) < 10, server.log()[-3000:]
    assert "serve: 2 -> 3 replicas" in server.log()


def test_serve_prints_one_ready_line_and_no_access_lines(server):
    # Serve's own driver lines and forwarded replica/controller logs stay in Ray's files: every line on
    # stderr is raypipe's.
    assert [line for line in server.log().splitlines() if not re.match(r"^\d\d:\d\d:\d\d raypipe ", line)] == []
    assert "\x1b[" not in server.log()  # no colours when piped
    ready = [line for line in server.log().splitlines() if "serve: ready on" in line]
    assert len(ready) == 1 and re.search(rf"{server.base}/v2: digits \(fp32, int8[^)]*\); digits-cnn \(", ready[0]), ready
    assert f"docs {server.base}/docs" in ready[0]
    assert "/v2/models" not in server.log().replace(ready[0], "")  # no per-request access lines


def _listening(pid: int) -> tuple[dict[int, psutil.Process], list[tuple[str, int, str]]]:
    """The processes under `pid` and every socket they listen on: (address, port, process name)."""
    procs = {p.pid: p for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]}
    return procs, [(c.laddr.ip, c.laddr.port, procs[c.pid].name()) for c in psutil.net_connections("inet")
                   if c.status == psutil.CONN_LISTEN and c.pid in procs]


LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|::1|::ffff:127\.\d+\.\d+\.\d+)$")


def test_everything_serve_started_listens_on_loopback_only(server):
    """Every listening socket of every process `raypipe serve` started (the embedded Ray, Serve's replicas
    and proxies, HAProxy) is on loopback, and HAProxy's admin socket is its owner's alone."""
    procs, listening = _listening(server.process.pid)
    assert any(port == int(server.base.rsplit(":", 1)[1]) for _, port, _ in listening)
    assert any(name == "haproxy" for _, _, name in listening)
    assert [entry for entry in listening if not LOOPBACK.match(entry[0])] == []
    haproxy = next(p for p in procs.values() if p.name() == "haproxy")
    config = haproxy.cmdline()[haproxy.cmdline().index("-f") + 1]
    sockets = list(Path(config).parent.glob("admin.sock"))
    assert sockets and all(s.stat().st_mode & 0o077 == 0 for s in sockets)
    assert Path(config).parent.parent.stat().st_mode & 0o077 == 0  # the private folder raypipe made


def test_s3_secrets_reach_replicas_by_environment_and_nothing_ray_shows_or_stores(server):
    """The S3 secret `raypipe serve` holds reaches each replica through its environment, and appears neither
    in the deployed application Ray shows to anyone who can read its dashboard nor in any file Ray wrote."""
    replicas = server.replicas().values()
    assert replicas and all(r.environ().get("AWS_SECRET_ACCESS_KEY") == SECRET for r in replicas)
    raylet = next(p for p in psutil.Process(server.process.pid).children(recursive=True) if p.name() == "raylet")
    session = Path(next(a for a in raylet.cmdline() if a.startswith("--session_dir=")).split("=", 1)[1])
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    port = next(a for a in psutil.Process(server.process.pid).children(recursive=True)
                if "dashboard.py" in " ".join(a.cmdline())).cmdline()
    dashboard = next(int(a.split("=", 1)[1]) for a in port if a.startswith("--port="))
    shown = requests.get(f"http://127.0.0.1:{dashboard}/api/serve/applications/",
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert shown.status_code == 200 and "raypipe" in shown.json()["applications"]
    assert SECRET not in shown.text
    leaked = [path for path in session.rglob("*") if path.is_file() and not path.is_symlink()
              and path.stat().st_size < 64 * 2**20 and SECRET.encode() in path.read_bytes()]
    assert leaked == []


def test_a_replica_killed_under_load_costs_only_its_requests_in_flight(server):
    assert _wait_for(lambda: len(server.replicas()) == 2, 30) < 30
    with Load(server.base, concurrency=8, seconds=40) as load:
        time.sleep(3)
        before = {r for _, s, r in load.answers if s == 200}
        victim = next(iter(server.replicas().values()))
        killed_at = time.monotonic()
        victim.kill()  # SIGKILL, by PID: a process of the Ray this test started
        replaced = _wait_for(
            lambda: any(t > killed_at and s == 200 and r not in before for t, s, r in list(load.answers)), 25)
        time.sleep(2)
    after = load.statuses(since=killed_at)
    failed = sum(n for status, n in after.items() if status != 200)
    assert failed <= 8, after  # at most the requests in flight on the killed replica
    assert after[200] > 50, after  # the other replica kept answering
    assert replaced <= 10, f"no replacement answered within 10 s of the kill ({replaced:.1f} s)"


def test_a_model_file_changed_under_the_server_is_a_503_not_a_500(server, bundle):
    """A replica loads models lazily and checks each file's sha256 as it does: a file changed after the
    start is refused when it is (re)loaded, with a 503 for that version while the others keep answering."""
    target = bundle / "digits/1/model.onnx"  # fp32
    original = target.read_bytes()
    target.write_bytes(original[:-10] + b"0123456789")
    body = _body(np.full((1, 64), 2.0, dtype=np.float32))
    keys = [(m, v) for m in ("digits", "digits-cnn") for v in requests.get(f"{server.base}/v2/models/{m}").json()["versions"]]
    try:
        statuses, rng = collections.Counter(), np.random.default_rng(0)
        for _ in range(8):  # every version in a shuffled order: with two per replica, fp32 is evicted and reloaded
            for index in rng.permutation(len(keys)):
                model, version = keys[index]
                reply = requests.post(f"{server.base}/v2/models/{model}/versions/{version}/infer", json=body)
                statuses[(model, version, reply.status_code)] += 1
                if reply.status_code == 503:
                    assert "cannot be loaded" in reply.json()["error"]
        assert statuses[("digits", "fp32", 503)] > 0, statuses
        assert not [key for key in statuses if key[2] not in (200, 503) or (key[2] == 503 and key[1] != "fp32")]
    finally:
        target.write_bytes(original)
    # Restored: once a replica's retry gate opens (5 s), its next request loads the file again and the
    # version answers; until then readiness says why it cannot.
    url = f"{server.base}/v2/models/digits/versions/fp32"
    healed = _wait_for(lambda: all(requests.post(f"{url}/infer", json=body).status_code == 200 for _ in range(6))
                       and requests.get(f"{server.base}/v2/health/ready").status_code == 200, 30)
    assert healed < 30


def test_ctrl_c_drains_requests_in_flight_while_a_replica_is_replaced(server, smoke_run):
    """A steady stream of large requests (1,000 rows each) from 8 connections; one replica is SIGKILLed, and
    Ctrl-C comes while Serve replaces it. Every request sent before Ctrl-C is answered 200, but those the
    killed replica held or received before HAProxy took it out; later ones may be refused; `raypipe serve`
    exits 0."""
    body = _body(np.tile(_test_rows(smoke_run.path, n=40)[0], (25, 1)))
    sent: list[tuple[float, float, object]] = []
    stop = threading.Event()

    def stream():
        with requests.Session() as session:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    status = session.post(f"{server.base}/v2/models/digits/infer", json=body, timeout=60).status_code
                except requests.RequestException as err:
                    status = repr(err)
                sent.append((began, time.monotonic(), status))

    senders = [threading.Thread(target=stream) for _ in range(8)]
    for thread in senders:
        thread.start()
    time.sleep(2)
    assert _wait_for(lambda: len(server.replicas()) >= 2, 30) < 30
    killed = time.monotonic()
    next(iter(server.replicas().values())).kill()  # SIGKILL, by PID: a process of the Ray this test started
    time.sleep(0.5)
    interrupted = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    time.sleep(1)
    stop.set()
    for thread in senders:
        thread.join(timeout=90)
    before = [(began, done, status) for began, done, status in sent if began < interrupted]
    in_flight = [status for began, done, status in before if done > interrupted]
    assert in_flight, "no request was in flight at Ctrl-C"
    # Lost: only requests the killed replica held, or that reached it before HAProxy's health checks took
    # it out (a fall of 2 checks 250 ms apart), never one that began later.
    lost = [(began, done, status) for began, done, status in before if status != 200]
    assert len(lost) <= 16 and all(done > killed and began < killed + 2 for began, done, _ in lost), lost[:5]
    assert sum(status == 200 for _, _, status in before) > len(lost)
    assert server.process.wait(timeout=90) == 0
    server.reader.join(timeout=10)
    # Nothing from Ray on the way out either (no "(raylet) Task ServeController.graceful_shutdown failed").
    assert [line for line in server.log().splitlines() if not re.match(r"^\d\d:\d\d:\d\d raypipe ", line)] == []


def test_on_the_default_proxy_too_everything_listens_on_loopback_only(smoke_run):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "raypipe", "serve", smoke_run.uri, "--port", str(port),
                                "--set", "serve.proxy=default"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(process, f"http://127.0.0.1:{port}")
        _, listening = _listening(process.pid)
        assert any(p == port for _, p, _ in listening)
        assert [entry for entry in listening if not LOOPBACK.match(entry[0])] == []
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]


def test_serve_refuses_a_run_that_fails_verification(smoke_run, tmp_path):
    copy = tmp_path / smoke_run.path.name
    shutil.copytree(smoke_run.path, copy)
    (copy / "report.json").write_text("{}")
    done = raypipe("serve", str(copy), "--port", str(free_port()), timeout=120)
    assert done.returncode == 2 and "report.json: sha256 does not match" in done.stderr
    (copy / "MANIFEST.json").unlink()
    done = raypipe("serve", str(copy), timeout=120)
    assert done.returncode == 2 and "no MANIFEST.json" in done.stderr
    done = raypipe("serve", smoke_run.uri, smoke_run.uri, timeout=120)
    assert done.returncode == 2 and "model name 'digits' is already served" in done.stderr
