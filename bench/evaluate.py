"""Benchmark of evaluation: zero-shot classification throughput and retrieval-recall memory.

    python bench/evaluate.py                     # both parts, default sizes
    python bench/evaluate.py --skip-retrieval    # zero-shot images/s only
    python bench/evaluate.py --retrieval-images 20000 --retrieval-texts 100000 --dim 256

1. Zero-shot classification of the `tiny` preset (randomly initialised; speed does not depend on
   the weights): images/s end to end (PNG decode, eval transform, encode_image, logits,
   metrics) and for encode_image alone, in fp32 and bf16 autocast, on generated 112x112 PNGs
   (the size of the sample web's digits) in 10 classes.
2. Retrieval recall@1/5/10 on random features (texts near their image, captions grouped by
   image), run in a child process so its peak resident memory is its own: the peak above the
   features themselves, against the dense similarity matrix (float32) a one-shot computation
   would need.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Highest resident memory seen while the block runs (sampled every 2 ms by a thread)."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def make_image_folder(root: Path, n_images: int, size: int = 112) -> None:
    rng = np.random.default_rng(0)
    for k in range(n_images):
        folder = root / CLASSES[k % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k:05d}.png")
    (root / "templates.txt").write_text("a photo of the number {c}.\na drawing of a {c}.\n")


def bench_zero_shot(n_images: int, batch_size: int) -> None:
    from clip_model import create_model, get_tokenizer
    from clip_model.embedder import Embedder
    from clip_model.eval_data import read_image_folder
    from clip_model.evaluate import evaluate_classification
    from clip_model.tokenizer import train_tokenizer

    model = create_model("tiny").eval()
    size = model.config.image_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        make_image_folder(root, n_images)
        data = read_image_folder(root)
        prompts = [t.replace("{c}", c) for c in CLASSES for t in data.templates]
        train_tokenizer(prompts * 4, model.config.vocab_size, Path(tmp) / "tok.json")
        tokenizer = get_tokenizer(Path(tmp) / "tok.json", model.config.context_length)
        print(
            f"zero-shot classification, tiny ({size}px, embed_dim {model.config.embed_dim}), "
            f"{n_images} PNG images 112x112, {len(CLASSES)} classes x {len(data.templates)} "
            f"templates, batch {batch_size}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        images = torch.randn(batch_size, 3, size, size)
        for precision in ("fp32", "bf16"):
            embedder = Embedder(
                model, tokenizer, device="cpu", precision=precision, batch_size=batch_size
            )
            evaluate_classification(
                embedder,
                data._replace(images=data.images[:batch_size], labels=data.labels[:batch_size]),
            )  # warm-up
            start = time.perf_counter()
            result = evaluate_classification(embedder, data)
            seconds = time.perf_counter() - start
            ctx = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else torch.no_grad()
            with torch.no_grad(), ctx:
                model.encode_image(images)
                start = time.perf_counter()
                repeats = max(1, n_images // batch_size)
                for _ in range(repeats):
                    model.encode_image(images)
                model_seconds = time.perf_counter() - start
            print(
                f"  {precision}: end to end {n_images / seconds:8.1f} images/s "
                f"({seconds:.2f} s, acc1 {result.metrics['acc1']:.3f} on random pixels); "
                f"encode_image alone {repeats * batch_size / model_seconds:8.1f} images/s"
            )


def retrieval_child(n_images: int, n_texts: int, dim: int, chunk_size: int) -> dict:
    from clip_model.retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    per_image = n_texts // n_images
    text_to_image = torch.arange(n_images).repeat_interleave(per_image)[:n_texts]
    text_to_image = torch.cat(
        [text_to_image, torch.randint(0, n_images, (n_texts - len(text_to_image),), generator=g)]
    )
    images = torch.randn(n_images, dim, generator=g)
    # noise 4x the signal: recall@1 well below 1 at 20k images
    texts = torch.randn(n_texts, dim, generator=g).mul_(4.0).add_(images[text_to_image])
    features_mib = (images.numel() + texts.numel()) * 4 / 2**20
    with PeakRSS() as rss:
        start = time.perf_counter()
        metrics = retrieval_metrics(images, texts, text_to_image, chunk_size=chunk_size)
        seconds = time.perf_counter() - start
    return {
        "features_mib": features_mib,
        "rss_before_mib": rss.start,
        "peak_rss_mib": rss.peak,
        "max_rss_mib": max_rss_mib(),
        "seconds": seconds,
        "metrics": metrics,
    }


def bench_retrieval(n_images: int, n_texts: int, dim: int, chunk_size: int) -> None:
    args = [
        sys.executable,
        __file__,
        "--retrieval-child",
        f"--retrieval-images={n_images}",
        f"--retrieval-texts={n_texts}",
        f"--dim={dim}",
        f"--chunk-size={chunk_size}",
    ]
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=os.environ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    dense_mib = n_images * n_texts * 4 / 2**20
    print(
        f"retrieval recall@1/5/10, {n_images} images x {n_texts} texts, dim {dim}, "
        f"chunk {chunk_size}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"  peak RSS during retrieval_metrics {r['peak_rss_mib']:.0f} MiB, "
        f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f} MiB above the RSS before the call "
        f"({r['rss_before_mib']:.0f} MiB: torch + {r['features_mib']:.0f} MiB of features); "
        f"process max RSS {r['max_rss_mib']:.0f} MiB; a dense float32 similarity matrix alone "
        f"would be {dense_mib:.0f} MiB"
    )
    print(f"  {r['seconds']:.1f} s; " + ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="zero-shot images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--retrieval-images", type=int, default=20_000)
    parser.add_argument("--retrieval-texts", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256, help="feature dimension (tiny: 256)")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--skip-zero-shot", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--retrieval-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.retrieval_child:
        result = retrieval_child(
            args.retrieval_images, args.retrieval_texts, args.dim, args.chunk_size
        )
        print(json.dumps(result))
        return
    if not args.skip_zero_shot:
        bench_zero_shot(args.images, args.batch_size)
    if not args.skip_retrieval:
        bench_retrieval(args.retrieval_images, args.retrieval_texts, args.dim, args.chunk_size)


if __name__ == "__main__":
    main()
