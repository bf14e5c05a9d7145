"""Procedural scenes: groups of coloured shapes on a gradient, drawn from a seeded stream.

A scene is one colour, one shape, one size, one position word and a count; `sample_scene` draws
its parameters and exact placement, `render_scene` draws it (at 2x, downsampled for smooth edges).
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SCENE_SIZE = 128  # px, square JPEGs

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 25),
    "green": (35, 155, 55),
    "blue": (30, 75, 215),
    "purple": (130, 45, 170),
    "brown": (115, 70, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")


@dataclass(frozen=True)
class Scene:
    """One group of identical shapes (same colour, shape and size) in one region of the canvas."""

    colour: str
    shape: str
    size: str
    position: str
    count: int
    rgb: tuple[int, int, int]  # the exact fill, a jittered version of COLOURS[colour]
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # top and bottom of a gradient
    objects: tuple[tuple[float, float, float, float], ...]  # (cx, cy, radius, rotation) in 0..1


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _background(rng: random.Random, fill: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
    """A desaturated two-tone gradient that contrasts with the fill, so colour stays the object's."""
    while True:
        hue = rng.random()
        sat = rng.uniform(0.0, 0.25)
        top = _hsv(hue, sat, rng.uniform(0.25, 0.97))
        bottom = _hsv(hue, sat, min(1.0, max(0.2, _hsv_v(top) + rng.uniform(-0.12, 0.12))))
        if min(abs(_luma(top) - _luma(fill)), abs(_luma(bottom) - _luma(fill))) > 55:
            return top, bottom


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(255 * x) for x in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _hsv_v(rgb: tuple[int, int, int]) -> float:
    return max(rgb) / 255


def jitter_colour(rng: random.Random, rgb: tuple[int, int, int], amount: int = 12):
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


# Centre boxes (x0, x1, y0, y1) in 0..1 for each position word.
_REGIONS = {
    "left": (0.12, 0.34, 0.15, 0.85),
    "right": (0.66, 0.88, 0.15, 0.85),
    "top": (0.15, 0.85, 0.12, 0.34),
    "bottom": (0.15, 0.85, 0.66, 0.88),
    "center": (0.34, 0.66, 0.34, 0.66),
}


def sample_scene(
    rng: random.Random,
    *,
    colour: str | None = None,
    shape: str | None = None,
    count: int | None = None,
) -> Scene:
    """Draw a scene's parameters: colour, shape, size, position, count and exact placement."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    size = rng.choice(SIZES)
    count = count or rng.randint(1, 4 if size == "small" else 2)
    position = rng.choice(POSITIONS)
    rgb = jitter_colour(rng, COLOURS[colour])
    x0, x1, y0, y1 = _REGIONS[position]
    objects: list[tuple[float, float, float, float]] = []
    for _ in range(count):
        # Radii as a share of the side. The crawl keeps 64 px and a modified ResNet's stem pools
        # 4x before its first stage: small shapes 8-12 px across (radius 0.06-0.09) reached that
        # stage as blobs and `tiny` read shapes at acc1 0.49-0.63; at 11-15 px, 0.89 (issue 15).
        radius = rng.uniform(0.085, 0.115) if size == "small" else rng.uniform(0.16, 0.21)
        for _attempt in range(40):  # rejection sampling; accept an overlap after 40 tries
            cx = min(max(rng.uniform(x0, x1), radius), 1 - radius)
            cy = min(max(rng.uniform(y0, y1), radius), 1 - radius)
            if all(math.dist((cx, cy), o[:2]) > 1.9 * max(radius, o[2]) for o in objects):
                break
        objects.append((cx, cy, radius, rng.uniform(-12, 12)))
    return Scene(colour, shape, size, position, count, rgb, _background(rng, rgb), tuple(objects))


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple]:
    if shape == "square":
        points = [(math.radians(45 + 90 * k), r) for k in range(4)]
    elif shape == "triangle":
        points = [(math.radians(-90 + 120 * k), r) for k in range(3)]
    else:  # star: five points, inner radius 0.45 r
        points = [(math.radians(-90 + 36 * k), r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    rot = math.radians(rotation)
    return [(cx + d * math.cos(a + rot), cy + d * math.sin(a + rot)) for a, d in points]


def _gradient(width: int, height: int, top, bottom) -> Image.Image:
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    rows = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return Image.fromarray(np.broadcast_to(rows, (height, width, 3)).round().astype(np.uint8))


def render_scene(scene: Scene, size: int = SCENE_SIZE) -> Image.Image:
    """Render a scene to an RGB image, drawn at 2x and downsampled for smooth edges."""
    big = 2 * size
    image = _gradient(big, big, *scene.background)
    draw = ImageDraw.Draw(image)
    for cx, cy, r, rotation in scene.objects:
        cx, cy, r = cx * big, cy * big, r * big
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=scene.rgb)
        else:
            # squares and triangles fill less of their circle; scale so sizes look alike
            scale = {"square": 0.9, "triangle": 1.1, "star": 1.15}[scene.shape]
            draw.polygon(_polygon(scene.shape, cx, cy, r * scale, rotation), fill=scene.rgb)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def scene_labels(scene: Scene) -> dict:
    """The scene's parameters that the URL list keeps as columns."""
    return dict(
        colour=scene.colour,
        shape=scene.shape,
        size=scene.size,
        position=scene.position,
        count=scene.count,
    )
