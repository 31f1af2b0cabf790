"""Bundles: what `raypipe export` writes and edge servers pull, verify and cache by digest.

A bundle is a folder (local or s3://) that is also a Triton model repository:

    <bundle>/bundle.json                     models, versions, every file's sha256; written last
    <bundle>/<model>/config.pbtxt            Triton's model config (ONNX Runtime backend, all versions)
    <bundle>/<model>/<n>/model.onnx          one numbered version per variant (bundle.json maps the names)

Its digest is the sha256 of bundle.json, so equal digests mean equal bundles: a fleet pulls a bundle from
S3 or disk once per node into a cache keyed by that digest, like a CDN. A cached copy is used only while
its bundle.json still hashes to the digest and its files to what that bundle.json records; with the digest
pinned, such a copy needs no source at all. Imports neither Ray nor torch.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from raypipe.config import ConfigError
from raypipe.serving.catalog import (BUNDLE, BUNDLE_FORMAT, BundleManifest, FileEntry, ModelSpec, bundle_digest,
                                     check_digest, open_sources, pinned, read_model, safe_path)
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


@dataclass(frozen=True)
class Pulled:
    """A verified copy of a bundle in the cache, and how it was had."""

    path: Path  # cache/<the digest's hex>
    digest: str
    fetched: bool  # False: the cache had it already
    source_read: bool  # False: the digest was pinned and cached, so the source was not reached at all
    damaged: list[str]  # files of a local source that do not match its bundle.json (the cached copy is whole)


def cached(cache: Path, digest: str) -> Path | None:
    """The copy of bundle `digest` in the cache, if whole: its bundle.json hashes to `digest` and every file
    to what that bundle.json records. None when absent or damaged."""
    target = cache / pinned(digest, "digest").removeprefix("sha256:")
    try:
        manifest = (target / BUNDLE).read_bytes()
    except OSError:
        return None
    if bundle_digest(manifest) != digest:
        return None
    files = BundleManifest.parse(manifest, str(target / BUNDLE)).files
    for rel in files:
        safe_path(str(target), rel)
    return None if _problems(target, files) else target


def pull(uri: str, cache: Path = DEFAULT_CACHE, digest: str | None = None) -> Pulled:
    """A verified local copy of the bundle at `uri`, under `cache/<digest>`; fetched only when absent.

    With `digest` pinned and a whole copy cached, the source is not reached. Otherwise bundle.json is read
    (and checked against `digest` when pinned); a whole cached copy of its digest is used (a local
    source's files are checked too, and those that differ reported); else every file is checked against
    bundle.json before the copy is published by one rename. A mismatch is a ConfigError naming the file."""
    uri = uri.rstrip("/")
    if digest is not None and (target := cached(cache, digest)) is not None:
        return Pulled(target, digest, fetched=False, source_read=False, damaged=[])
    try:
        manifest = read_bytes(f"{uri}/{BUNDLE}")
    except FileNotFoundError:
        raise ConfigError(f"{uri}: no {BUNDLE} (not a bundle, or an incomplete one)") from None
    actual = check_digest(manifest, f"{uri}/{BUNDLE}", digest)
    files = BundleManifest.parse(manifest, f"{uri}/{BUNDLE}").files
    for rel in files:
        safe_path(uri, rel)
    if (target := cached(cache, actual)) is not None:
        damaged = [] if uri.startswith("s3://") else _problems(Path(uri).expanduser(), files)
        return Pulled(target, actual, fetched=False, source_read=True, damaged=damaged)
    target = cache / actual.removeprefix("sha256:")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".pull-"))
    staging.chmod(0o777 & ~UMASK)  # mkdtemp makes 0700; the workers of other users may read the cache
    try:
        for rel, entry in files.items():
            try:
                blob = read_bytes(f"{uri}/{rel}")
            except FileNotFoundError:
                raise ConfigError(f"{uri}/{rel}: missing from the bundle") from None
            if sha256_bytes(blob) != entry.sha256:
                raise ConfigError(f"{uri}/{rel}: sha256 does not match {BUNDLE}")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(blob)
        (staging / BUNDLE).write_bytes(manifest)
        if cached(cache, actual) is not None:  # another pull published a whole copy meanwhile: keep it
            return Pulled(target, actual, fetched=True, source_read=True, damaged=[])
        if target.is_dir():  # a damaged earlier copy: set aside, then removed
            damaged = Path(tempfile.mkdtemp(dir=cache, prefix=".damaged-"))
            os.replace(target, damaged / "copy")
            shutil.rmtree(damaged, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process published the same digest first: use its copy if whole
            if cached(cache, actual) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Pulled(target, actual, fetched=True, source_read=True, damaged=[])


def _problems(folder: Path, files: dict[str, FileEntry]) -> list[str]:
    """What differs between a folder and the files its bundle.json records, one line per file."""
    problems = []
    for rel, entry in files.items():
        if not (folder / rel).is_file():
            problems.append(f"{rel}: missing")
        elif sha256_bytes((folder / rel).read_bytes()) != entry.sha256:
            problems.append(f"{rel}: sha256 does not match {BUNDLE}")
    return problems
