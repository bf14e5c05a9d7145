"""Search index benchmark: FAISS build and query speed, exact vs approximate, on random vectors.

    python bench/search.py                       # 100k vectors, dim 512 (the issue's figures)
    python bench/search.py --n 20000 --kinds flat ivf

For each index kind (storage.embeddings.choose_spec: `flat` exact inner product, `ivf` the
inverted file auto-chosen above 100k vectors, `hnsw` on request) it prints build vectors/s,
single-query latency p50/p99 (one query a call, as the web page asks), batch throughput, and the
recall@10 the index keeps against exact search. Two data sets: `uniform` (random unit vectors,
the worst case for any partitioning index: no structure at all) and `clustered` (unit vectors
around 1,000 centres, closer to real CLIP embeddings, which cluster by content). Also the
embedding throughput of the index flow's model step (images/s) with the `tiny` preset.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from storage.embeddings import build_faiss_index, choose_spec, search_faiss  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(kind: str, n: int, dim: int, queries: int, rng: np.random.Generator):
    if kind == "uniform":
        return unit(rng.standard_normal((n, dim))), unit(rng.standard_normal((queries, dim)))
    centres = unit(rng.standard_normal((1000, dim)))
    data = unit(centres[rng.integers(0, 1000, n)] + 0.05 * rng.standard_normal((n, dim)))
    picks = centres[rng.integers(0, 1000, queries)]
    return data, unit(picks + 0.05 * rng.standard_normal((queries, dim)))


def bench_kind(kind, data, queries, exact_ids, k, latency_queries):
    spec = choose_spec(len(data), kind=kind)
    t0 = time.perf_counter()
    index = build_faiss_index(spec, data)
    build_s = time.perf_counter() - t0
    times = []
    for q in queries[:latency_queries]:
        t = time.perf_counter()
        search_faiss(index, q[None, :], k)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    _, ids = search_faiss(index, queries, k)
    batch_s = time.perf_counter() - t
    if exact_ids is None:
        exact_ids = ids
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids, strict=True)])
    ms = np.array(times) * 1000
    row = {
        "index": spec.describe(),
        "build_s": build_s,
        "build_vps": len(data) / build_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "batch_qps": len(queries) / batch_s,
        "recall": float(recall),
    }
    return row, ids


def bench_embedding(n_images: int) -> list[str]:
    """images/s of the index flow's model step (clip_model.embedder) with the tiny preset,
    random weights."""
    import torch
    from PIL import Image

    from clip_model import create_model
    from clip_model.embedder import Embedder

    torch.manual_seed(0)
    model = create_model("tiny", tokenizer="openai", vocab_size=49408)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n_images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    lines = []
    for precision in ("fp32", "bf16"):
        embedder = Embedder(model, device="cpu", precision=precision, batch_size=64)
        embedder.images(images[:64])  # warm-up
        t = time.perf_counter()
        embedder.images(images)
        lines.append(
            f"embed images (tiny preset, 64 px, batch 64, {precision}): "
            f"{n_images / (time.perf_counter() - t):.1f} images/s"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/search.py", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and throughput")
    p.add_argument("--latency-queries", type=int, default=300, help="single queries timed")
    p.add_argument("-k", type=int, default=10)
    p.add_argument(
        "--kinds", nargs="+", default=["flat", "ivf"], help="flat ivf hnsw (hnsw builds slowly)"
    )
    p.add_argument("--data", nargs="+", default=["uniform", "clustered"])
    p.add_argument("--embed-images", type=int, default=256, help="0: skip the model figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: its default)")
    args = p.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; n={args.n} "
        f"dim={args.dim} k={args.k}; latency over {args.latency_queries} single queries, "
        f"throughput and recall over {args.queries} queries"
    )
    header = (
        f"{'data':<10}{'index':<24}{'build s':>9}{'build vec/s':>13}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'batch q/s':>11}{'recall@' + str(args.k):>11}"
    )
    print(header)
    for data_kind in args.data:
        rng = np.random.default_rng(args.seed)
        data, queries = make_data(data_kind, args.n, args.dim, args.queries, rng)
        kinds = ["flat"] + [k for k in args.kinds if k != "flat"]
        exact = None
        for kind in kinds:
            row, ids = bench_kind(kind, data, queries, exact, args.k, args.latency_queries)
            exact = ids if kind == "flat" else exact
            if kind in args.kinds:
                print(
                    f"{data_kind:<10}{row['index']:<24}{row['build_s']:>9.2f}"
                    f"{row['build_vps']:>13,.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                    f"{row['batch_qps']:>11,.0f}{row['recall']:>11.3f}"
                )
            sys.stdout.flush()
    if args.embed_images:
        for line in bench_embedding(args.embed_images):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
