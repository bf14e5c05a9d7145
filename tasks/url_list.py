"""The URL list a crawl starts from: read (local or fsspec), validated, staged for img2dataset.

Reading keeps two kinds of failure apart: I/O errors (a reset connection, an object store timing
out) stay `OSError`s and the tasks retry them with backoff; anything wrong with the content (an
unsupported type, a missing column, bytes that do not parse) is a `ValueError` naming the file,
raised at once and never retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prefect import task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from storage.fs import atomic_open, filesystem, join
from tasks.params.ingest import (
    URL_LIST_FORMATS,
    UrlListFiles,
    check_columns,
    url_list_files,
)

if TYPE_CHECKING:
    from tasks.ingest import CrawlParams

__all__ = [
    "NETWORK_RETRIES",
    "STAGING",
    "URL_LIST_FORMATS",
    "VERIFY_HASH_COL",
    "UrlList",
    "list_digest",
    "read_url_list",
    "stage_url_list",
    "staged_extra_columns",
    "staged_shards",
    "transient_failure",
    "url_list_digest",
]

STAGING = ".ingest"  # the crawl's bookkeeping in its output (staged URL list, the img2dataset call)


def transient_failure(task, task_run, state) -> bool:
    """Retry network and storage hiccups (a reset connection, an object store timing out), never
    bad input: a missing file, a refused permission or a wrong column fails at once."""
    try:
        state.result()
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
        return False
    except (OSError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001 - anything else is the input's fault or a bug
        return False
    return False


NETWORK_RETRIES = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=10),
    "retry_condition_fn": transient_failure,
}


VERIFY_HASH_COL = "verify_hash"  # the staged list's column of hashes to verify (verify_hash)


def staged_extra_columns(params: CrawlParams) -> list[str]:
    """The URL list's columns staged besides url and caption, under their own names."""
    extra = list(params.save_additional_columns or [])
    if params.bbox_col is not None and params.bbox_col not in extra:
        extra.append(params.bbox_col)
    return extra


class UrlList(BaseModel):
    source: str
    staged: str
    rows: int
    digest: str


def _check_writable(output: str) -> None:
    fs, root = filesystem(output)
    try:
        fs.makedirs(root, exist_ok=True)
        probe = join(output, ".write-probe")
        with atomic_open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(filesystem(probe)[1])
    except OSError as e:
        raise PermissionError(f"output {output!r} is not writable ({e})") from e


READ_BATCH_ROWS = 1 << 16  # rows decoded at a time from the URL list
PART_ROWS = 1 << 18  # about this many rows per staged part (a whole number of shards)


def _sha256_stream(fs, path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_digest(files: UrlListFiles) -> str:
    """sha256 of one file's bytes; of a folder or glob, of each file's name (below the list's
    root) and sha256, in order. Read in chunks: never the whole list in memory. I/O errors stay
    OSErrors (retried); a file that vanished is named."""
    fs = files.fs
    try:
        if len(files.paths) == 1 and files.paths[0] == filesystem(files.source)[1]:
            return "sha256:" + _sha256_stream(fs, files.paths[0])
        h = hashlib.sha256()
        root = _common_root(files.paths)
        for path in files.paths:
            h.update(f"{path[len(root) :]}\0{_sha256_stream(fs, path)}\n".encode())
        return "sha256:" + h.hexdigest()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"URL list {files.source!r}: a file vanished ({e})") from e


def _common_root(paths: list[str]) -> str:
    if len(paths) == 1:
        return paths[0].rsplit("/", 1)[0] + "/"
    prefix = posixpath.commonpath(paths)
    return prefix.rstrip("/") + "/"


def _file_format(kind: str, params: CrawlParams) -> ds.FileFormat:
    """How pyarrow.dataset reads one kind of list; URLs and captions always as text."""
    if kind == "parquet":
        return ds.ParquetFileFormat()
    if kind == "jsonl":
        return ds.JsonFileFormat()
    text = {params.url_col: pa.string(), params.caption_col: pa.string()}
    return ds.CsvFileFormat(
        parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=False, column_types=text),
    )


def _staged_batches(files: UrlListFiles, params: CrawlParams) -> Iterator[pa.RecordBatch]:
    """The URL list's rows as staged batches (url, caption, kept columns, the hash to verify),
    one file after the other, READ_BATCH_ROWS at a time. Content errors are ValueErrors naming
    the file; I/O errors stay OSErrors."""
    fmt = _file_format(files.kind, params)
    extra = staged_extra_columns(params)
    wanted = [params.url_col, params.caption_col, *extra]
    if params.verify_hash is not None:
        wanted.append(params.verify_hash[0])
    schema = None
    for path, name in zip(files.paths, files.names, strict=True):
        try:
            dataset = ds.dataset(path, format=fmt, filesystem=files.fs)
            check_columns(name, dataset.schema.names, params)  # every file, the CLI's words
            scanner = dataset.scanner(
                columns=list(dict.fromkeys(wanted)),
                batch_size=READ_BATCH_ROWS,
                batch_readahead=2,
                fragment_readahead=1,
            )
            for batch in scanner.to_batches():
                if batch.num_rows == 0:
                    continue
                columns = {
                    "url": batch.column(params.url_col).cast(pa.string()).fill_null(""),
                    "caption": batch.column(params.caption_col).cast(pa.string()).fill_null(""),
                }
                for c in extra:
                    columns[c] = batch.column(c)
                if params.verify_hash is not None:  # img2dataset reads it by this name
                    columns[VERIFY_HASH_COL] = batch.column(params.verify_hash[0]).cast(pa.string())
                out = pa.RecordBatch.from_pydict(columns)
                if schema is None:
                    schema = out.schema
                elif out.schema != schema:  # the first file's types decide
                    out = out.cast(schema)
                yield out
        except OSError:
            raise  # I/O, retried (NETWORK_RETRIES); pyarrow's own I/O errors are OSErrors too
        except (pa.ArrowException, ValueError) as e:
            if isinstance(e, ValueError) and str(e).startswith("URL list"):
                raise
            raise ValueError(f"URL list {name!r}: unreadable as {files.kind} ({e})") from e


class _PartWriter:
    """Staged parts of `rows_per_part` rows (a whole number of shards, so img2dataset's shards,
    numbered on across files, are the same as for one file), each written atomically."""

    def __init__(self, folder: str, rows_per_part: int):
        self.folder, self.rows_per_part = folder, rows_per_part
        self.parts = 0
        self.rows = 0
        self._stack = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None
        self._in_part = 0

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self._writer is None:
                f = self._stack.enter_context(
                    atomic_open(join(self.folder, f"part-{self.parts:05d}.parquet"), "wb")
                )
                self._writer = self._stack.enter_context(pq.ParquetWriter(f, batch.schema))
            take = min(batch.num_rows, self.rows_per_part - self._in_part)
            self._writer.write_batch(batch.slice(0, take))
            self._in_part += take
            self.rows += take
            batch = batch.slice(take)
            if self._in_part == self.rows_per_part:
                self._close_part()

    def _close_part(self) -> None:
        self._stack.close()  # closes the writer, then renames the part into place
        self._writer, self._in_part = None, 0
        self.parts += 1

    def close(self) -> None:
        if self._writer is not None:
            self._close_part()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def stage_url_list(files: UrlListFiles, staged: str, params: CrawlParams) -> int:
    """Stage the URL list into the folder `staged` as Parquet parts, streaming: memory is bounded
    by READ_BATCH_ROWS and the Parquet writer's buffers, not by the list. Returns the rows."""
    fs, folder = filesystem(staged)
    if fs.exists(folder):  # an earlier, interrupted staging of this very list
        fs.rm(folder, recursive=True)
    fs.makedirs(folder, exist_ok=True)
    sps = params.number_sample_per_shard
    writer = _PartWriter(staged, sps * max(1, PART_ROWS // sps))
    try:
        for batch in _staged_batches(files, params):
            writer.write(batch)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.rows


def staged_shards(staged: str, samples_per_shard: int) -> Iterator[pa.Table]:
    """The staged list's url and caption, `samples_per_shard` rows at a time, in order (shard 0,
    1, ...): one part in memory at most. `staged`: the staged folder, or a single Parquet file."""
    fs, root = filesystem(staged)
    parts = sorted(fs.glob(f"{root}/*.parquet")) if fs.isdir(root) else [root]
    pending: list[pa.Table] = []
    count = 0
    for part in parts:
        with fs.open(part, "rb") as f:
            table = pq.read_table(f, columns=["url", "caption"])
        while table.num_rows:
            take = min(table.num_rows, samples_per_shard - count)
            pending.append(table.slice(0, take))
            count += take
            table = table.slice(take)
            if count == samples_per_shard:
                yield pa.concat_tables(pending)
                pending, count = [], 0
    if count:
        yield pa.concat_tables(pending)


@task(name="url-list-digest", **NETWORK_RETRIES)
def url_list_digest(path: str) -> str:
    """The URL list's sha256: with the crawl parameters, the identity its output is bound to."""
    return list_digest(url_list_files(path))


@task(name="read-url-list", **NETWORK_RETRIES)
def read_url_list(
    path: str, output: str, params: CrawlParams, digest: str | None = None
) -> UrlList:
    """Validate the URL list (a file, a folder or a glob) and stage it, streaming, as Parquet
    parts (url, caption, kept columns) for img2dataset.

    `digest`: the sha256 the run was bound to; a list that changed since is refused."""
    _check_writable(output)
    files = url_list_files(path)
    staged = join(output, STAGING, "url_list")
    rows = stage_url_list(files, staged, params)
    if rows == 0:
        raise ValueError(f"URL list {path!r} has no rows")
    read_digest = list_digest(files)  # after staging: what was staged is what is bound
    if digest is not None and read_digest != digest:
        raise ValueError(
            f"URL list {path!r} changed while the crawl started ({digest[:19]} then "
            f"{read_digest[:19]}); rerun once it is no longer being written"
        )
    return UrlList(source=path, staged=staged, rows=rows, digest=read_digest)
