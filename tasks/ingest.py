"""Ingest tasks: URL list -> img2dataset -> a committed dataset, with every row accounted for.

The crawl runs in `DATASET/.ingest/` (img2dataset's own output folder, so its incremental mode
skips the shards it finished), and each finished shard is then moved into the dataset under its
final name. The manifest is written last: an interrupted crawl never looks like a dataset.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from storage import DatasetError, ShardEntry, describe_shard, open_dataset, write_manifest
from storage.fs import atomic_open, filesystem, join, sha256_file

STAGING = ".ingest"  # our own bookkeeping (staged URL list, parameters)
CRAWL_DIR = ".ingest/shards"  # img2dataset's output folder: it treats every *.json there as a shard
URL_LIST_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


class CrawlParams(BaseModel):
    """What img2dataset is asked to do; recorded in the manifest and in MLflow."""

    model_config = ConfigDict(extra="forbid")

    url_col: str = "url"
    caption_col: str = "caption"
    keep_columns: list[str] = Field(default_factory=list, description="extra columns to keep")
    image_size: int = Field(64, gt=0)
    resize_mode: str = Field(
        "center_crop", pattern="^(no|border|keep_ratio|keep_ratio_largest|center_crop)$"
    )
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    timeout: float = Field(10, gt=0, description="seconds per request")
    retries: int = Field(0, ge=0)
    processes_count: int = Field(2, gt=0)
    thread_count: int = Field(64, gt=0)
    samples_per_shard: int = Field(1000, gt=0)
    encode_quality: int = Field(95, ge=1, le=100)
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )


def transient_failure(task, task_run, state) -> bool:
    """Retry network and storage hiccups (a reset connection, an object store timing out), never
    bad input: a missing file, a refused permission or a wrong column fails at once."""
    try:
        state.result()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
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


def _read_table(path: str) -> pa.Table:
    suffix = PurePosixPath(path.split("?")[0]).suffix.lower()
    kind = URL_LIST_FORMATS.get(suffix)
    if kind is None:
        raise ValueError(
            f"URL list {path!r}: unsupported file type {suffix or '(none)'!r}; "
            f"accepted: {', '.join(URL_LIST_FORMATS)}"
        )
    fs, p = filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"URL list {path!r}: no such file")
    try:
        with fs.open(p, "rb") as f:
            data = f.read()
        if not data.strip():
            raise ValueError(f"URL list {path!r} is empty")
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
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"URL list {path!r}: unreadable as {kind} ({e})") from e


@task(name="read-url-list", **NETWORK_RETRIES)
def read_url_list(path: str, output: str, params: CrawlParams) -> UrlList:
    """Validate the URL list and stage it as Parquet (url, caption, kept columns) for img2dataset."""
    _check_writable(output)
    table = _read_table(path)
    wanted = [("--url-col", params.url_col), ("--caption-col", params.caption_col)]
    wanted += [("--keep-columns", c) for c in params.keep_columns]
    for flag, column in wanted:
        if column not in table.column_names:
            raise ValueError(
                f"URL list {path!r} has no column {column!r} ({flag}); "
                f"its columns are: {', '.join(table.column_names)}"
            )
    if table.num_rows == 0:
        raise ValueError(f"URL list {path!r} has no rows")
    columns = {
        "url": table.column(params.url_col).cast(pa.string()).fill_null(""),
        "caption": table.column(params.caption_col).cast(pa.string()).fill_null(""),
    }
    for c in params.keep_columns:
        columns[c] = table.column(c)
    staged = join(output, STAGING, "url_list.parquet")
    with atomic_open(staged, "wb") as f:
        pq.write_table(pa.table(columns), f)
    digest, _ = sha256_file(path)
    return UrlList(source=path, staged=staged, rows=table.num_rows, digest=f"sha256:{digest}")


def _img2dataset_kwargs(url_list: UrlList, staging: str, params: CrawlParams) -> dict[str, Any]:
    return {
        "url_list": url_list.staged,
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": params.keep_columns or None,
        "output_folder": staging,
        "output_format": "webdataset",
        "image_size": params.image_size,
        "resize_mode": params.resize_mode,
        "min_image_size": params.min_image_size,
        "max_aspect_ratio": params.max_aspect_ratio,
        "timeout": params.timeout,
        "retries": params.retries,
        "processes_count": params.processes_count,
        "thread_count": params.thread_count,
        "number_sample_per_shard": params.samples_per_shard,
        "encode_quality": params.encode_quality,
        "disallowed_header_directives": params.disallowed_header_directives,
        "incremental_mode": "incremental",
        "enable_wandb": False,
    }


def _finished_shards(staging: str) -> list[str]:
    fs, root = filesystem(staging)
    names = [p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/*_stats.json")]
    return sorted(n.split("_")[0] for n in names)


def _download_here(kwargs: dict[str, Any]) -> None:
    """img2dataset in this process: possible only in the main thread, where its SIGINT handler
    can be installed. The previous handler is put back afterwards."""
    import signal

    from img2dataset import download

    previous = signal.getsignal(signal.SIGINT)
    try:
        download(**kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def _download_in_subprocess(kwargs: dict[str, Any], logger) -> None:
    """img2dataset in a child process's main thread, its output streamed into our logs."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(kwargs, f)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.crawl", f.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line and "it/s]" not in line:  # img2dataset's own per-shard bars only add noise
            logger.info("img2dataset: %s", line)
            tail = (tail + [line])[-20:]
    rc = proc.wait()
    os.unlink(f.name)
    if rc != 0:
        raise RuntimeError(f"img2dataset exited with {rc}:\n" + "\n".join(tail))


@task(name="crawl", log_prints=True, **NETWORK_RETRIES)
def crawl(url_list: UrlList, output: str, params: CrawlParams) -> float:
    """Run img2dataset with a shard progress bar; returns the crawl's wall time in seconds.

    img2dataset installs a SIGINT handler, which Python allows only in a main thread (docs/design.md,
    trap 2): in the main thread (the CLI, a deployment's flow run) it runs here, with its prints
    in the task's logs; in any other thread it runs in a subprocess. Shards finished by an
    earlier, interrupted run are skipped by img2dataset's incremental mode.
    """
    logger = get_run_logger()
    staging = join(output, STAGING)
    params_path = join(staging, "params.json")
    fs, _ = filesystem(staging)
    wanted = params.model_dump_json()
    if fs.exists(filesystem(params_path)[1]):
        with fs.open(filesystem(params_path)[1], "r") as f:
            before = f.read()
        if before != wanted:
            raise ValueError(
                f"{output!r} holds a partial crawl made with other parameters ({params_path}); "
                "use a new --output or delete that folder"
            )
    with atomic_open(params_path, "wb") as f:
        f.write(wanted.encode())
    total = math.ceil(url_list.rows / params.samples_per_shard)
    shards_dir = join(output, CRAWL_DIR)
    kwargs = _img2dataset_kwargs(url_list, shards_dir, params)
    with atomic_open(join(staging, "img2dataset.json"), "wb") as f:  # a record of the call
        f.write(json.dumps(kwargs, indent=2).encode())

    done = threading.Event()

    def show_progress() -> None:
        with tqdm(total=total, desc="crawl shards", unit="shard", file=sys.stderr) as bar:
            while not done.wait(1.0):
                bar.update(len(_finished_shards(shards_dir)) - bar.n)
            bar.update(len(_finished_shards(shards_dir)) - bar.n)

    progress = threading.Thread(target=show_progress, daemon=True)
    progress.start()
    start = time.perf_counter()
    try:
        if threading.current_thread() is threading.main_thread():
            _download_here(kwargs)
        else:
            _download_in_subprocess(kwargs, logger)
    finally:
        done.set()
        progress.join()
    return time.perf_counter() - start


@task(name="commit-shards")
def commit_shards(url_list: UrlList, output: str, params: CrawlParams) -> list[ShardEntry]:
    """Move every finished shard from the crawl folder into the dataset under its final name."""
    staging = join(output, CRAWL_DIR)
    expected = [f"{i:05d}" for i in range(math.ceil(url_list.rows / params.samples_per_shard))]
    finished = set(_finished_shards(staging))
    missing = [n for n in expected if n not in finished]
    if missing:
        raise RuntimeError(
            f"crawl of {url_list.source!r} is incomplete: shards {', '.join(missing)} unfinished; "
            "rerun the same command to resume"
        )
    fs, _ = filesystem(output)
    entries = []
    for name in expected:
        for ext in ("parquet", "tar"):  # tar last: a shard counts once its tar is in place
            src, dst = (
                filesystem(join(staging, f"{name}.{ext}"))[1],
                filesystem(join(output, f"{name}.{ext}"))[1],
            )
            if fs.exists(src):
                fs.mv(src, dst)
            elif not fs.exists(dst):
                raise DatasetError(f"{join(staging, name)}.{ext}: finished shard has no {ext}")
        entries.append(describe_shard(output, name))
    return entries


# img2dataset reports failures as free text; these patterns name the reasons people count.
FAILURE_REASONS = [
    (re.compile(r"HTTP Error (\d+)"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed out|timeout", re.I), lambda m: "timeout"),
    (re.compile(r"X-Robots-Tag", re.I), lambda m: "robots_disallowed"),
    (re.compile(r"image too small", re.I), lambda m: "too_small"),
    (re.compile(r"aspect ratio too large", re.I), lambda m: "aspect_ratio"),
    (re.compile(r"image too large", re.I), lambda m: "too_large"),
    (re.compile(r"decod|truncated|cannot identify|broken data", re.I), lambda m: "undecodable"),
    (re.compile(r"Connection refused|Name or service|resolve", re.I), lambda m: "unreachable"),
    (re.compile(r"unknown url type|no host given|Invalid URL", re.I), lambda m: "invalid_url"),
]


def failure_reason(error_message: str | None) -> str:
    """A short, countable reason for one of img2dataset's error messages."""
    text = error_message or ""
    for pattern, name in FAILURE_REASONS:
        if m := pattern.search(text):
            return name(m)
    return "other"


@task(name="count-outcomes")
def count_outcomes(output: str, shards: list[ShardEntry]) -> dict[str, Any]:
    """Per-reason counts over every input row (successes plus each failure reason = rows)."""
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for entry in shards:
        fs, path = filesystem(join(output, f"{entry.name}.parquet"))
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["status", "error_message"])
        for status, message in zip(
            table.column("status").to_pylist(),
            table.column("error_message").to_pylist(),
            strict=True,
        ):
            reason = "success" if status == "success" else failure_reason(message)
            reasons[reason] += 1
            if message and reason not in examples:
                examples[reason] = message[:200]
    return {"reasons": dict(sorted(reasons.items())), "examples": examples}


@task(name="write-manifest")
def seal_dataset(
    output: str,
    shards: list[ShardEntry],
    url_list: UrlList,
    params: CrawlParams,
    stats: dict[str, Any],
):
    """Write the manifest last; from here on the crawl is a dataset."""
    write_manifest(
        output,
        shards,
        stage="ingest",
        parameters={"url_list": url_list.source, **params.model_dump(mode="json")},
        input_digest=url_list.digest,
        stats=stats,
    )
    return open_dataset(output)


def finished_dataset(output: str, url_list_path: str, params: CrawlParams):
    """The dataset at `output` if it is this very crawl already finished, else None."""
    try:
        ds = open_dataset(output)
    except DatasetError:
        return None
    wanted = {"url_list": url_list_path, **params.model_dump(mode="json")}
    digest = f"sha256:{sha256_file(url_list_path)[0]}"
    producer = ds.manifest.producer
    if (
        producer.stage == "ingest"
        and producer.parameters == wanted
        and producer.input_digest == digest
    ):
        return ds
    return None


class IngestResult(BaseModel):
    dataset: str
    digest: str
    rows: int
    samples: int
    reasons: dict[str, int]
    images_per_s: float | None = None
    mlflow_run_id: str | None = None
    skipped: bool = False


def reason_table(reasons: dict[str, int], examples: dict[str, str] | None = None) -> list[dict]:
    """Rows for a Prefect table artifact and for the printed summary, success first."""
    total = sum(reasons.values()) or 1
    ordered = sorted(reasons.items(), key=lambda kv: (kv[0] != "success", -kv[1], kv[0]))
    return [
        {
            "reason": reason,
            "count": count,
            "fraction": round(count / total, 4),
            "example": (examples or {}).get(reason, ""),
        }
        for reason, count in ordered
    ]


@task(name="publish-ingest-report")
def publish_report(dataset, stats: dict[str, Any]) -> None:
    """The per-reason table as a Prefect artifact and the crawl's figures as MLflow metrics."""
    import mlflow
    from prefect.artifacts import create_table_artifact

    from storage.tracking import log_dataset

    rows = reason_table(stats["reasons"], stats.get("examples"))
    create_table_artifact(
        key="ingest-outcomes",
        table=rows,
        description=f"Crawl of {stats['rows']} URLs into {dataset.url}: outcome per input row",
    )
    metrics = {
        "rows": stats["rows"],
        "samples": stats["samples"],
        "success_rate": stats["samples"] / stats["rows"],
        "images_per_s": stats["images_per_s"],
        "crawl_seconds": stats["crawl_seconds"],
    }
    metrics.update({f"count_{r}": n for r, n in stats["reasons"].items()})
    mlflow.log_metrics(metrics)
    mlflow.log_dict(stats, "ingest_stats.json")
    log_dataset(dataset, context="output")
