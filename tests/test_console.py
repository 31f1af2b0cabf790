"""What a person sees: `raypipe run` on a terminal (a pseudo-terminal here) tells the story in a few dozen
lines, piped output carries no progress-bar control characters, runs are listed and shown from the
terminal, and report.html opens on its own."""

import base64
import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path

import matplotlib.image
import pyte

from tests.conftest import REPO, raypipe

CONTROL = re.compile(r"\r|\x1b\[")


COLUMNS, ROWS = 200, 50


def _on_a_terminal(*args: str, timeout: float = 400) -> tuple[int, str]:
    """Run raypipe with stdout and stderr on a 200x50 pseudo-terminal, as in a person's shell."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "raypipe", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=follower, stderr=follower, env={**_without_test_settings(), "TERM": "xterm"})
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: every process writing to it has exited
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    os.close(leader)
    return process.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def _without_test_settings() -> dict[str, str]:
    """The environment a person's shell has: none of the settings conftest makes for the suite."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",)}


def _screen(text: str) -> list[str]:
    """The lines a terminal shows after this output: a terminal emulator (pyte) draws it, so a progress
    bar redrawn in place or erased when done leaves what it leaves on a real screen. The screen is tall
    enough that nothing scrolls off."""
    screen = pyte.Screen(COLUMNS, 2000)
    pyte.ByteStream(screen).feed(text.encode())
    rows = [row.rstrip() for row in screen.display]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def test_a_run_on_a_terminal_tells_the_story_in_few_lines(tmp_path):
    code, text = _on_a_terminal("run", "--smoke-test", "--set", f"storage.root={tmp_path}")
    assert code == 0, text[-3000:]
    rows = _screen(text)
    # The long config line wraps on screen; the rest is one row per line.
    assert len(rows) < 60, "\n".join(rows)
    lines = [row.strip() for row in rows]
    for stage in ("data", "train", "compress", "report"):
        assert any(re.match(rf"{stage}: done in [\d.]+ s", line) for line in lines), stage
    uri = lines[-1]
    assert uri.startswith(str(tmp_path)) and (Path(uri) / "MANIFEST.json").is_file()
    # The epoch bar was drawn with the figures as they came, then erased when training ended.
    assert re.search(r"train: epoch .* 4/4 .*train_loss [\d.]+, val_accuracy 0\.\d{4}", text)
    summary = "\n".join(rows)
    assert f"next      raypipe serve {uri}" in summary and f"run       {uri}" in summary
    assert re.search(r"promoted  (int8|pruned|pruned-int8): [\d.]+ KiB, test accuracy 0\.\d{4}", summary)
    # Ray's internals stayed in their files: no execution plans, no placement-group cleaner, no notices.
    for noise in ("Execution plan", "PlacementGroupCleaner", "State API", "tqdm is not installed",
                  "Token authentication", "Reporting training result"):
        assert noise not in text, noise


def test_piped_output_is_plain_timestamped_lines(smoke_run):
    stderr = smoke_run.process.stderr
    assert not CONTROL.search(stderr + smoke_run.process.stdout)
    log, _, summary = stderr.rstrip().rpartition("\n\n")  # the summary: the block after the last blank line
    assert summary.startswith("data ") and f"raypipe serve {smoke_run.uri}" in summary
    for line in log.splitlines():
        # raypipe's lines, or a warning Ray itself logged (its own timestamp, then the level)
        assert re.match(r"\d\d:\d\d:\d\d raypipe (INFO|WARNING) |\d{4}-\d\d-\d\d [\d:,]+\s+WARNING ", line), line
    assert "Progress bars" not in stderr and "dataset sampling" not in stderr
    assert "raypipe INFO train: epoch 4/4 train_loss" in log, "one line per epoch"
    # Before the first epoch's line, a wait of many seconds: said to be the workers starting.
    starting = log.index("raypipe INFO train: starting 2 Ray Train workers")
    assert log.index("raypipe INFO train: 4 epochs") < starting < log.index("raypipe INFO train: epoch 1/4")


def test_runs_lists_sealed_and_incomplete_runs(smoke_run, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(smoke_run.path, root / smoke_run.path.name)
    unfinished = root / "digits-20990101-000000-00beef"  # died during training: data, no train.json
    shutil.copytree(smoke_run.path / "data", unfinished / "data")
    (unfinished / "checkpoints").mkdir()
    done = raypipe("runs", str(root), "--json", timeout=60)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [(r["id"], r["state"]) for r in listed] == [
        (unfinished.name, "incomplete: training"), (smoke_run.path.name, "sealed")]
    assert listed[1]["promoted"] == smoke_run.report()["promoted"] and listed[1]["best_val_accuracy"] > 0.5
    table = raypipe("runs", str(root), timeout=60).stdout.splitlines()
    assert table[0].split() == ["id", "date", "model", "state", "best", "val", "acc", "promoted", "size"]
    assert table[1].startswith(unfinished.name) and table[2].startswith(smoke_run.path.name)


def test_show_prints_the_runs_summary(smoke_run):
    done = raypipe("show", smoke_run.uri, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"next      raypipe serve {smoke_run.uri}" in done.stdout
    assert done.stdout.strip() in smoke_run.process.stderr  # the same summary `run` ended with
    incomplete = raypipe("show", str(smoke_run.path / "data"), timeout=60)
    assert incomplete.returncode == 2 and "no report.json" in incomplete.stderr


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        self.links += [v for k, v in attrs.items() if k in ("href", "src") and tag != "img"]


def test_the_html_report_is_self_contained(smoke_run):
    page = _Links()
    page.feed((smoke_run.path / "report.html").read_text())
    assert len(page.images) == 2 and page.links == []
    for src in page.images:
        kind, _, data = src.partition(",")
        assert kind == "data:image/png;base64"
        png = base64.b64decode(data, validate=True)
        height, width, _ = matplotlib.image.imread(BytesIO(png), format="png").shape
        assert width > 300 and height > 200
    manifest = json.loads((smoke_run.path / "MANIFEST.json").read_text())
    assert "report.html" in manifest["files"]


def test_runs_lists_only_run_shaped_folders_and_survives_damage(tmp_path):
    (tmp_path / "m-20241399-000000-abcdef").mkdir()  # the shape of a run, an impossible date
    (tmp_path / "\x1b[31mEVIL\x1b[0m-20240101-000000-abcdef").mkdir()  # not a run name: never printed
    broken = tmp_path / "digits-20240102-000000-00beef"
    broken.mkdir()
    (broken / "train.json").write_text("[1, 2]")  # not a training summary
    done = raypipe("runs", str(tmp_path), "--json", timeout=60)
    assert done.returncode == 0, done.stderr
    listed = {r["id"]: r for r in json.loads(done.stdout)}
    assert set(listed) == {"m-20241399-000000-abcdef", broken.name}
    assert listed[broken.name]["state"] == "incomplete: trained (damaged)"
    assert listed["m-20241399-000000-abcdef"]["state"] == "unreadable"
    assert "\x1b" not in raypipe("runs", str(tmp_path), timeout=60).stdout
    bad_root = raypipe("runs", "gs://bucket/runs", timeout=60)
    assert bad_root.returncode == 2 and "storage.root: unsupported scheme" in bad_root.stderr


def test_show_refuses_a_damaged_report_naming_it(tmp_path):
    run = tmp_path / "digits-20240101-000000-abcdef"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"run_id": run.name, "data": {}}))
    done = raypipe("show", str(run), timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"raypipe: error: {run}/report.json: not a raypipe report (KeyError: 'train')"]


def test_durations_round_before_they_split_minutes():
    from raypipe.console import _duration

    assert [_duration(s) for s in (5, 59.96, 119.97, 125.34)] == ["5.0 s", "1 min 00.0 s", "2 min 00.0 s",
                                                                  "2 min 05.3 s"]
