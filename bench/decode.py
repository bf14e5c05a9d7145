"""Image decode throughput of clip_model.images.decode_image, per format and size.

    .venv/bin/python bench/decode.py                  # every case, best of 5 rounds
    .venv/bin/python bench/decode.py --rounds 9 --cases jpeg-256 jpeg-256-draft64

Each case decodes the same encoded image (random noise, the worst case for every codec) to an
RGB PIL image, `--images` times a round, and prints microseconds per image and images/s per
core: the best round of process CPU time (one thread: OpenCV is set to one thread), so figures
are comparable on a machine other jobs are loading; the median wall time is printed beside it.
`-draft64` cases ask for `draft_size=64`, as the training workers do for a 64 px model.
`bomb-*` cases time the refusal of a pixel bomb (a header read). `--decoder MODULE:FUNCTION`
times another function with the same signature, e.g. an older decoder for a before/after.
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import struct
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _noise(side: int, channels: int = 3) -> np.ndarray:
    shape = (side, side, channels) if channels > 1 else (side, side)
    return np.random.default_rng(side).integers(0, 256, shape, dtype=np.uint8)


def _png_bomb(side: int = 12_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def cases() -> dict[str, tuple[bytes, int | None]]:
    """{name: (encoded bytes, draft_size)}."""
    out: dict[str, tuple[bytes, int | None]] = {}
    for side in (64, 256, 512):
        jpeg = _encode(Image.fromarray(_noise(side)), "JPEG", quality=90)
        out[f"jpeg-{side}"] = (jpeg, None)
        out[f"jpeg-{side}-draft64"] = (jpeg, 64)
    rgb = Image.fromarray(_noise(256))
    out["png-256"] = (_encode(rgb, "PNG"), None)
    out["webp-256"] = (_encode(rgb, "WEBP", quality=90), None)
    out["png16-grey-256"] = (
        _encode(Image.fromarray(_noise(256, 1).astype(np.uint16) * 257), "PNG"),
        None,
    )
    rgba = Image.fromarray(_noise(256, 4), "RGBA")
    out["png-rgba-256"] = (_encode(rgba, "PNG"), None)
    out["bomb-png-144mpx"] = (_png_bomb(), None)
    return out


def time_case(
    decode, data: bytes, draft: int | None, images: int, rounds: int
) -> tuple[float, float]:
    """(best CPU microseconds per image, median wall microseconds per image)."""
    kwargs = {"draft_size": draft} if draft else {}
    cpu, wall = [], []
    for _ in range(rounds):
        c, w = time.process_time(), time.perf_counter()
        for _ in range(images):
            try:
                decode(data, **kwargs)
            except ValueError:  # a bomb's refusal is what is timed
                pass
        cpu.append((time.process_time() - c) / images * 1e6)
        wall.append((time.perf_counter() - w) / images * 1e6)
    return min(cpu), statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decoder", default="clip_model.images:decode_image")
    p.add_argument("--images", type=int, default=200, help="decodes per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cases", nargs="*", help="a subset of the case names")
    args = p.parse_args(argv)
    module, _, name = args.decoder.partition(":")
    decode = getattr(importlib.import_module(module), name)
    cv2.setNumThreads(1)
    table = cases()
    unknown = sorted(set(args.cases or []) - set(table))
    if unknown:
        p.error(f"unknown case(s) {unknown}; the cases are {sorted(table)}")
    print(f"decoder {args.decoder}: best of {args.rounds} rounds x {args.images} images")
    print(
        f"{'case':<20} {'bytes':>8} {'us/image (cpu)':>15} {'images/s/core':>14} {'us (wall)':>10}"
    )
    for case, (data, draft) in table.items():
        if args.cases and case not in args.cases:
            continue
        images = max(1, args.images // 20) if case.startswith("bomb") else args.images
        cpu, wall = time_case(decode, data, draft, images, args.rounds)
        print(f"{case:<20} {len(data):>8} {cpu:>15.1f} {1e6 / cpu:>14.0f} {wall:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
