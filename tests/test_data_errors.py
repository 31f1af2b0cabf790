"""Bad sources exit 2 naming the file and column, before Ray starts and with nothing written; a
failure found later leaves a run without MANIFEST.json (visibly incomplete)."""

import numpy as np
import pandas as pd
import pytest

from tests.conftest import raypipe


def _frame(n=20):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "label": rng.integers(0, 2, n)})


def _run(tmp_path, source, *extra):
    root = tmp_path / "runs"
    done = raypipe("run", "--set", f"data.source={source}", "--set", f"storage.root={root}", *extra, timeout=120)
    return done, root


def _fails_cleanly(done, root, *needles):
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("raypipe: error:"), last
    for needle in needles:
        assert needle in last, last
    assert not root.exists() and "ray: starting" not in done.stderr


def test_missing_label_column(tmp_path):
    _frame().drop(columns="label").to_parquet(tmp_path / "x.parquet")
    done, root = _run(tmp_path, tmp_path / "x.parquet")
    _fails_cleanly(done, root, "x.parquet", "'label'")


def test_missing_feature_column(tmp_path):
    _frame().to_csv(tmp_path / "x.csv", index=False)
    done, root = _run(tmp_path, tmp_path / "x.csv", "--set", "data.features=[a, c]")
    _fails_cleanly(done, root, "x.csv", "'c'")


def test_wrong_dtype(tmp_path):
    _frame().assign(b="text").to_csv(tmp_path / "x.csv", index=False)
    done, root = _run(tmp_path, tmp_path / "x.csv")
    _fails_cleanly(done, root, "x.csv", "'b'", "numeric")


def test_unreadable_file_among_good_ones(tmp_path):
    _frame().to_parquet(tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    done, root = _run(tmp_path, tmp_path)
    _fails_cleanly(done, root, "b.parquet", "not a readable parquet file")


@pytest.mark.parametrize("source, needle", [("/nonexistent/data", "does not exist"), ("ftp://host/x", "scheme")])
def test_missing_or_unsupported_source(tmp_path, source, needle):
    done, root = _run(tmp_path, source)
    _fails_cleanly(done, root, needle)


def test_loose_images_need_class_folders(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    done, root = _run(tmp_path, tmp_path)
    _fails_cleanly(done, root, "one.png", "sub-folder per class")


def test_a_failure_after_start_leaves_no_manifest(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "img" / cls / f"{i}.png")
    (tmp_path / "img" / "b" / "5.png").write_bytes(b"not a png")  # inspection opens only the first image
    done, root = _run(tmp_path, tmp_path / "img", "--set", "model.arch=cnn")
    assert done.returncode == 1, done.stderr[-2000:]
    runs = list(root.iterdir())
    assert len(runs) == 1 and (runs[0] / "config.yaml").exists() and not (runs[0] / "MANIFEST.json").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--set", "model.arch=cnn", "--set", "data.augment.ops=[]"], ["model.arch", "cnn needs image data"]),
    (["--set", "data.augment.ops=[crop, noise]"], ["data.augment.ops", "['crop'] need image data"]),
])
def test_settings_that_need_images_are_refused_on_tabular_data(tmp_path, extra, needles):
    source = tmp_path / "table.csv"
    _frame().to_csv(source, index=False)
    done, root = _run(tmp_path, source, *extra)
    _fails_cleanly(done, root, *needles)
