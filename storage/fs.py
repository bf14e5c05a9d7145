"""Paths that may be local folders or fsspec URLs, and atomic writes on either.

Every stage reads and writes through here, so `s3://bucket/ds`, `memory://ds` and `./data/ds`
behave alike. A file is written under a temporary name and renamed into place, so a reader never
sees half a file under its final name. Libraries that only take a local file name (torch.load of
a checkpoint, a tokenizer file, matplotlib, `mlflow.log_artifact`) get one from `local_path`
(a remote file downloaded once into a cache, keyed by its URL and version) and `local_output`
(written locally, uploaded into place when the block succeeds).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "exists",
    "filesystem",
    "is_local",
    "join",
    "local_output",
    "local_path",
    "sha256_file",
]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it.

    A remote store is opened without fsspec's listings cache: other processes (img2dataset's
    workers, the trainer's ranks) write the folders this process lists and waits on, and s3fs and
    gcsfs would otherwise keep a folder's first listing for good, hiding their files."""
    url = str(url)
    if is_local(url):
        return url_to_fs(url)
    return url_to_fs(url, use_listings_cache=False)


def join(base: str, *names: str) -> str:
    """Join path components, keeping a URL's protocol (`memory://a` + `b` -> `memory://a/b`)."""
    base = str(base).rstrip("/")
    return "/".join([base, *(n.strip("/") for n in names)])


def is_local(url: str) -> bool:
    """Whether `url` names this machine's disk (a plain path or `file://`), not a remote store."""
    protocol, _, _ = str(url).partition("://")
    return "://" not in str(url) or protocol in ("file", "local")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open `url` for writing; the file appears under its name only if the block succeeds."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open(tmp, mode) as f:
            yield f
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, path)  # atomic on POSIX; fs.mv may copy then delete
        else:
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def atomic_write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def sha256_file(url: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """The sha256 hex digest and the size in bytes of the file at `url`."""
    fs, path = filesystem(url)
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _cache_root() -> str:
    return os.environ.get("CLIP_PIPELINE_FS_CACHE") or os.path.join(
        tempfile.gettempdir(), "clip-pipeline-fs-cache"
    )


def local_path(url: str) -> str:
    """A local file holding what `url` holds: the path itself when it is local, else a copy in a
    cache (CLIP_PIPELINE_FS_CACHE, default under the temporary folder) keyed by the URL and the
    stored file's version (`ukey`: ETag, size, mtime), so a rewritten file is fetched again. The
    copy keeps the file's name. FileNotFoundError names the URL."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return path
    try:
        version = fs.ukey(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file") from None
    key = hashlib.sha256(f"{fs.unstrip_protocol(path)}\n{version}".encode()).hexdigest()[:24]
    folder = os.path.join(_cache_root(), key)
    dest = os.path.join(folder, path.rstrip("/").rsplit("/", 1)[-1])
    if not os.path.isfile(dest):
        os.makedirs(folder, exist_ok=True)
        tmp = f"{dest}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            fs.get_file(path, tmp)
            os.replace(tmp, dest)  # a concurrent download of the same version is the same bytes
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return dest


@contextlib.contextmanager
def local_output(url: str) -> Iterator[str]:
    """A local file name for a library to write `url` through: the path itself when it is local
    (the library's own write), else a temporary file uploaded into place (atomic_open) when the
    block succeeds; nothing appears at `url` if it fails."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        yield path
        return
    folder = tempfile.mkdtemp(prefix="clip-output-")
    try:
        local = os.path.join(folder, path.rstrip("/").rsplit("/", 1)[-1])
        yield local
        with open(local, "rb") as src, atomic_open(url, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
