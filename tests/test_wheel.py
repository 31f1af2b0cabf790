"""raypipe as `pip install` leaves it, not as this checkout runs it: the wheel is built, installed into a fresh
venv and run from another directory, so every file a command reads must ship inside the package."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from raypipe import config
from tests.conftest import REPO


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_installed_wheel_finds_its_default_config(tmp_path):
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(REPO))
    wheel = next((tmp_path / "dist").glob("raypipe-*.whl"))
    assert {"raypipe/configs/default.yaml", "raypipe/ray_data_logging.yaml"} <= set(zipfile.ZipFile(wheel).namelist())

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    _run(sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "--quiet",
         "--disable-pip-version-check", "--no-deps", "--no-index", str(wheel))
    # raypipe's dependencies from the test venv, after the fresh venv's own site-packages (which hold the
    # wheel): this checkout is not on the path (a .pth line adds a folder; the editable install's .pth in it
    # is never read).
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    validated = _run(str(venv / "bin/raypipe"), "validate", cwd=tmp_path)
    packaged = site / "raypipe/configs/default.yaml"
    assert validated.stdout.splitlines() == [f"{packaged}: valid"]
    # `raypipe run` reads the same default: a bad override of it is refused by key, before Ray starts.
    refused = subprocess.run([str(venv / "bin/raypipe"), "run", "--set", "train.epochs=zero"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("raypipe: error: train.epochs:"), refused.stderr


def test_configs_default_yaml_is_the_packaged_default():
    # The repository's configs/ keeps pointing at the one file the package ships and loads.
    assert (REPO / "configs/default.yaml").resolve() == Path(str(config.DEFAULT_CONFIG)).resolve()
