"""A crawled shard rewritten in key order with fixed tar headers: the same crawl, the same bytes.

img2dataset writes each shard's samples as its download threads finish them, and stamps every
tar member with the time it was written, so two crawls of one URL list give the same samples in
a different order and different bytes: a different dataset digest, curation that meets the
samples in another order, and a training run that sees other batches (issue 15, item 4). The
ingest stage commits every shard through `write_in_key_order`, the way storage.DatasetWriter
writes its own: members sorted by (key, extension), mtime 0, mode 0o644, no owner names.

The tar is copied member by member (a seekable read of the crawled file), never held whole. On a
local disk the rewritten file keeps the crawled file's mtime: when a shard was crawled stays
visible (a resumed crawl's test tells a shard crawled again from one carried over by it).
"""

from __future__ import annotations

import os
import tarfile

import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from storage.fs import atomic_open, filesystem

__all__ = ["write_in_key_order"]


def _key_and_ext(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")  # webdataset's rule: the key ends at the first dot
    return key, ext


def _tar_in_key_order(src: str, dst: str) -> None:
    fs, path = filesystem(src)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile()), key=lambda m: _key_and_ext(m.name)
        )
        with atomic_open(dst, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as writer:
                for member in members:
                    info = tarfile.TarInfo(member.name)
                    info.size, info.mtime, info.mode = member.size, 0, 0o644
                    writer.addfile(info, tar.extractfile(member))


def _parquet_in_key_order(src: str, dst: str) -> None:
    fs, path = filesystem(src)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    table = table.take(pc.sort_indices(table, sort_keys=[("key", "ascending")]))
    with atomic_open(dst, "wb") as out:
        pq.write_table(table, out)


def write_in_key_order(src: str, dst: str) -> None:
    """Write shard file `src` (a .tar or a .parquet with a `key` column) to `dst` in key order."""
    if src.endswith(".tar"):
        _tar_in_key_order(src, dst)
    elif src.endswith(".parquet"):
        _parquet_in_key_order(src, dst)
    else:
        raise ValueError(f"{src}: expected a shard's .tar or .parquet")
    fs, path = filesystem(src)
    if isinstance(fs, LocalFileSystem):
        crawled = os.stat(path)
        os.utime(filesystem(dst)[1], ns=(crawled.st_atime_ns, crawled.st_mtime_ns))
