"""Curation throughput: column filters, langid, near-duplicate search, resharding, CLIP scoring.

    .venv/bin/python bench/curate.py                 # full sizes (1M metadata rows)
    .venv/bin/python bench/curate.py --rows 200000 --reshard-mb 20 --clip-images 256

Goals (issue 6): column filters >= 2M rows/s on 1M rows; resharding >= 0.7x a plain tar copy of the
same shards. Figures are printed; nothing is asserted (timings depend on the machine's load).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flows  # noqa: E402,F401  (environment defaults)
from storage import DatasetWriter, open_dataset  # noqa: E402
from tasks.curation.filters import COLUMNS, FILTERS, FilterContext, LanguageIdentifier  # noqa: E402
from tasks.curation.near_dup import HashIndex, greedy_dedup  # noqa: E402
from tasks.curation.run import Selection  # noqa: E402
from tasks.curation.spec import parse_filter_spec  # noqa: E402
from tasks.curation.write import write_curated  # noqa: E402

WORDS = "a the red blue green photo of cat dog on in with small large two three car tree".split()


def synthetic_metadata(n: int, seed: int = 0) -> pa.Table:
    """n img2dataset-like rows: 5% duplicate URLs, 5% duplicate bytes, varied sizes and captions."""
    rng = np.random.default_rng(seed)
    urls = np.char.add("http://example.com/img/", np.arange(n).astype(str))
    dup = rng.random(n) < 0.05
    urls[dup] = urls[rng.integers(0, n, dup.sum())]
    sha = np.char.add("sha", rng.integers(0, 2**62, n).astype(str))
    dup = rng.random(n) < 0.05
    sha[dup] = sha[rng.integers(0, n, dup.sum())]
    lengths = rng.integers(0, 12, n)
    vocab = np.array(WORDS)
    words = vocab[rng.integers(0, len(vocab), (n, 12))]
    captions = [" ".join(w[:k]) for w, k in zip(words.tolist(), lengths.tolist(), strict=True)]
    return pa.table(
        {
            "key": np.char.zfill(np.arange(n).astype(str), 9),
            "url": urls,
            "caption": captions,
            "width": np.full(n, 256),
            "height": np.full(n, 256),
            "original_width": rng.integers(50, 2000, n),
            "original_height": rng.integers(50, 2000, n),
            "sha256": sha,
            "status": np.full(n, "success"),
        }
    )


def bench_column_filters(rows: int) -> None:
    spec = parse_filter_spec(
        {"filters": [{"name": "basic"}, {"name": "dedup_url"}, {"name": "dedup_sha256"}]}
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "meta.parquet"
        pq.write_table(synthetic_metadata(rows), path)
        t0 = time.perf_counter()
        table = pq.read_table(path)
        read_s = time.perf_counter() - t0
    print(
        f"\ncolumn filters on {rows:,} synthetic Parquet rows (read: {rows / read_s / 1e6:.2f}M rows/s)"
    )
    ctx = FilterContext()
    for cfg in spec.filters:
        FILTERS[cfg.name](table.slice(0, 1000), cfg, ctx)  # warm up
        t0 = time.perf_counter()
        why = FILTERS[cfg.name](table, cfg, ctx)
        s = time.perf_counter() - t0
        print(
            f"  {cfg.name:<14}{rows / s / 1e6:8.2f}M rows/s   removed {why.null_count and rows - why.null_count:,}"
        )
    t0 = time.perf_counter()
    alive = np.arange(rows)
    for cfg in spec.filters:  # as select_samples runs them: each over the survivors
        why = FILTERS[cfg.name](table.select(COLUMNS[cfg.name]).take(alive), cfg, ctx)
        alive = alive[~why.is_valid().to_numpy(zero_copy_only=False)]
    s = time.perf_counter() - t0
    print(
        f"  {'chain of all 3':<14}{rows / s / 1e6:8.2f}M rows/s   kept {len(alive):,}  (goal >= 2M rows/s)"
    )


def bench_language(n: int) -> None:
    table = synthetic_metadata(n, seed=1)
    captions = table.column("caption").to_pylist()
    ident = LanguageIdentifier()
    ident.classify(captions[:100])
    t0 = time.perf_counter()
    ident.classify(captions)
    s = time.perf_counter() - t0
    print(f"\nlangid, batched: {n / s:,.0f} captions/s on {n:,} captions (per unique caption)")


def bench_near_duplicates(n: int, threshold: int) -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    copies = rng.integers(0, n, n // 100)
    hashes[rng.integers(0, n, n // 100)] = hashes[copies] ^ np.uint64(0b1011)
    t0 = time.perf_counter()
    kept, _, _ = greedy_dedup(hashes, threshold)
    s = time.perf_counter() - t0
    index = HashIndex(hashes, threshold)
    print(
        f"\nnear-duplicate self-join, {n:,} pHashes, threshold {threshold} "
        f"(multi-index: {index.m} chunks, radius {index.radius}): {s:.2f} s, "
        f"{n / s:,.0f} hashes/s, dropped {(~kept).sum():,}"
    )


def make_dataset(url: str, megabytes: int, shards: int = 8) -> None:
    rng = np.random.default_rng(0)
    size = 24_000  # bytes per "image": resharding never decodes, so random bytes do
    n = megabytes * 1_000_000 // size
    with DatasetWriter(url, stage="ingest", samples_per_shard=-(-n // shards)) as w:
        for i in range(n):
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            row = {"url": f"http://x/{i}", "original_width": 512, "original_height": 512}
            w.write(f"{i:08d}", data, f"caption number {i}", {"url": row["url"]}, row)


def tar_copy(src: list[str], dst: Path) -> None:
    """The baseline: copy every member of every tar into a new tar (no filtering, no metadata)."""
    dst.mkdir()
    for i, path in enumerate(src):
        with tarfile.open(path, "r|") as tin, tarfile.open(dst / f"{i:05d}.tar", "w") as tout:
            for member in tin:
                tout.addfile(member, tin.extractfile(member))


def bench_reshard(megabytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/in"
        make_dataset(src, megabytes)
        ds = open_dataset(src)
        tars = ds.tar_urls()
        mb = sum(s.tar_bytes for s in ds.manifest.shards) / 1e6
        samples = ds.metadata(columns=["key"], with_shard=True)  # every row is a sample here
        sel = Selection(
            samples=samples,
            reason=np.full(samples.num_rows, None, dtype=object),
            detail=np.full(samples.num_rows, None, dtype=object),
            input_rows=samples.num_rows,
        )
        for f in tars:  # page cache warm for everyone
            Path(f).read_bytes()
        timings = {}
        for name in ("reshard", "tar copy", "cp"):
            best = float("inf")
            for rep in range(2):
                out = Path(tmp) / f"{name.replace(' ', '_')}{rep}"
                t0 = time.perf_counter()
                if name == "reshard":
                    write_curated(ds, sel, str(out), num_shards=8, parameters={}, progress=False)
                elif name == "tar copy":
                    tar_copy(tars, out)
                else:
                    out.mkdir()
                    for i, f in enumerate(tars):
                        shutil.copyfile(f, out / f"{i:05d}.tar")
                best = min(best, time.perf_counter() - t0)
                shutil.rmtree(out)
            timings[name] = mb / best
        print(f"\nresharding {mb:.0f} MB ({samples.num_rows:,} samples of 24 KB, 8 -> 8 shards):")
        for name, rate in timings.items():
            print(f"  {name:<10}{rate:8.1f} MB/s")
        print(
            f"  reshard / tar copy = {timings['reshard'] / timings['tar copy']:.2f} (goal >= 0.7); "
            f"reshard / cp = {timings['reshard'] / timings['cp']:.2f}"
        )


def bench_clip(n: int, batch: int) -> None:
    import torch
    from PIL import Image

    from tasks.curation.images import ClipScorer
    from tasks.curation.scan import ShardJob, scan_shard
    from tasks.curation.spec import ClipScore

    rng = np.random.default_rng(0)
    print(
        f"\nCLIP score, model tiny (random weights), {n} images, batch {batch}, "
        f"{torch.get_num_threads()} threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}:"
    )
    with tempfile.TemporaryDirectory() as tmp:
        with DatasetWriter(f"{tmp}/ds", stage="ingest", samples_per_shard=n // 2) as w:
            for i in range(n):
                grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(grid).resize((64, 64), Image.Resampling.BICUBIC).save(buf, "JPEG")
                w.write(f"{i:06d}", buf.getvalue(), f"a photo of thing number {i}", {}, {})
        ds = open_dataset(f"{tmp}/ds")
        tok = Path(tmp) / "bpe.json"
        from clip_model.tokenizer import train_tokenizer

        train_tokenizer([f"a photo of thing number {i}" for i in range(2000)], 512, tok)
        for precision in ("fp32", "bf16"):
            cfg = ClipScore(
                name="clip_score", tokenizer=str(tok), batch_size=batch, precision=precision
            )
            scorer = ClipScorer(cfg)
            images = torch.randn(batch, 3, 64, 64)
            captions = [f"a photo of thing number {i}" for i in range(batch)]
            scorer.score(images[:8], captions[:8])
            t0 = time.perf_counter()
            reps = max(1, n // batch)
            for _ in range(reps):
                scorer.score(images, captions)
            model_rate = reps * batch / (time.perf_counter() - t0)
            spec = parse_filter_spec(
                {"filters": [{"name": "near_duplicates"}, cfg.model_dump(mode="json")]}
            )
            t0 = time.perf_counter()
            for entry in ds.manifest.shards:  # one process; tasks/engine.py spreads shards
                scan_shard(ShardJob(ds.url, entry.name, None, spec))
            e2e = n / (time.perf_counter() - t0)
            print(
                f"  {precision}: model {model_rate:8.0f} images/s; decode + pHash + score {e2e:8.0f} images/s"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="metadata rows for column filters")
    p.add_argument("--captions", type=int, default=20_000, help="captions for langid")
    p.add_argument("--hashes", type=int, default=200_000, help="pHashes for the near-dup search")
    p.add_argument("--threshold", type=int, default=6)
    p.add_argument("--reshard-mb", type=int, default=50, help="MB of shards to reshard")
    p.add_argument("--clip-images", type=int, default=512)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["filters", "language", "near", "reshard", "clip"]
    )
    args = p.parse_args(argv)
    if "filters" not in args.skip:
        bench_column_filters(args.rows)
    if "language" not in args.skip:
        bench_language(args.captions)
    if "near" not in args.skip:
        bench_near_duplicates(args.hashes, args.threshold)
    if "reshard" not in args.skip:
        bench_reshard(args.reshard_mb)
    if "clip" not in args.skip:
        bench_clip(args.clip_images, args.clip_batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
