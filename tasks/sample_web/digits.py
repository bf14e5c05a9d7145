"""Handwritten digits: scikit-learn's bundled 8x8 digits (1,797 images), upscaled and jittered."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageFilter

from tasks.sample_web.scenes import jitter_colour

DIGIT_SIZE = 112
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as (images [N,8,8] in 0..16, targets [N]); no download."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def split_digits(
    targets: np.ndarray, seed: int, n_eval_per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded per-class split of digit indices into (crawl, eval); the two never share one."""
    rng = np.random.default_rng([seed, 8])
    crawl, held_out = [], []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        held_out.append(np.sort(idx[:n_eval_per_class]))
        crawl.append(idx[n_eval_per_class:])
    return np.sort(np.concatenate(crawl)), np.concatenate(held_out)


def render_digit(pixels: np.ndarray, rng: random.Random, size: int = DIGIT_SIZE) -> tuple:
    """Upscale one 8x8 digit smoothly onto a paper-like canvas; returns (image, inverted)."""
    glyph = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L")
    side = rng.randint(int(size * 0.55), int(size * 0.8))
    glyph = glyph.resize((side, side), Image.Resampling.BICUBIC)
    glyph = glyph.rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC)
    glyph = glyph.filter(ImageFilter.GaussianBlur(radius=side / 40))
    inverted = rng.random() < 0.25  # chalk on a dark board instead of ink on paper
    if inverted:
        paper = jitter_colour(rng, (30, 35, 40), 15)
        ink = jitter_colour(rng, (235, 235, 230), 10)
    else:
        paper = jitter_colour(rng, (240, 236, 225), 12)
        ink = rng.choice([(20, 20, 25), (20, 35, 110), (45, 45, 45)])
    canvas = Image.new("RGB", (size, size), paper)
    slack = size - side
    x = rng.randint(slack // 4, slack - slack // 4)
    y = rng.randint(slack // 4, slack - slack // 4)
    canvas.paste(Image.new("RGB", (side, side), ink), (x, y), glyph)
    return canvas, inverted
