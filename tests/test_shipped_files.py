"""Every shipped serve/ file parses against Ray Serve's own schema and raypipe's builder arguments."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raypipe.serving.app import ServeArgs, build_app
from tests.conftest import REPO

SERVE_FILES = sorted((REPO / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_serve_configs_validate(path: Path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.http_options.host == "127.0.0.1"
    for app in schema.applications:
        assert app.import_path == "raypipe.serving.app:build_app"
        ServeArgs.model_validate(app.args)


def test_builder_refuses_an_unsealed_run(tmp_path):
    (tmp_path / "digits-x").mkdir()
    with pytest.raises(ValueError, match="no MANIFEST.json"):
        build_app({"run": str(tmp_path / "digits-x")})
