"""What a server serves: models by name, each accepted variant a version, opened from sealed runs or bundles.

A run is verified against its MANIFEST.json (only the files serving reads); a bundle against its
bundle.json. Every model file is checked against its recorded sha256 again when it is loaded, so a replica
or edge worker never runs bytes that differ from what was verified. Imports neither Ray nor torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raypipe.config import ConfigError
from raypipe.records import DataStats, RunReport
from raypipe.storage import RunPaths, filesystem, read_bytes, sha256_bytes

BUNDLE = "bundle.json"
BUNDLE_FORMAT = "raypipe-bundle/1"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VersionSpec(_Frozen):
    """One servable variant of a model."""

    uri: str = Field(description="Where the ONNX file lives: a local path or s3:// URI.")
    sha256: str = Field(description="The file's sha256, checked whenever it is loaded.")
    size_bytes: int
    test_accuracy: float
    format: str = "onnx"


class ModelSpec(_Frozen):
    """A model as the REST API declares it."""

    name: str
    promoted: str = Field(description="The version served when a path names none.")
    features: int
    classes: int
    source: str = Field(description="The run or bundle it came from.")
    versions: dict[str, VersionSpec]

    def metadata(self, version: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, self.features]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, self.classes]},
            ],
            "parameters": {"version": version, "promoted": self.promoted,
                           "test_accuracy": self.versions[version].test_accuracy},
        }


class Catalog(_Frozen):
    """Every model one server serves, by name."""

    models: dict[str, ModelSpec]

    @classmethod
    def combine(cls, specs: list[ModelSpec]) -> Catalog:
        models: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.name in models:
                raise ConfigError(f"{spec.source}: model name {spec.name!r} is already served from "
                                  f"{models[spec.name].source}; give one run another `name`")
            models[spec.name] = spec
        return cls(models=models)


def _choose(name: str, source: str, promoted: str, versions: dict[str, VersionSpec],
            variants: list[str] | None) -> tuple[str, dict[str, VersionSpec]]:
    """Keep the chosen variants (default: all); the promoted one stays default if kept."""
    if variants:
        missing = [v for v in variants if v not in versions]
        if missing:
            raise ConfigError(f"{source}: {name} has no accepted variant {missing[0]!r}; it has {list(versions)}")
        versions = {v: versions[v] for v in variants}
        promoted = promoted if promoted in versions else variants[0]
    return promoted, versions


def open_run(uri: str, variants: list[str] | None = None) -> ModelSpec:
    """A sealed run's accepted variants, after checking the files serving reads against its manifest."""
    paths = RunPaths.open(uri)
    if not paths.exists("MANIFEST.json"):
        raise ConfigError(f"{paths.uri}: refusing to serve: no MANIFEST.json (the run is incomplete or failed)")
    manifest = paths.read_json("MANIFEST.json")["files"]
    problems = paths.verify(["report.json", "data/stats.json"])
    if problems:
        raise ConfigError(f"{paths.uri}: refusing to serve: {problems[0]}")
    report, stats = RunReport.read(paths, "report.json"), DataStats.read(paths, "data/stats.json")
    versions = {}
    for variant in report.variants:
        if not variant.accepted:
            continue
        rel = f"models/{variant.name}/model.onnx"
        entry = manifest.get(rel)
        if entry is None:
            raise ConfigError(f"{paths.uri}: refusing to serve: {rel}: not in the manifest")
        versions[variant.name] = VersionSpec(uri=paths.child_uri(rel), sha256=entry["sha256"],
                                             size_bytes=entry["size"], test_accuracy=variant.test_accuracy,
                                             format=variant.format)
    name = report.config["name"]
    promoted, versions = _choose(name, paths.uri, report.promoted, versions, variants)
    return ModelSpec(name=name, promoted=promoted, features=stats.features, classes=stats.num_classes,
                     source=paths.uri, versions=versions)


def bundle_digest(manifest: bytes) -> str:
    """A bundle's identity: the sha256 of its bundle.json, which holds the sha256 of every other file."""
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def safe_path(uri: str, rel: str) -> str:
    """`rel` if it names a file inside the bundle; a path that climbs out (or is absolute) is refused."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"{uri}/{BUNDLE}: file path {rel!r} leaves the bundle")
    return rel


def open_bundle(uri: str, variants: list[str] | None = None) -> list[ModelSpec]:
    """The models of a bundle written by `raypipe export` (its bundle.json; files checked on load)."""
    uri = uri.rstrip("/")
    if not uri.startswith("s3://"):
        uri = str(Path(uri).expanduser().resolve())
    manifest = json.loads(read_bytes(f"{uri}/{BUNDLE}"))
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ConfigError(f"{uri}/{BUNDLE}: not a {BUNDLE_FORMAT} bundle")
    specs = []
    try:
        for name, model in manifest["models"].items():
            versions = {v: VersionSpec(uri=f"{uri}/{safe_path(uri, entry['file'])}", sha256=entry["sha256"],
                                       size_bytes=entry["size_bytes"], test_accuracy=entry["test_accuracy"],
                                       format=entry["format"])
                        for v, entry in model["versions"].items()}
            promoted, versions = _choose(name, uri, model["promoted"], versions, variants)
            specs.append(ModelSpec(name=name, promoted=promoted, features=model["features"],
                                   classes=model["classes"], source=uri, versions=versions))
    except (KeyError, TypeError, AttributeError, ValidationError) as err:
        raise ConfigError(f"{uri}/{BUNDLE}: not a {BUNDLE_FORMAT} bundle ({type(err).__name__}: {err})") from None
    return specs


def is_bundle(uri: str) -> bool:
    uri = uri.rstrip("/")
    return filesystem(uri).exists(f"{uri.removeprefix('s3://')}/{BUNDLE}")


def open_sources(uris: list[str], variants: list[str] | None = None) -> Catalog:
    """One catalog over runs and bundles; a missing source, a failed check or a clash of names is a
    ConfigError naming it."""
    specs: list[ModelSpec] = []
    for uri in uris:
        if not uri.startswith("s3://") and "://" in uri:
            raise ConfigError(f"{uri}: unsupported scheme: use a local path or s3://")
        specs += open_bundle(uri, variants) if is_bundle(uri) else [open_run(uri, variants)]
    catalog = Catalog.combine(specs)
    for spec in specs:  # fail here, naming the file, rather than later in a replica
        for version in spec.versions.values():
            read_model(version)
    return catalog


def read_model(version: VersionSpec) -> bytes:
    """The model file's bytes, refused unless they match the recorded sha256."""
    try:
        blob = read_bytes(version.uri)
    except FileNotFoundError:
        raise ConfigError(f"{version.uri}: missing") from None
    if sha256_bytes(blob) != version.sha256:
        raise ConfigError(f"{version.uri}: sha256 does not match the recorded digest (changed since it was sealed)")
    return blob
