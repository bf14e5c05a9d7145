"""The URL list a crawl starts from: read (local or fsspec), validated, staged for img2dataset.

Reading keeps two kinds of failure apart: I/O errors (a reset connection, an object store timing
out) stay `OSError`s and the tasks retry them with backoff; anything wrong with the content (an
unsupported type, a missing column, bytes that do not parse) is a `ValueError` naming the file,
raised at once and never retried.
"""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from prefect import task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from storage.fs import atomic_open, filesystem, join
from tasks.params.ingest import URL_LIST_FORMATS, check_columns, url_list_format

if TYPE_CHECKING:
    from tasks.ingest import CrawlParams

__all__ = [
    "NETWORK_RETRIES",
    "STAGING",
    "URL_LIST_FORMATS",
    "VERIFY_HASH_COL",
    "UrlList",
    "read_url_list",
    "staged_extra_columns",
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


def _read_bytes(path: str) -> bytes:
    """The URL list's bytes. I/O errors stay OSErrors, so a reset connection or an object store
    timing out is retried (NETWORK_RETRIES); a missing file is named and fails at once."""
    fs, p = filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"URL list {path!r}: no such file")
    with fs.open(p, "rb") as f:
        return f.read()


def _parse_table(data: bytes, kind: str, path: str) -> pa.Table:
    """Parse bytes already in memory: any failure here is the file's content, never I/O."""
    if not data.strip():
        raise ValueError(f"URL list {path!r} is empty")
    try:
        if kind == "parquet":
            return pq.read_table(io.BytesIO(data))
        if kind == "jsonl":
            return pajson.read_json(io.BytesIO(data))
        delimiter = "\t" if kind == "tsv" else ","
        return pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
        )
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"URL list {path!r}: unreadable as {kind} ({e})") from e


@task(name="url-list-digest", **NETWORK_RETRIES)
def url_list_digest(path: str) -> str:
    """The URL list's sha256: with the crawl parameters, the identity its output is bound to."""
    url_list_format(path)  # an unsupported file type fails before anything is read
    return "sha256:" + hashlib.sha256(_read_bytes(path)).hexdigest()


@task(name="read-url-list", **NETWORK_RETRIES)
def read_url_list(
    path: str, output: str, params: CrawlParams, digest: str | None = None
) -> UrlList:
    """Validate the URL list and stage it as Parquet (url, caption, kept columns) for img2dataset.

    `digest`: the sha256 the run was bound to; a list that changed since is refused."""
    _check_writable(output)
    kind = url_list_format(path)
    data = _read_bytes(path)
    read_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if digest is not None and read_digest != digest:
        raise ValueError(
            f"URL list {path!r} changed while the crawl started ({digest[:19]} then "
            f"{read_digest[:19]}); rerun once it is no longer being written"
        )
    table = _parse_table(data, kind, path)
    check_columns(path, table.column_names, params)  # the command line's check, the same words
    if table.num_rows == 0:
        raise ValueError(f"URL list {path!r} has no rows")
    columns = {
        "url": table.column(params.url_col).cast(pa.string()).fill_null(""),
        "caption": table.column(params.caption_col).cast(pa.string()).fill_null(""),
    }
    for c in staged_extra_columns(params):
        columns[c] = table.column(c)
    if params.verify_hash is not None:  # img2dataset reads it from the staged list by this name
        columns[VERIFY_HASH_COL] = table.column(params.verify_hash[0]).cast(pa.string())
    staged = join(output, STAGING, "url_list.parquet")
    with atomic_open(staged, "wb") as f:
        pq.write_table(pa.table(columns), f)
    return UrlList(source=path, staged=staged, rows=table.num_rows, digest=read_digest)
