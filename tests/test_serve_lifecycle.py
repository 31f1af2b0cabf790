"""What `raypipe serve` does around Serve, without a Ray: the HAProxy config kept on loopback, the room check
before an embedded Ray starts, and the auth token it writes."""

import os
import re
import stat
import subprocess
import sys

import pytest

from raypipe import cli
from raypipe.config import ConfigError, ServeConfig
from raypipe.serving import loopback, server
from tests.conftest import REPO


@pytest.fixture(scope="module")
def rays_config(tmp_path_factory) -> str:
    """The HAProxy config Ray 2.60 itself renders, for a user who asked for every interface (0.0.0.0)."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    folder = tmp_path_factory.mktemp("haproxy")
    cfg = HAProxyConfig(http_options=HTTPOptions(host="0.0.0.0", port=8123), socket_path=str(folder / "admin.sock"),
                        server_state_base=str(folder), server_state_file=str(folder / "state"),
                        metrics_socket_path=str(folder / "metrics.sock"))
    HAProxyApi(cfg=cfg, config_file_path=str(folder / "haproxy.cfg"))._generate_config_file_internal()
    return (folder / "haproxy.cfg").read_text()


def _binds(config: str) -> dict[str, list[str]]:
    binds, section = {}, None
    for line in config.splitlines():
        if line and not line[0].isspace():
            section = line.strip()
        elif line.strip().startswith("bind "):
            binds.setdefault(section, []).append(line.split()[1])
    return binds


def test_rays_haproxy_config_listens_everywhere_and_the_rewrite_keeps_only_what_was_asked(rays_config):
    assert _binds(rays_config) == {"frontend prometheus": [":9101"], "frontend http_frontend": ["*:8123"],
                                   "listen stats": ["*:8404"]}
    assert " mode 666 level admin" in rays_config
    rewritten = loopback.rewrite(rays_config, {"listen stats": 41001, "frontend prometheus": 41002})
    # The HTTP frontend keeps the host the user asked for (here every interface); Ray's side listeners
    # move to loopback on private ports, and the admin socket is its owner's alone.
    assert _binds(rewritten) == {"frontend prometheus": ["127.0.0.1:41002"], "frontend http_frontend": ["*:8123"],
                                 "listen stats": ["127.0.0.1:41001"]}
    assert re.search(r"stats socket \S+ mode 600 level admin", rewritten) and "mode 666" not in rewritten
    assert len(rewritten.splitlines()) == len(rays_config.splitlines())


def test_the_wrapper_rewrites_the_file_haproxy_is_given_then_runs_the_real_binary(rays_config, tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(rays_config)
    fake = tmp_path / "haproxy"  # stands in for the real binary: prints what it was started with
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o700)
    done = subprocess.run([sys.executable, "-m", "raypipe.serving.loopback", str(fake), "41001", "41002",
                           "-db", "-f", str(config), "-sf", "123"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["-db", "-f", str(config), "-sf", "123"]
    assert _binds(config.read_text())["listen stats"] == ["127.0.0.1:41001"]


def test_prepare_makes_a_private_folder_and_an_executable_wrapper(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    env, folder = loopback.prepare()
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        wrapper = env["RAY_SERVE_HAPROXY_BINARY_PATH"]
        assert os.access(wrapper, os.X_OK) and wrapper.startswith(str(folder))
        assert all(env[key].startswith(str(folder)) for key in env if key.endswith(("_PATH", "_LOC", "_BASE", "_FILE"))
                   and key != "RAY_SERVE_HAPROXY_BINARY_PATH")
        # Ray appends a 56-character node id; a Unix socket path must stay under 108 bytes.
        assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 57 < 108
    finally:
        import shutil

        shutil.rmtree(folder)


def test_the_wrapper_survives_odd_paths_and_a_second_serve_in_one_process(tmp_path, monkeypatch):
    folder = tmp_path / "it's here"  # a quote in the path must neither break nor inject into the script
    folder.mkdir()
    fake = folder / "haproxy"
    fake.write_text("#!/bin/sh\necho real \"$@\"\n")
    fake.chmod(0o700)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(fake))
    monkeypatch.delenv(loopback.REAL_ENV, raising=False)
    env, first = loopback.prepare()
    try:
        done = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-v"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.split() == ["real", "-v"], done.stderr
        for key, value in env.items():  # as cmd_serve leaves them for a second serve in this process
            monkeypatch.setenv(key, value)
    finally:
        import shutil

        shutil.rmtree(first)
    env, second = loopback.prepare()
    try:
        assert env[loopback.REAL_ENV] == str(fake)  # the real binary, not the first (removed) wrapper
    finally:
        import shutil

        shutil.rmtree(second)


@pytest.mark.parametrize("overrides, needle", [
    ({"node_resource": "edge"}, "serve.node_resource: no node offers the resource 'edge'"),
    ({"cpus_per_replica": 4}, "serve.cpus_per_replica: 1 replica(s) x 4.0 CPUs need 4 CPUs; the cluster has 2"),
    ({"min_replicas": 3, "max_replicas": 3, "cpus_per_replica": 1}, "3 replica(s) x 1.0 CPUs"),
])
def test_replicas_an_embedded_ray_can_never_hold_are_refused_before_it_starts(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        server.check_fits_locally(ServeConfig(**overrides), cpus=2)
    server.check_fits_locally(ServeConfig(), cpus=2)  # the defaults fit a 2-CPU machine


def test_the_embedded_rays_token_is_written_for_its_owner_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    previous = os.umask(0o022)  # the usual umask: Ray's own writer would leave the token world-readable
    try:
        cli._ensure_auth_token()
    finally:
        os.umask(previous)
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    first = token.read_text()
    cli._ensure_auth_token()  # an existing token is the user's: kept as it is
    assert token.read_text() == first
