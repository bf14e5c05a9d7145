"""Ingest tasks: URL list -> img2dataset -> a committed dataset, with every row accounted for.

The ingest flow writes through `storage.output.stage_output` (docs/stage-outputs.md): the crawl
runs in the staging folder's `.ingest/` (img2dataset's own output folder, so its incremental mode
skips the shards it finished), bound to the URL list's sha256 and the crawl parameters, so a
changed list or setting starts clean and never reuses another crawl's shards (docs/design.md,
trap 12). Each finished shard is checked against the staged URL list, moved into the dataset
under its final name, the manifest written last, and the whole swapped into place.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from tqdm import tqdm

from storage import Manifest, ShardEntry, describe_shard, write_manifest
from storage.dataset import DatasetError, shard_name
from storage.fs import atomic_open, filesystem, join
from tasks.ingest_report import (
    FAILURE_REASONS,
    IngestResult,
    count_outcomes,
    failure_reason,
    publish_report,
    reason_table,
)
from tasks.params.ingest import RUN_ONLY_PARAMS, CrawlParams
from tasks.url_list import (
    NETWORK_RETRIES,
    STAGING,
    VERIFY_HASH_COL,
    UrlList,
    read_url_list,
    staged_shards,
    transient_failure,
    url_list_digest,
)

__all__ = [
    "FAILURE_REASONS",
    "CrawlParams",
    "IngestResult",
    "UrlList",
    "commit_shards",
    "count_outcomes",
    "crawl",
    "crawl_identity",
    "drop_crawl_state",
    "failure_reason",
    "publish_report",
    "read_url_list",
    "reason_table",
    "seal_dataset",
    "transient_failure",
    "url_list_digest",
]

CRAWL_DIR = f"{STAGING}/shards"  # img2dataset's output folder: every *.json there is a shard


def crawl_identity(url_list_digest: str, params: CrawlParams) -> dict[str, Any]:
    """What decides a crawl's output: the URL list's bytes and the crawl parameters (less how
    many processes and threads run it). Binds the output and the crawl's working state."""
    return {
        "url_list_sha256": url_list_digest,
        "params": params.model_dump(mode="json", exclude=RUN_ONLY_PARAMS),
    }


def _img2dataset_kwargs(url_list: UrlList, staging: str, params: CrawlParams) -> dict[str, Any]:
    """Every parameter under img2dataset's own name; the staged list's columns are `url`,
    `caption` and the kept ones (and the hash to verify under its type's name, as img2dataset
    renames it)."""
    kwargs = params.img2dataset_kwargs()
    kwargs.update(
        url_list=url_list.staged,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_folder=staging,
        output_format="webdataset",
        incremental_mode="incremental",
    )
    if params.verify_hash is not None:
        kwargs["verify_hash"] = [VERIFY_HASH_COL, params.verify_hash[1]]
    return kwargs


def _finished_shards(staging: str) -> list[str]:
    fs, root = filesystem(staging)
    names = [p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/*_stats.json")]
    return sorted(n.split("_")[0] for n in names)


def _download_here(kwargs: dict[str, Any]) -> None:
    """img2dataset in this process (with the project's decoder, tasks/crawl.py): possible only in
    the main thread, where its SIGINT handler can be installed."""
    from tasks.crawl import download

    download(kwargs)


def _subprocess_env(kwargs: dict[str, Any]) -> dict[str, str]:
    """The crawl subprocess's environment: with the `ray` distributor, the address of the Ray this
    process is connected to (tasks.crawl.connect_ray reads it), so both use the same cluster."""
    env = dict(os.environ)
    ray = sys.modules.get("ray")
    if kwargs.get("distributor") == "ray" and ray is not None and ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return env


def _download_in_subprocess(kwargs: dict[str, Any], logger) -> None:
    """img2dataset in a child process's main thread, its output streamed into our logs."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(kwargs, f)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.crawl", f.name],
        env=_subprocess_env(kwargs),
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
    earlier, interrupted run are skipped by img2dataset's incremental mode; `output` is the
    stage's staging folder, bound to this URL list and these parameters (docs/design.md, trap 12),
    so those shards are always of this very crawl.
    """
    logger = get_run_logger()
    staging = join(output, STAGING)
    total = math.ceil(url_list.rows / params.number_sample_per_shard)
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


def _check_shard(
    parquet_url: str, name: str, index: int, expected: pa.Table, samples_per_shard: int
) -> None:
    """A finished shard must be a crawl of its slice of the staged URL list: one row per input
    row, each row's URL and caption those of the list's row its key names (img2dataset's key is
    `shard * 10^digits + row within the shard`). Anything else came from another list."""
    fs, path = filesystem(parquet_url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["key", "url", "caption"])
    if table.num_rows != expected.num_rows:
        raise DatasetError(
            f"{parquet_url}: {table.num_rows} rows, but shard {name} of the staged URL list has "
            f"{expected.num_rows}: not a crawl of this list (rerun with --force to start clean)"
        )
    digits = 10 ** math.ceil(math.log10(samples_per_shard))
    urls = expected.column("url").to_pylist()
    captions = expected.column("caption").to_pylist()
    for key, url, caption in zip(
        table.column("key").to_pylist(),
        table.column("url").to_pylist(),
        table.column("caption").to_pylist(),
        strict=True,
    ):
        shard, row = divmod(int(key), digits)
        if (
            shard != index
            or row >= len(urls)
            or url != urls[row]
            or (caption or "") != (captions[row] or "")
        ):
            want = urls[row] if shard == index and row < len(urls) else "(no such row)"
            raise DatasetError(
                f"{parquet_url}: sample {key} is {url!r}, the staged URL list's row says {want!r}: "
                "this shard is not a crawl of this list"
            )


@task(name="commit-shards")
def commit_shards(url_list: UrlList, output: str, params: CrawlParams) -> list[ShardEntry]:
    """Check every finished shard against the staged URL list, then move it from the crawl
    folder into the dataset under its final name."""
    staging = join(output, CRAWL_DIR)
    sps = params.number_sample_per_shard
    expected = [f"{i:0{params.oom_shard_count}d}" for i in range(math.ceil(url_list.rows / sps))]
    finished = set(_finished_shards(staging))
    missing = [n for n in expected if n not in finished]
    if missing:
        raise RuntimeError(
            f"crawl of {url_list.source!r} is incomplete: shards {', '.join(missing)} unfinished; "
            "rerun the same command to resume"
        )
    fs, _ = filesystem(output)
    entries = []
    slices = staged_shards(url_list.staged, sps)  # streamed: one staged part in memory at most
    for index, (name, expected_rows) in enumerate(zip(expected, slices, strict=True)):
        final_name = shard_name(index)  # the dataset's names, whatever oom_shard_count says
        crawled, final = join(staging, f"{name}.parquet"), join(output, f"{final_name}.parquet")
        here = crawled if fs.exists(filesystem(crawled)[1]) else final
        _check_shard(here, name, index, expected_rows, sps)
        for ext in ("parquet", "tar"):  # tar last: a shard counts once its tar is in place
            src, dst = (
                filesystem(join(staging, f"{name}.{ext}"))[1],
                filesystem(join(output, f"{final_name}.{ext}"))[1],
            )
            if fs.exists(src):
                fs.mv(src, dst)
            elif not fs.exists(dst):
                raise DatasetError(f"{join(staging, name)}.{ext}: finished shard has no {ext}")
        entries.append(describe_shard(output, final_name))
    return entries


@task(name="write-manifest")
def seal_dataset(
    output: str,
    shards: list[ShardEntry],
    url_list: UrlList,
    params: CrawlParams,
    stats: dict[str, Any],
) -> Manifest:
    """Write the manifest last; from here on the staged crawl is a complete dataset."""
    return write_manifest(
        output,
        shards,
        stage="ingest",
        # what decides the output: the same crawl run by other processes or engines (RUN_ONLY_PARAMS)
        # has the same digest
        parameters={
            "url_list": url_list.source,
            **params.model_dump(mode="json", exclude=RUN_ONLY_PARAMS),
        },
        input_digest=url_list.digest,
        stats=stats,
    )


def drop_crawl_state(output: str) -> None:
    """The crawl's working folder, once the dataset is sealed: not part of the dataset."""
    fs, path = filesystem(join(output, STAGING))
    if fs.exists(path):
        fs.rm(path, recursive=True)
