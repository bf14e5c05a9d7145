"""URL-list staging at scale: a folder of Parquet parts staged for img2dataset, in bounded memory.

    .venv/bin/python bench/url_staging.py [--rows 10000000] [--parts 20] [--work DIR]

Generates a URL-list folder (`--parts` Parquet files, url + caption + a kept column, like a
LAION/DataComp download) once, then stages it in a fresh process exactly as the ingest stage does
(`tasks.url_list.read_url_list`: every file read in batches with pyarrow.dataset, written as
Parquet parts of whole shards, then the list's digest streamed) and prints rows/s and the staging
process's peak RSS. Goal (issue 12): 10M rows staged with a peak RSS <= 1 GB. The machine may be
shared: the load average is printed beside the figures.

`stage_benchmark(rows, ...)` is what bench/scale.py calls; it returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["generate_url_folder", "stage_benchmark"]

WORDS = ["red", "green", "blue", "cat", "dog", "tree", "house", "car", "river", "mountain", "city"]


def generate_url_folder(folder: Path, rows: int, parts: int) -> Path:
    """`parts` Parquet files of `rows` rows in all (url, caption, similarity), built in batches
    with pyarrow compute (never the whole list in memory). Reused when already there."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    marker = folder / "_GENERATED"
    if marker.exists() and json.loads(marker.read_text()) == {"rows": rows, "parts": parts}:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_part = -(-rows // parts)
    words = pa.array(WORDS)
    for p in range(parts):
        start, stop = p * per_part, min(rows, (p + 1) * per_part)
        if start >= stop:
            break
        with pq.ParquetWriter(folder / f"part-{p:05d}.parquet", _schema()) as writer:
            for b in range(start, stop, 1 << 18):
                n = min(1 << 18, stop - b)
                ids = pc.cast(pa.array(np.arange(b, b + n)), pa.string())
                w1 = words.take(pa.array(rng.integers(0, len(WORDS), n)))
                w2 = words.take(pa.array(rng.integers(0, len(WORDS), n)))
                url = pc.binary_join_element_wise(
                    "https://images.example.com/", w1, "/", ids, ".jpg", ""
                )
                caption = pc.binary_join_element_wise("a photo of a ", w1, " ", w2, " #", ids, "")
                similarity = pa.array(rng.random(n, dtype=np.float32))
                writer.write_table(
                    pa.table([url, caption, similarity], schema=_schema()), row_group_size=1 << 17
                )
    marker.write_text(json.dumps({"rows": rows, "parts": parts}))
    return folder


def _schema():
    import pyarrow as pa

    return pa.schema([("url", pa.string()), ("caption", pa.string()), ("similarity", pa.float32())])


def _stage_in_child(url_list: str, output: str, per_shard: int, queue) -> None:
    """Runs in a fresh process, so its peak RSS is the staging's alone (plus the imports)."""
    import resource

    import psutil

    import flows  # noqa: F401  (environment defaults)
    from tasks.params.ingest import CrawlParams
    from tasks.url_list import list_digest, read_url_list, url_list_files

    base = psutil.Process().memory_info().rss
    params = CrawlParams(number_sample_per_shard=per_shard, save_additional_columns=["similarity"])
    t0 = time.perf_counter()
    digest = list_digest(url_list_files(url_list))  # what the flow computes first
    t1 = time.perf_counter()
    staged = read_url_list.fn(url_list, output, params, digest)  # stage, then digest again
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    queue.put(
        {
            "rows": staged.rows,
            "digest_seconds": t1 - t0,
            "stage_seconds": t2 - t1,
            "baseline_rss_mb": base / 2**20,
            "peak_rss_mb": peak / 2**20,
        }
    )


def stage_benchmark(
    rows: int = 10_000_000, parts: int = 20, work: str | Path | None = None, per_shard: int = 10_000
) -> dict[str, Any]:
    """Generate (or reuse) a `rows`-row URL-list folder under `work` and stage it in a fresh
    process. Returns rows, seconds, rows/s (staging: read, write, digest; and the first digest
    alone), the child's RSS after its imports and its peak RSS (MiB), and the load average."""
    work = Path(work or tempfile.mkdtemp(prefix="bench-url-staging-"))
    t0 = time.perf_counter()
    folder = generate_url_folder(work / f"urls-{rows}", rows, parts)
    generate_seconds = time.perf_counter() - t0
    output = work / "staged"
    shutil.rmtree(output, ignore_errors=True)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_stage_in_child, args=(str(folder), str(output), per_shard, queue))
    child.start()
    result = queue.get()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"staging failed with exit code {child.exitcode}")
    input_bytes = sum(p.stat().st_size for p in folder.glob("*.parquet"))
    staged_bytes = sum(p.stat().st_size for p in (output / ".ingest" / "url_list").glob("*"))
    shutil.rmtree(output, ignore_errors=True)
    return {
        **result,
        "parts": parts,
        "input_mb": input_bytes / 2**20,
        "staged_mb": staged_bytes / 2**20,
        "generate_seconds": generate_seconds,
        "stage_rows_per_s": result["rows"] / result["stage_seconds"],
        "digest_rows_per_s": result["rows"] / result["digest_seconds"],
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--parts", type=int, default=20)
    p.add_argument("--per-shard", type=int, default=10_000, help="number_sample_per_shard")
    p.add_argument("--work", help="where the generated list is kept (reused); default: a temp dir")
    args = p.parse_args()
    r = stage_benchmark(args.rows, args.parts, args.work, args.per_shard)
    load = ", ".join(f"{x:.1f}" for x in r["load_average"])
    print(
        f"URL list: {r['rows']:,} rows in {r['parts']} Parquet parts, {r['input_mb']:.0f} MiB "
        f"(generated in {r['generate_seconds']:.1f} s); staged {r['staged_mb']:.0f} MiB"
    )
    print(
        f"staging (read in batches, parts of whole shards, digest after): "
        f"{r['stage_seconds']:.1f} s, {r['stage_rows_per_s']:,.0f} rows/s"
    )
    print(f"digest alone: {r['digest_seconds']:.1f} s, {r['digest_rows_per_s']:,.0f} rows/s")
    goal = "met" if r["peak_rss_mb"] <= 1024 else "NOT met"
    print(
        f"peak RSS of the staging process: {r['peak_rss_mb']:.0f} MiB (after its imports: "
        f"{r['baseline_rss_mb']:.0f} MiB); goal <= 1024 MiB: {goal}"
    )
    print(f"load average {load} on {r['cpus']} CPUs")


if __name__ == "__main__":
    main()
