"""Training throughput through the whole input path against the bare train step, same run.

    .venv/bin/python bench/train.py                        # tiny, batch 64, fp32 and bf16
    .venv/bin/python bench/train.py --batch-size 128 --steps 10 --workers 2
    .venv/bin/python bench/train.py --data data/crawl      # a real dataset instead of shapes
    .venv/bin/python bench/train.py --only accum           # accum_freq=4 vs plain, micro-batch 64

"Full" is what `python -m clip_model.train` runs: WebDataset shards -> DataLoader workers (decode,
random crop, tokenise) -> ClipDataModule -> Lightning Trainer -> ClipLightningModule (AdamW,
cosine schedule, gradient clipping, clamp, per-step logging), MLflow off. "Bare" is the model
benchmark's step (bench/model.py: forward, ClipLoss, backward, AdamW on a batch already in
memory), timed in windows *inside* the same Trainer run, between windows of Trainer steps, so both
see the same machine. The best window of each is compared: a ratio >= 0.9 means data loading and
the Trainer cost at most 10% of the step (the goal is >= 0.95).

"accum" is OpenCLIP-style accumulation (`accum_freq=4`, micro-batches of `--batch-size`) against
plain steps of `--batch-size`, both the LightningModule's own step on batches in memory: samples/s
each (goal >= 0.85). The method encodes accum_freq - 1 of every accum_freq micro-batches twice
(once without a graph), so with a backward costing twice the forward its bound is
3K / (3K + K - 1): 0.80 at K = 4.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model import make_batch, steps_per_second  # noqa: E402
from clip_model import create_model, get_tokenizer, train_tokenizer  # noqa: E402
from clip_model.datamodule import ClipDataModule  # noqa: E402
from clip_model.lightning_module import ClipLightningModule  # noqa: E402
from clip_model.transforms import eval_transform, train_transform  # noqa: E402
from storage import DatasetWriter, open_dataset  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle"]


def write_shapes(out: str, n: int, side: int) -> str:
    """`n` JPEG shapes of `side` px with their captions, as a dataset of 512-sample shards."""
    rng = random.Random(0)
    with DatasetWriter(out, stage="bench", samples_per_shard=512) as writer:
        for i in range(n):
            color, shape = rng.choice(COLORS), rng.choice(SHAPES)
            image = Image.new("RGB", (side, side), tuple(rng.randint(0, 255) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            r = rng.randint(side // 6, side // 2 - 1)
            x, y = rng.randint(r, side - r), rng.randint(r, side - r)
            box = (x - r, y - r, x + r, y + r)
            if shape == "circle":
                draw.ellipse(box, fill=color)
            elif shape == "square":
                draw.rectangle(box, fill=color)
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=90)
            writer.write(f"b{i:06d}", buf.getvalue(), f"a {color} {shape} on a background")
    return out


class _Interleaved(L.Callback):
    """Times the Trainer's steps in windows and runs the bare step between windows, so both
    see the same machine (this one is shared: other jobs come and go within minutes)."""

    def __init__(self, args, bf16: bool):
        self.args, self.bf16 = args, bf16
        self.bare_model = create_model(args.model, vocab_size=4096)
        self.batch = make_batch(self.bare_model, args.batch_size, torch.Generator().manual_seed(0))
        self.full: list[float] = []
        self.bare: list[float] = []
        self.waits: list[float] = []  # mean data-wait fraction per full window
        self._durations: list[float] = []
        self._waits: list[float] = []
        self._last: float | None = None

    def _bare_window(self) -> None:
        rate = steps_per_second(
            self.bare_model, *self.batch, bf16=self.bf16, steps=self.args.steps, warmup=1
        )
        self.bare.append(rate * self.args.batch_size)

    def on_train_batch_end(self, trainer, *args) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._durations.append(now - self._last)
            self._waits.append(float(trainer.callback_metrics.get("perf/data_wait_frac", 0.0)))
        step, warmup = trainer.global_step, self.args.warmup
        if step >= warmup and (step - warmup) % self.args.steps == 0:
            if step > warmup:
                durations = self._durations[-self.args.steps :]
                self.full.append(self.args.batch_size * len(durations) / sum(durations))
                self.waits.append(sum(self._waits[-self.args.steps :]) / self.args.steps)
            self._bare_window()
        self._last = time.perf_counter()  # the bare window is not a training step


def measure(data, tokenizer, args, precision: str) -> _Interleaved:
    """The training program's own path (MLflow off), with bare-step windows in between."""
    config = create_model(args.model).config.model_copy(update={"vocab_size": 4096})
    datamodule = ClipDataModule(
        data,
        tokenizer=tokenizer,
        train_transform=train_transform(config.image_size),
        val_transform=eval_transform(config.image_size),
        image_size=config.image_size,
        batch_size=args.batch_size,
        workers=args.workers,
        shuffle_buffer=1000,
    )
    module = ClipLightningModule(model=config, warmup_steps=10, print_every=args.print_steps)
    clock = _Interleaved(args, bf16=precision != "32")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=args.warmup + args.rounds * args.steps,
        gradient_clip_val=1.0,
        logger=False,
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return clock


class _StepClock(L.Callback):
    """Wall time of each optimizer step (batches between two global_step changes)."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self._last = warmup, [], None
        self._step = 0

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self._step:  # accumulating: no step yet
            return
        self._step = trainer.global_step
        now = time.perf_counter()
        if self._last is not None and self._step > self.warmup:
            self.times.append(now - self._last)
        self._last = now


def accumulation_rate(args, accum: int, precision: str) -> float:
    """Samples/s of the module's own step at micro-batch `--batch-size`, batches in memory (no
    data path): accum_freq=`accum` (one step per `accum` micro-batches) or plain (accum 1)."""
    config = create_model(args.model).config.model_copy(update={"vocab_size": 4096})
    module = ClipLightningModule(model=config, warmup_steps=10, accum_freq=accum)
    images, texts = make_batch(module.model, args.batch_size, torch.Generator().manual_seed(0))
    steps = args.warmup + args.steps
    batches = [{"image": images, "text": texts}] * (steps * accum)
    clock = _StepClock(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return args.batch_size * accum / min(clock.times)


def compare_accumulation(args) -> None:
    """accum_freq=4 vs plain steps at the same micro-batch, alternating so both see the same
    machine; the best of `--rounds` runs each."""
    for name, precision in (("bf16", "bf16-mixed"),):
        plain, accum = [], []
        for _ in range(args.rounds):
            plain.append(accumulation_rate(args, 1, precision))
            accum.append(accumulation_rate(args, args.accum_freq, precision))
        print(
            f"{name}: accum_freq={args.accum_freq} at micro-batch {args.batch_size} "
            f"{max(accum):.1f} samples/s, plain batch {args.batch_size} {max(plain):.1f} "
            f"samples/s, ratio {max(accum) / max(plain):.2f} (goal >= 0.85)\n"
            f"      runs: accum {[round(r, 1) for r in accum]}, plain {[round(r, 1) for r in plain]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data", help="a dataset (default: synthetic shapes in a temp folder)")
    parser.add_argument("--image-side", type=int, default=96, help="synthetic JPEG side, px")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=4, help="full-path windows per precision")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--print-steps", type=int, default=0, help="print every N steps' metrics")
    parser.add_argument("--accum-freq", type=int, default=4, help="the accumulation comparison")
    parser.add_argument("--only", choices=["full", "accum"], help="one comparison (default: both)")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    if args.only != "full":
        compare_accumulation(args)
    if args.only == "accum":
        return

    with tempfile.TemporaryDirectory() as tmp:
        n = args.batch_size * (args.warmup + args.rounds * args.steps + 2)  # no epoch boundary
        data = args.data or write_shapes(f"{tmp}/shapes", n, args.image_side)
        dataset = open_dataset(data)
        captions = [s.caption for s in dataset.iter_samples()]
        train_tokenizer(captions, 4096, f"{tmp}/tokenizer.json")
        context = create_model(args.model).config.context_length
        tokenizer = get_tokenizer(f"{tmp}/tokenizer.json", context)
        print(
            f"model {args.model}, batch {args.batch_size}, {args.workers} workers, "
            f"{dataset.manifest.total_samples} samples, torch threads {torch.get_num_threads()}"
        )
        for name, precision in (("fp32", "32"), ("bf16", "bf16-mixed")):
            clock = measure(dataset, tokenizer, args, precision)
            full, bare = max(clock.full), max(clock.bare)
            # each full window against the bare windows either side of it (same minutes)
            bare_pairs = zip(clock.bare, clock.bare[1:], strict=False)
            pairs = [f / max(b) for f, b in zip(clock.full, bare_pairs, strict=False)]
            print(
                f"{name}: full path {full:.1f} samples/s, bare step {bare:.1f} samples/s, "
                f"ratio {full / bare:.2f} (best windows; goal >= 0.95)\n"
                f"      windows: full {[round(r, 1) for r in clock.full]}, "
                f"bare {[round(r, 1) for r in clock.bare]}, adjacent ratios "
                f"{[round(r, 2) for r in pairs]}, data-wait fraction "
                f"{[round(w, 3) for w in clock.waits]}"
            )


if __name__ == "__main__":
    main()
