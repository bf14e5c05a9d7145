"""Parameters of the `ingest` stage: what img2dataset is asked to do, and the URL list it reads."""

from __future__ import annotations

import io
import json
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "URL_LIST_FORMATS",
    "CrawlParams",
    "IngestParams",
    "check_columns",
    "url_list_columns",
    "url_list_format",
]

URL_LIST_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]


class CrawlParams(BaseModel):
    """What img2dataset is asked to do; recorded in the manifest and in MLflow."""

    model_config = ConfigDict(extra="forbid")

    url_col: str = Field("url", description="the URL list's column of image URLs")
    caption_col: str = Field("caption", description="the URL list's column of captions")
    keep_columns: list[str] = Field(
        default_factory=list, description="extra URL-list columns kept in the shards' Parquet"
    )
    image_size: int = Field(64, gt=0, description="side of the stored images, px")
    resize_mode: ResizeMode = Field(
        "center_crop", description="how images are brought to image_size (img2dataset's modes)"
    )
    min_image_size: int = Field(0, ge=0, description="refuse images whose shorter side is smaller")
    max_aspect_ratio: float = Field(
        float("inf"), gt=0, description="refuse images more elongated than this"
    )
    timeout: float = Field(10, gt=0, description="seconds per request")
    retries: int = Field(0, ge=0, description="retries of a failed download")
    processes_count: int = Field(2, gt=0, description="download processes")
    thread_count: int = Field(64, gt=0, description="download threads per process")
    samples_per_shard: int = Field(1000, gt=0, description="samples per output shard")
    encode_quality: int = Field(95, ge=1, le=100, description="JPEG quality of stored images")
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that make a site's image off limits",
    )


class IngestParams(CrawlParams):
    """The `ingest` command line: a URL list, the dataset to write, and the crawl settings."""

    url_list: str = Field(description="Parquet, CSV, TSV or JSONL; path or fsspec URL")
    output: str = Field(description="dataset folder or fsspec URL")
    force: bool = Field(
        False, description="replace whatever OUTPUT holds (another crawl, another list), recrawling"
    )

    def crawl(self) -> CrawlParams:
        return CrawlParams(**self.model_dump(include=set(CrawlParams.model_fields)))

    def check(self) -> None:
        """The URL list exists, is a known format and has the columns asked for."""
        check_columns(self.url_list, url_list_columns(self.url_list), self)


def url_list_format(path: str) -> str:
    """parquet, csv, tsv or jsonl, from the file name; ValueError listing the accepted ones."""
    suffix = PurePosixPath(path.split("?")[0]).suffix.lower()
    kind = URL_LIST_FORMATS.get(suffix)
    if kind is None:
        raise ValueError(
            f"URL list {path!r}: unsupported file type {suffix or '(none)'!r}; "
            f"accepted: {', '.join(URL_LIST_FORMATS)}"
        )
    return kind


def url_list_columns(path: str) -> list[str]:
    """The column names of a URL list, read from its header or schema only (not its rows)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from storage.fs import filesystem

    kind = url_list_format(path)
    fs, p = filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"URL list {path!r}: no such file")
    if fs.isdir(p):
        raise IsADirectoryError(f"URL list {path!r} is a folder; expected a {kind} file")
    try:
        with fs.open(p, "rb") as f:
            if kind == "parquet":
                return pq.read_schema(f).names
            head = f.read(1 << 20)
        if not head.strip():
            raise ValueError(f"URL list {path!r} is empty")
        if kind == "jsonl":
            first = next(line for line in head.splitlines() if line.strip())
            row = json.loads(first)
            if not isinstance(row, dict):
                raise ValueError(f"URL list {path!r}: expected one JSON object per line")
            return list(row)
        if len(head) == 1 << 20:  # only whole lines: a cut row would look malformed
            head = head[: head.rfind(b"\n") + 1] or head
        delimiter = "\t" if kind == "tsv" else ","
        reader = pacsv.open_csv(
            io.BytesIO(head), parse_options=pacsv.ParseOptions(delimiter=delimiter)
        )
        return reader.schema.names
    except (pa.ArrowInvalid, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"URL list {path!r}: unreadable as {kind} ({e})") from e


def check_columns(path: str, columns: list[str], params: CrawlParams) -> None:
    """ValueError naming the first column asked for (and its flag) that the URL list lacks."""
    wanted = [("--url-col", params.url_col), ("--caption-col", params.caption_col)]
    wanted += [("--keep-columns", c) for c in params.keep_columns]
    for flag, column in wanted:
        if column not in columns:
            raise ValueError(
                f"URL list {path!r} has no column {column!r} ({flag}); "
                f"its columns are: {', '.join(columns)}"
            )
