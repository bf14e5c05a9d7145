"""bf16 training-step samples/s and MFU of CLIP presets on one CUDA GPU, at the largest batch that
fits (bench/gpu.sh runs it; there is no GPU on the development machine, so it is unmeasured there).

    .venv/bin/python bench/gpu_step.py --models tiny ViT-B-32
    .venv/bin/python bench/gpu_step.py --models ViT-B-32 --batch-sizes 256 512 --compile

A step is what training runs: bf16 autocast forward, ClipLoss, backward, fused AdamW, with TF32
on (clip_model.train_config.device_options' GPU defaults). The batch doubles from the first of
`--batch-sizes` until a step runs out of memory (or the list ends); each size is timed over
`--steps` steps after warmup with CUDA events, synchronising once per window. FLOPs are
bench/model.py's count (3 x the forward's matmuls, attention included); MFU divides by the card's
bf16 dense peak, measured here as the best of big square bf16 matmuls (and the datasheet's figure
when the card's name is known, for reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model import forward_flops, make_batch  # noqa: E402
from clip_model import create_model  # noqa: E402
from clip_model.loss import ClipLoss  # noqa: E402

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best


def step_rate(model, images, texts, *, steps: int, warmup: int) -> float:
    """Samples/s of the training step, best of three windows of `steps` steps."""
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(*model(images, texts))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / steps)
    return images.shape[0] / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "ViT-B-32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 4096])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():  # `make bench` runs every script: a skip, not a failure
        print("skipped: bench/gpu_step.py needs a CUDA GPU (torch sees none)")
        return
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = matmul_peak()
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    print(
        f"{name}: measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s"
        + (f" (datasheet dense {sheet:.0f})" if sheet else "")
    )
    figures = {"device": name, "peak_tflops": peak / 1e12, "models": {}}
    for model_name in args.models:
        first, last = args.batch_sizes[0], args.batch_sizes[-1]
        best = None
        batch = first
        while batch <= last:
            torch.manual_seed(0)
            model = create_model(model_name).cuda()
            model.check_token_ids = False  # as in training: no host read in the step
            if args.compile:
                model.compile()
            images, texts = make_batch(model, batch, torch.Generator().manual_seed(0))
            images, texts = images.cuda(), texts.cuda()
            try:
                rate = step_rate(model, images, texts, steps=args.steps, warmup=args.warmup)
            except torch.OutOfMemoryError:
                print(f"  {model_name}: batch {batch} does not fit")
                break
            finally:
                del model
                torch.cuda.empty_cache()
            flops = 3 * forward_flops(create_model(model_name).cuda(), ClipLoss(), images, texts)
            mfu = rate / batch * flops / peak
            print(f"  {model_name}: batch {batch}: {rate:,.0f} samples/s, MFU {mfu:.1%}")
            best = {"batch": batch, "samples_per_s": rate, "mfu": mfu}
            batch *= 2
        if best is not None:
            figures["models"][model_name] = best
            print(
                f"{model_name} bf16 at the largest batch that fits ({best['batch']}): "
                f"{best['samples_per_s']:,.0f} samples/s, MFU {best['mfu']:.1%}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
