"""Training-step throughput and model FLOPs utilisation (MFU) of a CLIP preset on this machine.

    .venv/bin/python bench/model.py                       # tiny, batch 256, fp32 and bf16
    .venv/bin/python bench/model.py --model ViT-B-32 --batch-size 32 --steps 2
    .venv/bin/python bench/model.py --compile             # also torch.compile the model

FLOPs are counted as 2 x multiply-accumulates of every matmul and convolution in the forward
pass, attention's QK^T and AV included (full square, causal masking not discounted), plus the
loss's logits matmul; a training step is 3 x forward. The peaks are big square matmuls measured
in the same run, before and after the model (best of both), so MFU compares like with like even
on a shared machine; step times are likewise the best of the timed steps. A step = forward,
ClipLoss, backward, AdamW step. `--cpu-time --threads 1` times with the process's CPU clock
instead of the wall clock: on a machine other jobs are loading, that shows what the code does
when it has the core to itself (with several threads, OpenMP spin-waits would count).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from clip_model import create_model
from clip_model.loss import ClipLoss


class _AttentionFlops(TorchFunctionMode):
    """FlopCounterMode misses CPU SDPA kernels; count QK^T and AV here."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.flops += 2 * 2 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
        return func(*args, **(kwargs or {}))


def forward_flops(model, loss_fn, images, texts) -> int:
    counter = FlopCounterMode(display=False)
    attention = _AttentionFlops()
    with torch.no_grad(), counter, attention:
        loss_fn(*model(images, texts))
    ops = {str(op) for op in counter.get_flop_counts().get("Global", {})}
    counted_attention = any("attention" in op for op in ops)
    return counter.get_total_flops() + (0 if counted_attention else attention.flops)


clock = time.perf_counter


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * n**3 / best


def make_batch(model, batch_size: int, generator: torch.Generator):
    c = model.config
    images = torch.randn(batch_size, 3, c.image_size, c.image_size, generator=generator)
    texts = torch.randint(1, c.vocab_size - 2, (batch_size, c.context_length), generator=generator)
    lengths = torch.randint(3, c.context_length, (batch_size,), generator=generator)
    texts[torch.arange(batch_size), lengths] = c.vocab_size - 1  # [EOS]: the highest id
    texts[torch.arange(c.context_length) > lengths[:, None]] = 0
    return images, texts


def steps_per_second(model, images, texts, *, bf16: bool, steps: int, warmup: int) -> float:
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for i in range(warmup + steps):
        start = clock()
        with autocast:
            loss = loss_fn(*model(images, texts))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(clock() - start)
    return 1 / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="preset name or YAML path")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, help="untimed steps (default 1; 2 with --compile)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-time", action="store_true", help="time with the process CPU clock")
    args = parser.parse_args()

    if args.warmup is None:
        args.warmup = 2 if args.compile else 1  # the bf16 pass compiles its own graphs
    global clock
    if args.cpu_time:
        clock = time.process_time
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    peaks = {torch.float32: [matmul_peak(torch.float32)], torch.bfloat16: []}
    peaks[torch.bfloat16].append(matmul_peak(torch.bfloat16))

    model = create_model(args.model, grad_checkpointing=args.grad_checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    images, texts = make_batch(model, args.batch_size, torch.Generator().manual_seed(0))
    flops = forward_flops(model, ClipLoss(), images, texts) / args.batch_size
    train_flops = 3 * flops
    runner = torch.compile(model) if args.compile else model

    rates = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        rate = steps_per_second(
            runner, images, texts, bf16=bf16, steps=args.steps, warmup=args.warmup
        )
        rates[name] = rate * args.batch_size

    peaks[torch.float32].append(matmul_peak(torch.float32))
    peaks[torch.bfloat16].append(matmul_peak(torch.bfloat16))
    peak32, peak16 = max(peaks[torch.float32]), max(peaks[torch.bfloat16])

    c = model.config
    print(
        f"model {c.name}: {n_params / 1e6:.1f}M params, image {c.image_size}px, "
        f"context {c.context_length}, batch {args.batch_size}, threads {torch.get_num_threads()}"
        + (", torch.compile" if args.compile else "")
    )
    print(
        f"timing: best of {args.steps} steps after {args.warmup} warm-up, "
        + ("process CPU clock" if args.cpu_time else "wall clock")
        + f"; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"forward GFLOPs/sample {flops / 1e9:.3f}; train step (3x) {train_flops / 1e9:.3f}")
    print(f"matmul peak fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s")
    for name, peak in (("fp32", peak32), ("bf16", peak16)):
        achieved = rates[name] * train_flops
        print(
            f"train {name}: {rates[name]:.1f} samples/s, {achieved / 1e9:.1f} GFLOP/s, "
            f"MFU {100 * achieved / peak:.1f}% of the {name} peak"
            + (f" ({100 * achieved / peak16:.1f}% of the bf16 peak)" if name == "fp32" else "")
        )


if __name__ == "__main__":
    main()
