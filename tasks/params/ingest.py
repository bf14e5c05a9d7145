"""Parameters of the `ingest` stage: img2dataset's own arguments, and the URL list it reads.

`CrawlParams` holds every argument of `img2dataset.download` under img2dataset's own name and
default (tests/test_ingest.py checks them against the installed signature), less the five the
stage sets itself (`RESERVED`). One difference, with its reason: `caption_col` defaults to
"caption" (img2dataset: None, no captions), since a CLIP dataset without captions is useless.
An unknown name is refused before anything starts, naming it and img2dataset's closest names.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import io
import json
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "RESERVED",
    "RUN_ONLY_PARAMS",
    "URL_LIST_FORMATS",
    "CrawlParams",
    "IngestParams",
    "UrlListFiles",
    "check_columns",
    "img2dataset_arguments",
    "url_list_columns",
    "url_list_files",
    "url_list_format",
]

URL_LIST_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
Interpolation = Literal[
    "nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"
]

# img2dataset.download's arguments the stage sets itself, and why
RESERVED = {
    "url_list": "the stage's --url-list (staged as Parquet for img2dataset)",
    "output_folder": "the stage's --output",
    "input_format": "read from the URL list's file names",
    "output_format": "always webdataset: the project's dataset format",
    "incremental_mode": "always incremental: a killed crawl resumes",
}
# how a crawl is run, not what it yields: recorded in MLflow, left out of the output's identity
RUN_ONLY_PARAMS = {
    "processes_count",
    "thread_count",
    "distributor",
    "subjob_size",
    "max_shard_retry",
    "enable_wandb",
    "wandb_project",
}


@cache
def img2dataset_arguments() -> tuple[str, ...]:
    """The names of the installed `img2dataset.download`'s arguments, read from its source (not
    imported: importing img2dataset takes seconds and the command line must answer in less)."""
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.submodule_search_locations:
        return ()
    source = Path(next(iter(spec.submodule_search_locations)), "main.py").read_text("utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == "download":
            return tuple(a.arg for a in node.args.args + node.args.kwonlyargs)
    return ()


class CrawlParams(BaseModel):
    """img2dataset.download's arguments, its names and defaults; recorded in the manifest and in
    MLflow."""

    model_config = ConfigDict(extra="forbid")

    url_col: str = Field("url", description="the URL list's column of image URLs")
    caption_col: str = Field(
        "caption",
        description="the URL list's column of captions (img2dataset's default is none: a CLIP "
        "dataset needs captions)",
    )
    save_additional_columns: list[str] | None = Field(
        None, description="extra URL-list columns kept in the shards' Parquet"
    )
    bbox_col: str | None = Field(
        None, description="a column of boxes to blur in each image (also kept in the Parquet)"
    )
    verify_hash: list[str] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[column, md5|sha256|sha512]: refuse images whose hash differs",
    )
    image_size: int = Field(256, gt=0, description="side of the stored images, px")
    resize_mode: ResizeMode = Field("border", description="how images are brought to image_size")
    resize_only_if_bigger: bool = Field(False, description="never upscale")
    upscale_interpolation: Interpolation = Field("lanczos", description="OpenCV interpolation")
    downscale_interpolation: Interpolation = Field("area", description="OpenCV interpolation")
    encode_quality: int = Field(95, ge=0, le=100, description="quality of stored images")
    encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description="stored image format")
    skip_reencode: bool = Field(False, description="keep the original bytes when not resized")
    disable_all_reencoding: bool = Field(
        False, description="store the downloaded bytes as they are (no resize, no check)"
    )
    min_image_size: int = Field(0, ge=0, description="refuse images whose shorter side is smaller")
    max_image_area: float = Field(float("inf"), gt=0, description="refuse larger images, px")
    max_aspect_ratio: float = Field(
        float("inf"), gt=0, description="refuse images more elongated than this"
    )
    extract_exif: bool = Field(True, description="keep each image's EXIF in the Parquet")
    compute_hash: Literal["md5", "sha256", "sha512"] | None = Field(
        "sha256", description="hash of each image kept in the Parquet (curation dedups on sha256)"
    )
    timeout: float = Field(10, gt=0, description="seconds per request")
    retries: int = Field(0, ge=0, description="retries of a failed download")
    user_agent_token: str | None = Field(None, description="added to the crawler's User-Agent")
    disallowed_header_directives: list[str] | None = Field(
        None,
        description="X-Robots-Tag directives that make an image off limits (default: noai, "
        "noimageai, noindex, noimageindex; [] for none)",
    )
    number_sample_per_shard: int = Field(10000, gt=0, description="samples per output shard")
    oom_shard_count: int = Field(
        5,
        ge=1,
        le=5,
        description="digits of shard numbers in keys (the dataset names shards with 5)",
    )
    distributor: Literal["multiprocessing", "ray"] = Field(
        "multiprocessing",
        description="multiprocessing (local processes) or ray (an initialised Ray, or the "
        "cluster RAY_ADDRESS names)",
    )
    processes_count: int = Field(1, gt=0, description="download processes (multiprocessing)")
    thread_count: int = Field(256, gt=0, description="download threads per process or Ray task")
    subjob_size: int = Field(1000, gt=0, description="shards per batch (pyspark only)")
    max_shard_retry: int = Field(1, ge=0, description="reruns of a shard that failed whole")
    enable_wandb: bool = Field(False, description="log img2dataset's own figures to W&B")
    wandb_project: str = Field("img2dataset", description="the W&B project")

    @model_validator(mode="before")
    @classmethod
    def _known_arguments(cls, data: Any) -> Any:
        """An unknown name is refused naming it and img2dataset's closest names; a name the
        stage sets itself is refused saying so."""
        if not isinstance(data, dict):
            return data
        own = set(cls.model_fields) | set(_stage_fields())
        for name in data:
            if name in own:
                continue
            if name in RESERVED:
                raise ValueError(f"{name!r} is set by the ingest stage: {RESERVED[name]}")
            known = sorted(set(img2dataset_arguments()) - set(RESERVED) | set(cls.model_fields))
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown img2dataset argument {name!r}{hint} (img2dataset.download's "
                f"arguments: {', '.join(known)})"
            )
        return data

    def img2dataset_kwargs(self) -> dict[str, Any]:
        """These parameters as `img2dataset.download` keywords."""
        return self.model_dump(include=set(CrawlParams.model_fields))


def _stage_fields() -> tuple[str, ...]:
    return ("url_list", "output", "force")


class IngestParams(CrawlParams):
    """The `ingest` command line: a URL list, the dataset to write, and the crawl settings."""

    url_list: str = Field(
        description="Parquet, CSV, TSV or JSONL: a file, a folder of them or a glob; path or "
        "fsspec URL"
    )
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


class UrlListFiles(BaseModel):
    """The files a URL list is made of (one file, a folder's files or a glob's), in order."""

    source: str
    kind: str
    paths: list[str]  # inside `fs`, sorted
    names: list[str]  # as the user would name each file (for messages and the digest)

    @property
    def fs(self):
        from storage.fs import filesystem

        return filesystem(self.source)[0]


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def url_list_files(path: str) -> UrlListFiles:
    """The files of the URL list `path`: a Parquet/CSV/TSV/JSONL file, a folder of them (hidden
    and `_`-prefixed files such as `_SUCCESS` skipped) or a glob; local or fsspec. One kind of
    file per list. FileNotFoundError when nothing is there, ValueError for other file types."""
    from fsspec.implementations.local import LocalFileSystem

    from storage.fs import filesystem

    fs, root = filesystem(path)

    def name(p: str) -> str:
        return p if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(p)

    if _is_glob(root):
        found = sorted(p for p in fs.glob(root) if not fs.isdir(p))
        if not found:
            raise FileNotFoundError(f"URL list {path!r}: no file matches")
    elif fs.isdir(root):
        found = sorted(
            p
            for p in fs.find(root)
            if not PurePosixPath(p).name.startswith((".", "_"))
            and PurePosixPath(p).suffix.lower() in URL_LIST_FORMATS
        )
        if not found:
            raise FileNotFoundError(
                f"URL list {path!r} is a folder with no {', '.join(URL_LIST_FORMATS)} file"
            )
    elif fs.exists(root):
        found = [root]
    else:
        raise FileNotFoundError(f"URL list {path!r}: no such file")
    kinds = {p: url_list_format(name(p)) for p in found}  # a foreign type is named
    if len(set(kinds.values())) > 1:
        example = {k: name(p) for p, k in sorted(kinds.items(), reverse=True)}  # the first of each
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(example.items()))
        raise ValueError(f"URL list {path!r} mixes file types: {listed}; one type per list")
    return UrlListFiles(
        source=path, kind=kinds[found[0]], paths=found, names=[name(p) for p in found]
    )


def url_list_columns(path: str) -> list[str]:
    """The column names of a URL list (its first file's), read from the header or schema only."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    files = url_list_files(path)
    fs, p, name, kind = files.fs, files.paths[0], files.names[0], files.kind
    try:
        with fs.open(p, "rb") as f:
            if kind == "parquet":
                return pq.read_schema(f).names
            head = f.read(1 << 20)
        if not head.strip():
            raise ValueError(f"URL list {name!r} is empty")
        if kind == "jsonl":
            first = next(line for line in head.splitlines() if line.strip())
            row = json.loads(first)
            if not isinstance(row, dict):
                raise ValueError(f"URL list {name!r}: expected one JSON object per line")
            return list(row)
        if len(head) == 1 << 20:  # only whole lines: a cut row would look malformed
            head = head[: head.rfind(b"\n") + 1] or head
        delimiter = "\t" if kind == "tsv" else ","
        reader = pacsv.open_csv(
            io.BytesIO(head), parse_options=pacsv.ParseOptions(delimiter=delimiter)
        )
        return reader.schema.names
    except (pa.ArrowInvalid, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"URL list {name!r}: unreadable as {kind} ({e})") from e


def check_columns(path: str, columns: list[str], params: CrawlParams) -> None:
    """ValueError naming the first column asked for (and its flag) that the URL list lacks."""
    wanted = [("--url-col", params.url_col), ("--caption-col", params.caption_col)]
    wanted += [("--save-additional-columns", c) for c in params.save_additional_columns or []]
    if params.bbox_col is not None:
        wanted.append(("--bbox-col", params.bbox_col))
    if params.verify_hash is not None:
        wanted.append(("--verify-hash", params.verify_hash[0]))
    for flag, column in wanted:
        if column not in columns:
            raise ValueError(
                f"URL list {path!r} has no column {column!r} ({flag}); "
                f"its columns are: {', '.join(columns)}"
            )
