"""`ray job submit ... -- python -m raypipe run --smoke-test` against a loopback head we start and stop."""

import pytest

from tests.conftest import Head


@pytest.fixture(scope="module")
def head():
    head = Head.start("--num-cpus=2")
    try:
        yield head
    finally:
        head.stop()


def test_job_submit_runs_the_smoke_pipeline(head, tmp_path):
    root = tmp_path / "runs"
    head.wait_for_job_server()
    done = head.ray("job", "submit", "--address", head.dashboard, "--working-dir", ".", "--",
                    "python", "-m", "raypipe", "run", "--smoke-test", "--set", f"storage.root={root}",
                    "--set", "compress.recipes={int8: [quantize]}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout
    runs = list(root.glob("digits-*"))
    assert len(runs) == 1 and (runs[0] / "MANIFEST.json").is_file()
    assert str(runs[0]) in done.stdout
