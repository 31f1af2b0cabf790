"""What a server serves: models by name, each accepted variant a version, opened from sealed runs or bundles.

A run is verified against its MANIFEST.json (only the files serving reads); a bundle against its
bundle.json. Either manifest may be pinned by its sha256 (a source's digest); every manifest and record is
parsed from the very bytes that were checked. Every model file is checked against its recorded sha256 again
when it is loaded, so a replica or edge worker never runs bytes that differ from what was verified. Model
and version names are checked by the config's rules wherever they are read, since they become paths and
URL segments. Imports neither Ray nor torch.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raypipe.config import ConfigError
from raypipe.records import DataStats, ModelName, Record, RunReport, VariantName
from raypipe.storage import MANIFEST, RunPaths, filesystem, read_bytes, sha256_bytes

BUNDLE = "bundle.json"
BUNDLE_FORMAT = "raypipe-bundle/1"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


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


class FileEntry(Record):
    sha256: str
    size: int


class RunManifest(Record):
    """A run's MANIFEST.json: every file's sha256 and size."""

    model_config = ConfigDict(extra="ignore")

    files: dict[str, FileEntry]


def open_run(uri: str, variants: list[str] | None = None, digest: str | None = None) -> ModelSpec:
    """A sealed run's accepted variants. The files serving reads (MANIFEST.json, report.json,
    data/stats.json) are each read once, checked, and parsed from the bytes checked; `digest` pins the run
    to the sha256 of its MANIFEST.json."""
    paths = RunPaths.open(uri)
    try:
        sealed = paths.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise ConfigError(f"{paths.uri}: refusing to serve: no {MANIFEST} (the run is incomplete or failed)") from None
    check_digest(sealed, f"{paths.uri}/{MANIFEST}", digest)
    manifest = RunManifest.parse(sealed, f"{paths.uri}/{MANIFEST}").files
    report = RunReport.parse(_checked(paths, manifest, "report.json"), f"{paths.uri}/report.json")
    stats = DataStats.parse(_checked(paths, manifest, "data/stats.json"), f"{paths.uri}/data/stats.json")
    versions = {}
    for variant in report.variants:
        if not variant.accepted:
            continue
        rel = f"models/{variant.name}/model.onnx"
        entry = manifest.get(rel)
        if entry is None:
            raise ConfigError(f"{paths.uri}: refusing to serve: {rel}: not in the manifest")
        versions[variant.name] = VersionSpec(uri=paths.child_uri(rel), sha256=entry.sha256, size_bytes=entry.size,
                                             test_accuracy=variant.test_accuracy, format=variant.format)
    name = report.config.name
    promoted, versions = _choose(name, paths.uri, report.promoted, versions, variants)
    return ModelSpec(name=name, promoted=promoted, features=stats.features, classes=stats.num_classes,
                     source=paths.uri, versions=versions)


def _checked(paths: RunPaths, manifest: dict[str, FileEntry], rel: str) -> bytes:
    """The bytes of a run's file, read once and refused unless they match the manifest."""
    if rel not in manifest:
        problem = "not in the manifest"
    else:
        try:
            data = paths.read_bytes(rel)
        except FileNotFoundError:
            problem = "missing"
        else:
            if sha256_bytes(data) == manifest[rel].sha256:
                return data
            problem = "sha256 does not match the manifest"
    raise ConfigError(f"{paths.uri}: refusing to serve: {rel}: {problem}")


def bundle_digest(manifest: bytes) -> str:
    """A bundle's identity: the sha256 of its bundle.json, which holds the sha256 of every other file. A
    run's digest is the same of its MANIFEST.json."""
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def pinned(digest: str, source: str) -> str:
    """A pin as given for `source`, refused unless it has a digest's form (it also names a cache folder)."""
    if not re.fullmatch(DIGEST_PATTERN, digest):
        raise ConfigError(f"{source}: pinned digest {digest!r} is not 'sha256:' and 64 lowercase hex digits")
    return digest


def check_digest(manifest: bytes, where: str, digest: str | None) -> str:
    """The digest of a manifest's bytes; ConfigError naming the file when a pinned `digest` differs."""
    if digest is not None:
        pinned(digest, where)
    actual = bundle_digest(manifest)
    if digest is not None and digest != actual:
        raise ConfigError(f"{where}: digest {actual} is not the expected {digest}")
    return actual


def safe_path(uri: str, rel: str) -> str:
    """`rel` if it names a file inside the bundle; a path that climbs out (or is absolute) is refused."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"{uri}/{BUNDLE}: file path {rel!r} leaves the bundle")
    return rel


class BundleVersion(Record):
    file: str = Field(description="The model file, relative to the bundle.")
    triton_version: int
    sha256: str
    size_bytes: int
    test_accuracy: float
    format: str


class BundleModel(Record):
    promoted: VariantName
    features: int
    classes: int
    source: str
    versions: dict[VariantName, BundleVersion]


class BundleManifest(Record):
    """bundle.json, as `export` writes it and pulls and servers read it."""

    format: Literal[BUNDLE_FORMAT]
    created: str
    models: dict[ModelName, BundleModel]
    files: dict[str, FileEntry]


def open_bundle(uri: str, variants: list[str] | None = None, digest: str | None = None) -> list[ModelSpec]:
    """The models of a bundle written by `raypipe export`, from its bundle.json read once (and checked
    against `digest` when pinned); model files are checked on load."""
    uri = uri.rstrip("/")
    if not uri.startswith("s3://"):
        uri = str(Path(uri).expanduser().resolve())
    try:
        data = read_bytes(f"{uri}/{BUNDLE}")
    except FileNotFoundError:
        raise ConfigError(f"{uri}: no {BUNDLE} (not a bundle, or an incomplete one)") from None
    check_digest(data, f"{uri}/{BUNDLE}", digest)
    manifest = BundleManifest.parse(data, f"{uri}/{BUNDLE}")
    specs = []
    for name, model in manifest.models.items():
        versions = {v: VersionSpec(uri=f"{uri}/{safe_path(uri, entry.file)}", sha256=entry.sha256,
                                   size_bytes=entry.size_bytes, test_accuracy=entry.test_accuracy, format=entry.format)
                    for v, entry in model.versions.items()}
        promoted, versions = _choose(name, uri, model.promoted, versions, variants)
        specs.append(ModelSpec(name=name, promoted=promoted, features=model.features, classes=model.classes,
                               source=uri, versions=versions))
    return specs


def is_bundle(uri: str) -> bool:
    uri = uri.rstrip("/")
    return filesystem(uri).exists(f"{uri.removeprefix('s3://')}/{BUNDLE}")


def open_sources(uris: list[str], variants: list[str] | None = None,
                 digests: dict[str, str] | None = None) -> Catalog:
    """One catalog over runs and bundles, each pinned to its digest in `digests` (by URI as given) when
    there; a missing source, a failed check or a clash of names is a ConfigError naming it."""
    specs: list[ModelSpec] = []
    for uri in uris:
        if not uri.startswith("s3://") and "://" in uri:
            raise ConfigError(f"{uri}: unsupported scheme: use a local path or s3://")
        digest = (digests or {}).get(uri)
        specs += open_bundle(uri, variants, digest) if is_bundle(uri) else [open_run(uri, variants, digest)]
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
