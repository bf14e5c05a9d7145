"""Curation at scale: synthetic crawls (tiny JPEGs and captions made here, no crawl) curated with
every filter but CLIP score, on 1 and 2 local workers: rows/s and peak RSS of each run.

    .venv/bin/python bench/scale.py                          # 100k and 1M samples, 1 and 2 workers
    .venv/bin/python bench/scale.py --sizes 100000 300000    # what a shared machine allows
    .venv/bin/python bench/scale.py --sizes 20000 --workers 1   # a quick look

Goals (issue 12): peak RSS at 1M samples <= 2 GB and <= 1.5x its value at 100k (memory bounded by
the shard and the worker count, not the dataset); 2 workers >= 1.7x the rows/s of 1 worker. Each
curation runs in its own process; its peak RSS is that of the whole process tree (driver and
workers), sampled every 0.2 s. The synthetic crawls are cached in --data (re-used when present).
When bench/url_staging.py (the ingest side's URL-list staging benchmark) exists, it runs last.
Figures are printed; nothing is asserted (they depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "a the red blue green photo of cat dog on in with small large two three car tree house "
    "street beach mountain river bird flower old new bright dark painting drawing"
).split()
SPEC = {
    "filters": [
        {"name": "basic", "min_side": 200},
        {"name": "language", "languages": ["en"], "candidates": ["en", "fr", "de", "es"]},
        {"name": "dedup_url"},
        {"name": "dedup_sha256"},
        {"name": "near_duplicates", "threshold": 3, "max_thumb_difference": 8},
    ],
    "val_fraction": 0.01,
}
SHARD_SAMPLES = 10_000  # input shards, as img2dataset writes them
OUTPUT_SHARD_SAMPLES = 16_000  # output shards about this large, as a real curation would ask


def make_crawl(url: str, n: int, seed: int = 0) -> None:
    """n samples in shards of 10,000: unique 32 px JPEGs, captions from a small vocabulary, 5%
    duplicate URLs, 3% duplicate images, 10% too small originals, 5% one-word captions."""
    from PIL import Image

    from storage import DatasetWriter

    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS)
    with DatasetWriter(url, stage="ingest", samples_per_shard=SHARD_SAMPLES) as writer:
        previous: list[tuple[str, bytes]] = []
        for i in range(n):
            grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(grid).resize((32, 32), Image.Resampling.BILINEAR).save(buf, "JPEG")
            image, url_i = buf.getvalue(), f"http://example.com/img/{i}.jpg"
            r = rng.random()
            if previous and r < 0.05:
                url_i = previous[rng.integers(len(previous))][0]
            elif previous and r < 0.08:
                image = previous[rng.integers(len(previous))][1]
            if len(previous) < 1000:
                previous.append((url_i, image))
            words = 1 if rng.random() < 0.05 else int(rng.integers(3, 12))
            caption = " ".join(vocab[rng.integers(0, len(vocab), words)])
            side = int(rng.integers(40, 200)) if rng.random() < 0.1 else int(rng.integers(200, 900))
            row = {
                "url": url_i,
                "original_width": side,
                "original_height": int(side * rng.uniform(0.5, 2.0)),
                "width": 32,
                "height": 32,
                "sha256": hashlib.sha256(image).hexdigest(),
            }
            writer.write(f"{i:09d}", image, caption, {"url": url_i}, row)


def curate_once(data: str, out: str, workers: int) -> dict:
    """One curation (the child process's work): rows/s and counts."""
    import flows  # noqa: F401  (environment defaults)
    from storage import open_dataset
    from tasks.curation import parse_filter_spec, select_samples
    from tasks.curation.write import write_curated
    from tasks.engine import Engine

    n = open_dataset(data).manifest.total_samples
    spec = parse_filter_spec({**SPEC, "num_shards": max(2, n // OUTPUT_SHARD_SAMPLES)})
    engine = Engine(workers=workers)
    ds = open_dataset(data)
    t0 = time.perf_counter()
    with engine:  # one pool for the scan and the write, as the flow does
        sel = select_samples(ds, spec, engine=engine, progress=False, log=lambda _: None)
        t1 = time.perf_counter()
        manifest = write_curated(
            ds, sel, out, num_shards=spec.num_shards, parameters={"spec": SPEC},
            val_fraction=spec.val_fraction, engine=engine, progress=False, log=lambda _: None,
        )  # fmt: skip
    t2 = time.perf_counter()
    n = sel.samples.num_rows
    return {
        "samples": n,
        "kept": manifest.stats["kept"],
        "removed": manifest.stats["removed"],
        "select_s": t1 - t0,
        "write_s": t2 - t1,
        "rows_per_s": n / (t2 - t0),
        "digest": manifest.digest,
    }


def measure(data: str, out: str, workers: int) -> dict:
    """Run curate_once in a child process; add the peak RSS of its process tree."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", data, out, str(workers)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    stdout = child.stdout.read()
    if child.returncode:
        raise RuntimeError(f"curation with {workers} worker(s) failed ({child.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data", default=str(ROOT / "data" / "bench" / "scale"))
    p.add_argument("--child", nargs=3, metavar=("DATA", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        data, out, workers = args.child
        print(json.dumps(curate_once(data, out, int(workers))))
        return 0
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    results = {}
    for n in args.sizes:
        data = f"{args.data}/crawl-{n}"
        if not Path(data, "manifest.json").exists():
            shutil.rmtree(data, ignore_errors=True)
            t0 = time.perf_counter()
            make_crawl(data, n)
            print(f"made a synthetic crawl of {n:,} samples in {time.perf_counter() - t0:.0f} s")
        for workers in args.workers:
            r = measure(data, f"{args.data}/curated-{n}-{workers}", workers)
            results[n, workers] = r
            print(
                f"{n:>9,} samples, {workers} worker(s): {r['rows_per_s']:8,.0f} rows/s "
                f"(select {r['select_s']:.0f} s, write {r['write_s']:.0f} s), peak RSS "
                f"{r['peak_rss_mb']:6,.0f} MB, kept {r['kept']:,}, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    for n in args.sizes:
        if (n, 1) in results and (n, 2) in results:
            one, two = results[n, 1], results[n, 2]
            assert one["digest"] == two["digest"], "the worker count changed the output"
            print(
                f"{n:,}: 2 workers / 1 = {two['rows_per_s'] / one['rows_per_s']:.2f} (goal >= 1.7)"
            )
    small, large = min(args.sizes), max(args.sizes)
    if small != large:
        for workers in args.workers:
            a, b = results[small, workers]["peak_rss_mb"], results[large, workers]["peak_rss_mb"]
            print(
                f"peak RSS, {workers} worker(s): {large:,} / {small:,} = {b / a:.2f} "
                f"(goal <= 1.5 from 100k to 1M), {b:,.0f} MB at {large:,} (goal <= 2,048 MB)"
            )
    staging = ROOT / "bench" / "url_staging.py"
    if staging.exists():
        print("\nURL-list staging (bench/url_staging.py):", flush=True)
        subprocess.run([sys.executable, str(staging)], check=False, cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
