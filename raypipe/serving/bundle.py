"""Bundles: what `raypipe export` writes and edge servers pull, verify and cache by digest.

A bundle is a folder (local or s3://) that is also a Triton model repository:

    <bundle>/bundle.json                     models, versions, every file's sha256; written last
    <bundle>/<model>/config.pbtxt            Triton's model config (ONNX Runtime backend, all versions)
    <bundle>/<model>/<n>/model.onnx          one numbered version per variant (bundle.json maps the names)

Its digest is the sha256 of bundle.json, so equal digests mean equal bundles: a fleet pulls a bundle from
S3 or disk once per node into a cache keyed by that digest, like a CDN. Imports neither Ray nor torch.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path

from raypipe.config import ConfigError
from raypipe.serving.catalog import (BUNDLE, BUNDLE_FORMAT, ModelSpec, bundle_digest, open_sources, read_model,
                                     safe_path)
from raypipe.storage import UMASK, filesystem, read_bytes, sha256_bytes, strip_scheme, write_bytes

DEFAULT_CACHE = Path(os.environ.get("RAYPIPE_CACHE", "~/.cache/raypipe")).expanduser() / "bundles"


def triton_config(spec: ModelSpec, input_name: str, output_name: str) -> str:
    """config.pbtxt for Triton's ONNX Runtime backend: batch dimension implicit, every version served."""
    return (
        f'name: "{spec.name}"\n'
        'backend: "onnxruntime"\n'
        'max_batch_size: 4096\n'
        "version_policy: { all: {} }\n"
        f'input [ {{ name: "{input_name}" data_type: TYPE_FP32 dims: [ {spec.features} ] }} ]\n'
        f'output [ {{ name: "{output_name}" data_type: TYPE_FP32 dims: [ {spec.classes} ] }} ]\n'
        "dynamic_batching { }\n"
    )


def _io_names(blob: bytes) -> tuple[str, str]:
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return session.get_inputs()[0].name, session.get_outputs()[0].name


def export(sources: list[str], to: str, variants: list[str] | None = None) -> str:
    """Write a bundle of the sources' promoted variant (or the chosen `variants`) to `to`; returns its
    digest. Refuses a destination that already holds files, so a published bundle never changes."""
    to = to.rstrip("/")
    fs = filesystem(to)
    if fs.exists(strip_scheme(to)) and fs.find(strip_scheme(to)):
        raise ConfigError(f"--to {to}: already holds files; export to a new location")
    catalog = open_sources(sources, variants)
    files, models = {}, {}
    for spec in catalog.models.values():
        chosen = variants or [spec.promoted]
        versions = {}
        for number, name in enumerate(chosen, start=1):
            version = spec.versions[name]
            blob, rel = read_model(version), f"{spec.name}/{number}/model.onnx"
            write_bytes(f"{to}/{rel}", blob)
            files[rel] = {"sha256": version.sha256, "size": len(blob)}
            versions[name] = {"file": rel, "triton_version": number, "sha256": version.sha256,
                              "size_bytes": len(blob), "test_accuracy": version.test_accuracy,
                              "format": version.format}
        config = triton_config(spec, *_io_names(blob)).encode()
        write_bytes(f"{to}/{spec.name}/config.pbtxt", config)
        files[f"{spec.name}/config.pbtxt"] = {"sha256": sha256_bytes(config), "size": len(config)}
        models[spec.name] = {"promoted": spec.promoted if spec.promoted in versions else chosen[0],
                             "features": spec.features, "classes": spec.classes, "source": spec.source,
                             "versions": versions}
    manifest = json.dumps({"format": BUNDLE_FORMAT, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                           "models": models, "files": files}, indent=2).encode()
    write_bytes(f"{to}/{BUNDLE}", manifest)  # last: a bundle without it is incomplete
    return bundle_digest(manifest)


def pull(uri: str, cache: Path = DEFAULT_CACHE, digest: str | None = None) -> Path:
    """A verified local copy of the bundle at `uri`, under `cache/<digest>`; fetched only when absent.

    Every file is checked against bundle.json (and bundle.json against `digest` when given) before the
    copy is published by one rename; a mismatch is a ConfigError naming the file."""
    uri = uri.rstrip("/")
    try:
        manifest = read_bytes(f"{uri}/{BUNDLE}")
    except FileNotFoundError:
        raise ConfigError(f"{uri}: no {BUNDLE} (not a bundle, or an incomplete one)") from None
    actual = bundle_digest(manifest)
    if digest is not None and digest != actual:
        raise ConfigError(f"{uri}/{BUNDLE}: digest {actual} is not the expected {digest}")
    target = cache / actual.removeprefix("sha256:")
    try:
        files = json.loads(manifest)["files"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{uri}/{BUNDLE}: not a bundle manifest (no files)") from None
    for rel in files:
        safe_path(uri, rel)
    if target.is_dir() and not _problems(target, files):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".pull-"))
    staging.chmod(0o777 & ~UMASK)  # mkdtemp makes 0700; the workers of other users may read the cache
    try:
        for rel, entry in files.items():
            try:
                blob = read_bytes(f"{uri}/{rel}")
            except FileNotFoundError:
                raise ConfigError(f"{uri}/{rel}: missing from the bundle") from None
            if sha256_bytes(blob) != entry["sha256"]:
                raise ConfigError(f"{uri}/{rel}: sha256 does not match {BUNDLE}")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(blob)
        (staging / BUNDLE).write_bytes(manifest)
        if target.is_dir():  # a damaged earlier copy: set aside, then removed
            damaged = Path(tempfile.mkdtemp(dir=cache, prefix=".damaged-"))
            os.replace(target, damaged / "copy")
            shutil.rmtree(damaged, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process published the same digest first: use its copy if whole
            if _problems(target, files):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _problems(folder: Path, files: dict[str, dict]) -> list[str]:
    return [rel for rel, entry in files.items()
            if not (folder / rel).is_file() or sha256_bytes((folder / rel).read_bytes()) != entry["sha256"]]
