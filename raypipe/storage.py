"""The only module that knows URIs: local paths and s3:// through fsspec/s3fs.

Every stage reads and writes a run through `RunPaths`. Writes are atomic where the store allows: a local
file is written under a temporary name and renamed; an S3 object appears whole on PUT. `seal` writes
MANIFEST.json last, so a run without one is incomplete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import posixpath
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec

from raypipe.config import ConfigError, S3Config, StorageConfig

if TYPE_CHECKING:
    import pyarrow.fs

MANIFEST = "MANIFEST.json"
# The process's umask, read once at import (reading it means setting it, which is not thread-safe later).
UMASK = os.umask(0o022)
os.umask(UMASK)


def filesystem(uri: str, s3: S3Config | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a URI; S3 settings come from config, else the AWS variables."""
    if not uri.startswith("s3://"):
        return fsspec.filesystem("file")
    s3 = s3 or S3Config()
    options: dict[str, Any] = {}
    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    if s3.region:
        options["client_kwargs"] = {"region_name": s3.region}
    if s3.access_key_id and s3.secret_access_key:
        options["key"] = s3.access_key_id.get_secret_value()
        options["secret"] = s3.secret_access_key.get_secret_value()
    return fsspec.filesystem("s3", **options)


def strip_scheme(uri: str) -> str:
    return uri.removeprefix("s3://")


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """A pyarrow view of an fsspec filesystem, for Ray Data and Ray Train (which take pyarrow)."""
    import pyarrow.fs  # not at import: the edge server uses this module without pyarrow

    if "file" in fs.protocol:  # a str or a tuple of names, depending on the implementation
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes(uri: str, data: bytes, s3: S3Config | None = None) -> None:
    """Write a file whole: a local file under a temporary name, then renamed; an S3 object in one PUT."""
    fs, target = filesystem(uri, s3), strip_scheme(uri)
    if uri.startswith("s3://"):
        fs.pipe_file(target, data)
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o666 & ~UMASK)  # mkstemp makes 0600; give what open() would give
            out.write(data)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename makes it visible (MANIFEST.json comes last)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def read_bytes(uri: str, s3: S3Config | None = None) -> bytes:
    return filesystem(uri, s3).cat_file(strip_scheme(uri))


@dataclass(frozen=True)
class RunPaths:
    """One run's folder: `<root>/<run_id>/`, local or on S3."""

    root: str
    run_id: str
    s3: S3Config

    @classmethod
    def create(cls, storage: StorageConfig, name: str) -> RunPaths:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        return cls(storage.root, f"{name}-{stamp}-{secrets.token_hex(3)}", storage.s3)

    @classmethod
    def open(cls, uri: str, s3: S3Config | None = None) -> RunPaths:
        """An existing run by its URI (what `raypipe run` printed)."""
        uri = uri.rstrip("/")
        if not uri.startswith("s3://"):
            uri = str(Path(uri).expanduser().resolve())
        root, _, run_id = uri.rpartition("/")
        paths = cls(root, run_id, s3 or S3Config())
        if not paths.fs.isdir(paths.path("")):
            raise ConfigError(f"{uri}: no such run")
        return paths

    @property
    def uri(self) -> str:
        return f"{self.root}/{self.run_id}"

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return filesystem(self.root, self.s3)

    @property
    def arrow_fs(self) -> pyarrow.fs.FileSystem:
        return arrow_filesystem(self.fs)

    def path(self, rel: str) -> str:
        """Filesystem path (no scheme) of a file in this run, as fsspec and pyarrow want it."""
        return posixpath.join(strip_scheme(self.uri), rel) if rel else strip_scheme(self.uri)

    def child_uri(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        write_bytes(self.child_uri(rel), data, self.s3)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=False).encode())

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def sha256(self, rel: str) -> tuple[str, int]:
        """(sha256, size) of a file in the run, streamed in chunks rather than read whole."""
        digest, size = hashlib.sha256(), 0
        with self.fs.open(self.path(rel), "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def remove(self, rel: str) -> None:
        """Delete a file or folder of the run, if there."""
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)

    def upload_dir(self, local_dir: str | os.PathLike, rel: str) -> None:
        """Copy a local folder into the run, file by file, each write atomic."""
        local_dir = Path(local_dir)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.write_bytes(f"{rel}/{file.relative_to(local_dir).as_posix()}", file.read_bytes())

    def download_dir(self, rel: str, local_dir: str | os.PathLike) -> Path:
        local_dir = Path(local_dir)
        base = self.path(rel)
        for remote in self.fs.find(base):
            target = local_dir / posixpath.relpath(remote, base)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.fs.cat_file(remote))
        return local_dir

    def files(self) -> list[str]:
        """Relative paths of every file in the run, MANIFEST.json and temporaries excluded."""
        base = self.path("")
        rels = (posixpath.relpath(p, base) for p in self.fs.find(base))
        return sorted(r for r in rels if r != MANIFEST and not posixpath.basename(r).startswith(".tmp-"))

    def hashes(self, prefixes: list[str]) -> dict[str, tuple[str, int]]:
        """(sha256, size) of every file under the given path prefixes."""
        return {rel: self.sha256(rel) for rel in self.files() if rel.startswith(tuple(prefixes))}

    def seal(self, known: dict[str, tuple[str, int]] | None = None) -> dict[str, Any]:
        """Write MANIFEST.json (sha256 and size of every file), last of all. Files in `known` were hashed
        earlier in this process (unchanged since) and are not read again."""
        files = {}
        for rel in self.files():
            sha, size = (known or {}).get(rel) or self.sha256(rel)
            files[rel] = {"sha256": sha, "size": size}
        manifest = {"run_id": self.run_id, "files": files}
        self.write_json(MANIFEST, manifest)
        return manifest

    def unseal(self) -> None:
        """Remove MANIFEST.json before files of a sealed run change, so no stale manifest vouches for them;
        `seal` writes a new one when they are whole again."""
        if self.exists(MANIFEST):
            self.fs.rm_file(self.path(MANIFEST))

    def verify(self, only: list[str] | None = None) -> list[str]:
        """Problems with the run's files against its MANIFEST.json; empty when it is whole. With `only`,
        just those files are checked (what a command is about to read)."""
        if not self.exists(MANIFEST):
            return [f"{self.uri}: no {MANIFEST} (the run is incomplete or failed)"]
        expected = self.read_json(MANIFEST)["files"]
        present = set(self.files())
        checked = sorted(expected) if only is None else sorted(only)
        problems = []
        for rel in checked:
            if rel not in expected:
                problems.append(f"{rel}: not in the manifest")
            elif rel not in present:
                problems.append(f"{rel}: missing")
            elif self.sha256(rel)[0] != expected[rel]["sha256"]:
                problems.append(f"{rel}: sha256 does not match the manifest")
        if only is None:
            problems += [f"{rel}: not in the manifest" for rel in sorted(present - set(expected))]
        return problems
