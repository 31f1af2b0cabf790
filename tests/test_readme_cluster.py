"""The README's `ray job submit` block, run as a newcomer would: in an empty home (no Ray token yet), from a copy
of the checkout, with only its two port numbers changed to free ones. It starts a loopback head with token
auth, submits the smoke run and stops the head; the job's log is raypipe's, with the run's URI last."""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.conftest import BIN, REPO, free_port

# A line raypipe logs when its output is not a terminal (the job log): "HH:MM:SS raypipe LEVEL ...".
RAYPIPE_LINE = re.compile(r"^\d\d:\d\d:\d\d raypipe (INFO|WARNING|ERROR) ")
# What Ray prints into a job's log that a raypipe user cannot act on (seen before raypipe quieted it).
RAY_CHATTER = ("PreemptionWatcher", "Reporting training result", "SplitCoordinator", "DeprecationWarning",
               "RayDeprecationWarning", "Started a local Ray instance", "Connecting to existing Ray cluster")


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### On a Ray cluster with `ray job submit`"):]
    return section[section.index("```bash\n") + len("```bash\n"):section.index("```\n", section.index("```bash"))]


def test_the_readme_cluster_block_works_in_an_empty_home(tmp_path):
    block = readme_block()
    assert "--port=6379" in block and "8265" in block
    port = free_port()
    block = block.replace("--port=6379", f"--port={port}").replace("8265", str(free_port()))
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info",
                                                                    ".pytest_cache", "benchmarks"))
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}:{env['PATH']}")
    shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=checkout, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = shell.communicate(timeout=420)
    finally:
        _end(shell)
        # A head stopped by its process (not `ray stop`) leaves its address in Ray's default temp folder,
        # where a bare ray.init() would look for it: gone with the head it named.
        address = Path("/tmp/ray/ray_current_cluster")
        if address.is_file() and address.read_text().strip().endswith(f":{port}"):
            address.unlink()
    (tmp_path / "output.txt").write_text(output)
    assert shell.returncode == 0, output[-4000:]

    token = home / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_mode & 0o777 == 0o600
    runs = list((checkout / "runs").glob("digits-*"))
    assert len(runs) == 1 and (runs[0] / "MANIFEST.json").is_file(), output[-3000:]
    assert "succeeded" in output

    # What the job printed: from its entrypoint's start to `ray job submit`'s closing status lines.
    log = output[output.index("Running entrypoint for job"):].splitlines()[1:]
    log = log[:next(i for i, line in enumerate(log) if "WebSocket closed for job" in line or "--------" in line)]
    lines = [line for line in log if line.strip()]
    assert lines[-1] == str(runs[0]), lines[-5:]  # the URI last
    assert any(RAYPIPE_LINE.match(line) for line in lines)
    noise = [line for line in lines if any(word in line for word in RAY_CHATTER)]
    assert not noise, noise[:5]
    # Every other line is raypipe's (its log lines and the run's summary) or a Ray warning or error.
    summary = [line for line in lines if not RAYPIPE_LINE.match(line) and line != lines[-1]]
    foreign = [line for line in summary if re.search(r"\bINFO\b", line)]
    assert not foreign, foreign[:5]

    # Stopped: nothing the head started is left (they all inherited the empty home).
    deadline = time.monotonic() + 30
    while [p for p in psutil.process_iter(["environ"]) if _ours(p, home)]:
        assert time.monotonic() < deadline, [p.name() for p in psutil.process_iter(["environ"]) if _ours(p, home)]
        time.sleep(1)


def _ours(proc: psutil.Process, home: Path) -> bool:
    try:
        return (proc.info["environ"] or {}).get("HOME") == str(home)
    except psutil.Error:
        return False


def _end(shell: subprocess.Popen) -> None:
    """If the block failed half way, end what it started: its session (the head started with --block ends
    its own processes on SIGTERM)."""
    if shell.poll() is None:
        os.killpg(shell.pid, signal.SIGTERM)
        try:
            shell.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
