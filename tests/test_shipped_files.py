"""Every shipped serve/ file parses against Ray Serve's own schema and raypipe's builder arguments."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raypipe.config import ServeConfig
from raypipe.serving.app import ServeArgs, build_app
from tests.conftest import REPO

SERVE_FILES = sorted((REPO / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_serve_configs_validate(path: Path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.http_options.host == "127.0.0.1"
    for app in schema.applications:
        assert app.import_path == "raypipe.serving.app:build_app"
        args = ServeArgs.model_validate(app.args)
        # Every key the file sets took effect (none silently dropped or defaulted).
        assert args.serve.model_dump(exclude_unset=True) == app.args["serve"]


def test_the_edge_profile_is_small_and_placed_on_edge_nodes():
    args = ServeArgs.model_validate(yaml.safe_load((REPO / "serve/edge.yaml").read_text())["applications"][0]["args"])
    assert args.variants == ["int8"] and args.serve.node_resource == "edge"
    assert args.serve.cpus_per_replica < ServeConfig().cpus_per_replica and args.serve.memory_mb


def test_builder_refuses_an_unsealed_run(tmp_path):
    (tmp_path / "digits-x").mkdir()
    with pytest.raises(ValueError, match="no MANIFEST.json"):
        build_app({"sources": [str(tmp_path / "digits-x")]})


def test_builder_refuses_unknown_arguments():
    with pytest.raises(ValueError, match="run"):
        ServeArgs.model_validate({"run": "/x", "sources": ["/x"]})


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_import_nothing_from_the_tests(path: Path):
    """A benchmark that imported tests.conftest would inherit its environment (e.g. a faster Ray Train
    poll) in every later round."""
    import ast

    tree = ast.parse(path.read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if m and m.split(".")[0] == "tests"]
