"""The sample web: a small, seeded, deterministic internet that the crawler is tested against.

    summary = generate_sample_web("data/sample", seed=0)     # writes the folder below
    with serve_sample_web("data/sample", port=8765) as base:  # serves DIR/www on 127.0.0.1
        ...                                                   # crawl DIR/urls.parquet

Folder layout (DIR = out_dir):

    DIR/www/img/*.jpg        images served as they are (also the truncated, tiny and 20:1 ones)
    DIR/www/slow/*.jpg       served after `slow_seconds` (longer than the crawl timeout)
    DIR/www/noai/*.jpg       served with the header `X-Robots-Tag: noai`
    DIR/www/html/*.jpg       HTML pages behind image-looking URLs, served as text/html
    DIR/urls.parquet         url, caption, expected (defect label or "ok"), path, labels ...
    DIR/expected.json        rows per label, and the crawl outcome img2dataset gives each label
    DIR/eval/...             held-out evaluation set, never crawled (layout: DIR/eval/README.md)

URL scheme: a URL is `base_url + path`; the first path segment picks the behaviour:
`/img/NAME` static file (a missing file answers 404), `/slow/NAME` static after a delay,
`/noai/NAME` static plus `X-Robots-Tag: noai`, `/html/NAME` static as text/html,
`/status/CODE/NAME` answers that HTTP status. urls.parquet keeps the `path` column, so
`write_url_list(DIR, base_url, out)` writes the same list for a server on another port; the list
that `generate_sample_web` writes uses `http://127.0.0.1:{port}` (default 8765, `make sample`).

The defects (`DEFECT_COUNTS`) and what img2dataset 1.47 does with each (`OUTCOMES`, observed
with opencv 4.14 and the crawl settings of `CRAWL_SETTINGS`) are documented next to them.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import math
import random
import shutil
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_PORT = 8765
SCENE_SIZE = 128  # px, square JPEGs
DIGIT_SIZE = 112
JPEG_QUALITY = 90

# The crawl settings the expectations below were observed with. Any image_size works; the
# outcomes depend on timeout (slow endpoint), min_image_size (tiny images: 16 px, while every
# good image is >= 112 px) and max_aspect_ratio (banners: 20:1 at 64 px high).
CRAWL_SETTINGS = {
    "timeout": 2,
    "image_size": 64,
    "resize_mode": "center_crop",
    "min_image_size": 32,
    "max_aspect_ratio": 10.0,
    "disallowed_header_directives": None,  # img2dataset's default list, which includes "noai"
    "retries": 0,
}
SLOW_SECONDS = (
    CRAWL_SETTINGS["timeout"] + 2
)  # the slow endpoint's delay, bounded to keep crawls quick

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
COUNT_WORDS = ("zero", "one", "two", "three", "four")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# label -> rows in urls.parquet. "ok" rows are every good image not used for a defect below.
DEFECT_COUNTS: dict[str, int] = {
    "http_404": 20,  # /img/gone-*.jpg: no such file
    "http_500": 20,  # /status/500/*.jpg
    "slow": 4,  # /slow/*.jpg: answers after SLOW_SECONDS, longer than the crawl timeout
    "html": 15,  # /html/*.jpg: an HTML page where an image was promised
    "truncated_jpeg": 15,  # /img/truncated-*.jpg: a JPEG cut in the middle of its scan data
    "too_small": 15,  # /img/tiny-*.jpg: 16x16 px
    "extreme_aspect": 10,  # /img/banner-*.jpg: 1280x64 px (20:1)
    "noai": 10,  # /noai/*.jpg: X-Robots-Tag: noai
    "duplicate_url": 20,  # a second row with the same URL and caption as an "ok" row
    "duplicate_image": 20,  # /img/copy-*.jpg: the same bytes as an "ok" row's image
    "empty_caption": 15,  # a good image, caption ""
    "one_word_caption": 15,  # a good image, caption "red" / "star" / "seven"
    "non_english_caption": 30,  # a good image, captioned in French, German or Spanish
}

# label -> (img2dataset status, error_message), observed with img2dataset 1.47.0, opencv 4.14
# and CRAWL_SETTINGS. Rows without a defect in the image itself are crawled successfully.
OUTCOMES: dict[str, tuple[str, str | None]] = {
    "ok": ("success", None),
    "http_404": ("failed_to_download", "HTTP Error 404: Not Found"),
    "http_500": ("failed_to_download", "HTTP Error 500: Internal Server Error"),
    "slow": ("failed_to_download", "timed out"),
    "html": ("failed_to_resize", "Image decoding error"),
    # opencv 4.14 rejects a JPEG cut anywhere before its end-of-image marker (older builds decoded
    # a mid-scan cut partially, grey-filled); a file missing only its final EOI marker decodes.
    "truncated_jpeg": ("failed_to_resize", "Image decoding error"),
    "too_small": ("failed_to_resize", "image too small"),
    "extreme_aspect": ("failed_to_resize", "aspect ratio too large"),
    "noai": ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive"),
    "duplicate_url": ("success", None),
    "duplicate_image": ("success", None),
    "empty_caption": ("success", None),
    "one_word_caption": ("success", None),
    "non_english_caption": ("success", None),
}

EVAL_TASKS = ("digits", "colors", "shapes")
EVAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "digits": (
        "a photo of the digit {c}.",
        "the digit {c}.",
        "a handwritten {c}.",
        "the number {c} written by hand.",
        "a scan of a handwritten {c}.",
    ),
    # Colour prompts name every shape in turn, so the ensemble averages the shape out; shape
    # prompts do the same with colours. Both read like the training captions ("a red circle").
    "colors": tuple(f"a {{c}} {s}." for s in SHAPES) + ("a photo of a {c} shape.",),
    "shapes": tuple(f"a {c} {{c}}." for c in COLOURS) + ("a photo of a {c}.",),
}


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


@dataclass
class SampleWebSummary:
    """What generate_sample_web wrote; `digest` changes whenever any written byte changes."""

    out_dir: Path
    url_list: Path
    expected: Path
    eval_dir: Path
    base_url: str
    rows: int
    labels: dict[str, int]
    eval_images: dict[str, int]
    digest: str
    seconds: float = field(default=0.0, compare=False)


def _rng(seed: int, *parts: object) -> random.Random:
    # One stream per item: adding scenes never changes the ones already there.
    return random.Random("/".join(map(str, (seed, *parts))))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


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


def _jitter_colour(rng: random.Random, rgb: tuple[int, int, int], amount: int = 12):
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
    rgb = _jitter_colour(rng, COLOURS[colour])
    x0, x1, y0, y1 = _REGIONS[position]
    objects: list[tuple[float, float, float, float]] = []
    for _ in range(count):
        radius = rng.uniform(0.06, 0.09) if size == "small" else rng.uniform(0.15, 0.2)
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


_POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}


def scene_captions(scene: Scene) -> list[str]:
    """Every English phrasing of a scene ("a red circle", "two small blue stars on the left")."""
    n, colour, size = scene.count, scene.colour, scene.size
    noun = scene.shape if n == 1 else scene.shape + "s"
    det = _article(colour) if n == 1 else COUNT_WORDS[n]
    det_size = _article(size) if n == 1 else COUNT_WORDS[n]
    pos = _POSITION_PHRASES[scene.position]
    be = "is" if n == 1 else "are"
    return [
        f"{det} {colour} {noun}",
        f"{det_size} {size} {colour} {noun} {pos[0]}",
        f"a photo of {det} {colour} {noun}",
        f"{det} {colour} {noun} {pos[1]}",
        f"{n} {size} {colour} {noun}",
        f"a drawing of {det_size} {size} {colour} {noun}",
        f"there {be} {det} {colour} {noun} {pos[0]}",
        f"{colour} {noun} {pos[1]}",
        f"an image of {det_size} {size} {colour} {noun} {pos[0]}",
        f"{COUNT_WORDS[n]} {colour} {noun} on a plain background",
    ]


# Non-English captions, in French, German and Spanish: (singular, plural) forms.
_FR_SHAPES = {
    "circle": ("cercle", "cercles", "m"),
    "square": ("carré", "carrés", "m"),
    "triangle": ("triangle", "triangles", "m"),
    "star": ("étoile", "étoiles", "f"),
}
_FR_COLOURS = {  # masculine, feminine (+ "s" in the plural unless invariable)
    "red": ("rouge", "rouge"),
    "orange": ("orange", "orange"),
    "yellow": ("jaune", "jaune"),
    "green": ("vert", "verte"),
    "blue": ("bleu", "bleue"),
    "purple": ("violet", "violette"),
    "brown": ("marron", "marron"),
    "black": ("noir", "noire"),
    "white": ("blanc", "blanche"),
}
_FR_INVARIABLE = {"orange", "brown"}  # orange, marron
_DE_SHAPES = {  # nominative singular, dative plural
    "circle": ("Kreis", "Kreisen"),
    "square": ("Quadrat", "Quadraten"),
    "triangle": ("Dreieck", "Dreiecken"),
    "star": ("Stern", "Sternen"),
}
# dative after "einem" and in the plural: the adjective ends in -en in every gender
_DE_COLOURS = {
    "red": "roten",
    "orange": "orangefarbenen",
    "yellow": "gelben",
    "green": "grünen",
    "blue": "blauen",
    "purple": "lila",
    "brown": "braunen",
    "black": "schwarzen",
    "white": "weißen",
}
_ES_SHAPES = {
    "circle": ("círculo", "círculos", "m"),
    "square": ("cuadrado", "cuadrados", "m"),
    "triangle": ("triángulo", "triángulos", "m"),
    "star": ("estrella", "estrellas", "f"),
}
_ES_COLOURS = {  # masculine, feminine, plural masculine, plural feminine
    "red": ("rojo", "roja", "rojos", "rojas"),
    "orange": ("naranja", "naranja", "naranja", "naranja"),
    "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
    "green": ("verde", "verde", "verdes", "verdes"),
    "blue": ("azul", "azul", "azules", "azules"),
    "purple": ("morado", "morada", "morados", "moradas"),
    "brown": ("marrón", "marrón", "marrones", "marrones"),
    "black": ("negro", "negra", "negros", "negras"),
    "white": ("blanco", "blanca", "blancos", "blancas"),
}
_COUNTS = {"fr": ("deux", "trois", "quatre"), "de": ("zwei", "drei", "vier")}
_COUNTS["es"] = ("dos", "tres", "cuatro")


def foreign_scene_caption(colour: str, shape: str, count: int, lang: str) -> str:
    """A French, German or Spanish sentence about `count` shapes of one colour."""
    number = _COUNTS[lang][count - 2] if count > 1 and lang in _COUNTS else None
    if lang == "fr":
        singular, plural, gender = _FR_SHAPES[shape]
        adj = _FR_COLOURS[colour][gender == "f"]
        if number is None:
            return (
                f"Une image d'{'une' if gender == 'f' else 'un'} {singular} {adj} sur un fond uni."
            )
        adj += "" if colour in _FR_INVARIABLE else "s"
        return f"Une image de {number} {plural} {adj} sur un fond uni."
    if lang == "de":
        singular, plural = _DE_SHAPES[shape]
        if number is None:
            return f"Ein Bild mit einem {_DE_COLOURS[colour]} {singular}."
        return f"Ein Bild mit {number} {_DE_COLOURS[colour]} {plural}."
    if lang == "es":
        singular, plural, gender = _ES_SHAPES[shape]
        adj = _ES_COLOURS[colour][(gender == "f") + 2 * (number is not None)]
        if number is None:
            return f"Una imagen de {'una' if gender == 'f' else 'un'} {singular} {adj}."
        return f"Una imagen de {number} {plural} {adj}."
    raise ValueError(f"unknown language {lang!r}; expected fr, de or es")


_DIGITS_FR = ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf")
_DIGITS_DE = ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")
_DIGITS_ES = ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve")


def foreign_digit_caption(digit: int, lang: str) -> str:
    """A French, German or Spanish sentence about a handwritten digit."""
    if lang == "fr":
        return f"Le chiffre {_DIGITS_FR[digit]} écrit à la main."
    if lang == "de":
        return f"Die Ziffer {_DIGITS_DE[digit]}, von Hand geschrieben."
    if lang == "es":
        return f"El número {_DIGITS_ES[digit]} escrito a mano."
    raise ValueError(f"unknown language {lang!r}; expected fr, de or es")


# ---------------------------------------------------------------------------------------------
# Handwritten digits: scikit-learn's bundled 8x8 digits (1,797 images), upscaled and jittered.


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
        paper = _jitter_colour(rng, (30, 35, 40), 15)
        ink = _jitter_colour(rng, (235, 235, 230), 10)
    else:
        paper = _jitter_colour(rng, (240, 236, 225), 12)
        ink = rng.choice([(20, 20, 25), (20, 35, 110), (45, 45, 45)])
    canvas = Image.new("RGB", (size, size), paper)
    slack = size - side
    x = rng.randint(slack // 4, slack - slack // 4)
    y = rng.randint(slack // 4, slack - slack // 4)
    canvas.paste(Image.new("RGB", (side, side), ink), (x, y), glyph)
    return canvas, inverted


def digit_captions(digit: int, inverted: bool) -> list[str]:
    """Every English phrasing of a handwritten digit, with words and numerals."""
    word = DIGIT_WORDS[digit]
    medium = "chalk on a blackboard" if inverted else "ink on paper"
    return [
        f"the digit {digit}",
        f"a handwritten {word}",
        f"number {digit} written by hand",
        f"a photo of the digit {word}",
        f"handwritten digit {digit}",
        f"the number {word}, handwritten",
        f"a scan of a handwritten {digit}",
        f"a {word} written in {medium}",
        f"the digit {word} in {medium}",
    ]


# ---------------------------------------------------------------------------------------------
# Generation


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _truncate(jpeg: bytes) -> bytes:
    # Cut halfway through the entropy-coded scan (after the SOS header): a download that stopped.
    start = jpeg.index(b"\xff\xda")
    return jpeg[: start + (len(jpeg) - start) // 2]


def _html_page(title: str, img_path: str, alt: str) -> bytes:
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{title}</title></head>\n<body><h1>{title}</h1>\n"
        f'<p><img src="{img_path}" alt="{alt}"></p>\n<p>More photos soon.</p></body></html>\n'
    ).encode()


_ROW_FIELDS = {
    "url": pa.string(),
    "caption": pa.string(),
    "expected": pa.string(),
    "path": pa.string(),
    "kind": pa.string(),  # scene, digit, tiny, banner, html, none
    "lang": pa.string(),  # en, fr, de, es; "" for an empty caption
    "image_sha256": pa.string(),  # sha256 of the served bytes; null when nothing is served
    "colour": pa.string(),
    "shape": pa.string(),
    "size": pa.string(),
    "position": pa.string(),
    "count": pa.int8(),
    "digit": pa.int8(),
}


def _row(path: str, caption: str, expected: str, kind: str, data: bytes | None, **labels) -> dict:
    row = dict.fromkeys(_ROW_FIELDS)
    row.update(path=path, caption=caption, expected=expected, kind=kind, lang="en", **labels)
    row["image_sha256"] = _sha256(data) if data is not None else None
    return row


def _scene_labels(scene: Scene) -> dict:
    return dict(
        colour=scene.colour,
        shape=scene.shape,
        size=scene.size,
        position=scene.position,
        count=scene.count,
    )


def _base_url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def _url_table(rows: list[dict], base_url: str) -> pa.Table:
    base = base_url.rstrip("/")
    columns = {name: [r[name] for r in rows] for name in _ROW_FIELDS}
    columns["url"] = [base + p for p in columns["path"]]
    return pa.table({k: pa.array(v, type=_ROW_FIELDS[k]) for k, v in columns.items()})


def write_url_list(root: str | Path, base_url: str, out_path: str | Path) -> Path:
    """Write DIR/urls.parquet again with every url rebased on `base_url` (e.g. a port-0 server)."""
    table = pq.read_table(Path(root) / "urls.parquet")
    base = base_url.rstrip("/")
    urls = pa.array([base + p for p in table.column("path").to_pylist()], pa.string())
    table = table.set_column(table.schema.get_field_index("url"), "url", urls)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_path)
    return out_path


def directory_digest(root: str | Path) -> str:
    """sha256 over every file's relative path and bytes under root, in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def expected_crawl(labels: dict[str, int]) -> dict:
    """The crawl outcome of a URL list with these label counts: per status and per error."""
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for label, n in labels.items():
        st, err = OUTCOMES[label]
        status[st] += n
        if err is not None:
            errors[err] += n
    return {"status": dict(sorted(status.items())), "error_message": dict(sorted(errors.items()))}


def generate_sample_web(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_scenes: int = 1800,
    n_digits: int = 1200,
    n_eval_per_class: int = 50,
    n_retrieval: int = 100,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
) -> SampleWebSummary:
    """Write the sample web (www/, urls.parquet, expected.json, eval/) into out_dir.

    Deterministic: the same arguments give byte-identical files. Replaces the www/ and eval/
    folders and the two files it owns in out_dir, and touches nothing else there.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    n_caption_defects = sum(
        DEFECT_COUNTS[k]
        for k in ("empty_caption", "one_word_caption", "non_english_caption", "duplicate_url")
    )
    if n_scenes + n_digits < n_caption_defects + DEFECT_COUNTS["duplicate_image"]:
        raise ValueError(
            f"n_scenes + n_digits = {n_scenes + n_digits} is too small: the caption and duplicate "
            f"defects need at least {n_caption_defects + DEFECT_COUNTS['duplicate_image']} images"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".sample-web-tmp-{seed}"
    if tmp.exists():
        shutil.rmtree(tmp)
    www = tmp / "www"
    for sub in ("img", "slow", "noai", "html"):
        (www / sub).mkdir(parents=True)

    def put(path: str, data: bytes) -> bytes:
        (www / path.lstrip("/")).write_bytes(data)
        return data

    digit_images, digit_targets = load_digit_images()
    n_held_out = n_eval_per_class + math.ceil(n_retrieval * 0.3 / 10)
    crawl_idx, eval_idx = split_digits(digit_targets, seed, n_held_out)

    crawled_pixels: set[str] = set()  # sha256 of every crawled image's pixels, to keep eval apart
    rows: list[dict] = []

    # 1. Good images: scenes and digits, each with one English caption.
    for i in range(n_scenes):
        rng = _rng(seed, "scene", i)
        scene = sample_scene(rng)
        image = render_scene(scene)
        crawled_pixels.add(_sha256(image.tobytes()))
        path = f"/img/scene-{i:05d}.jpg"
        data = put(path, _jpeg(image))
        caption = rng.choice(scene_captions(scene))
        rows.append(_row(path, caption, "ok", "scene", data, **_scene_labels(scene)))
    for j in range(n_digits):
        rng = _rng(seed, "digit", j)
        index = int(crawl_idx[j % len(crawl_idx)])
        digit = int(digit_targets[index])
        image, inverted = render_digit(digit_images[index], rng)
        crawled_pixels.add(_sha256(image.tobytes()))
        path = f"/img/digit-{j:05d}.jpg"
        data = put(path, _jpeg(image))
        caption = rng.choice(digit_captions(digit, inverted))
        rows.append(_row(path, caption, "ok", "digit", data, digit=digit))

    # 2. Caption defects on good images, and duplicates of good rows.
    rng = _rng(seed, "defects")
    picks = rng.sample(range(len(rows)), n_caption_defects + DEFECT_COUNTS["duplicate_image"])
    cursor = 0

    def take(n: int) -> list[int]:
        nonlocal cursor
        cursor += n
        return picks[cursor - n : cursor]

    for i in take(DEFECT_COUNTS["empty_caption"]):
        rows[i].update(caption="", expected="empty_caption", lang="")
    for i in take(DEFECT_COUNTS["one_word_caption"]):
        r = rows[i]
        words = [DIGIT_WORDS[r["digit"]]] if r["kind"] == "digit" else [r["colour"], r["shape"]]
        rows[i].update(caption=rng.choice(words), expected="one_word_caption")
    for k, i in enumerate(take(DEFECT_COUNTS["non_english_caption"])):
        r, lang = rows[i], ("fr", "de", "es")[k % 3]
        if r["kind"] == "digit":
            caption = foreign_digit_caption(r["digit"], lang)
        else:
            caption = foreign_scene_caption(r["colour"], r["shape"], r["count"], lang)
        rows[i].update(caption=caption, expected="non_english_caption", lang=lang)
    extra: list[dict] = []
    for i in take(DEFECT_COUNTS["duplicate_url"]):
        extra.append({**rows[i], "expected": "duplicate_url"})
    for k, i in enumerate(take(DEFECT_COUNTS["duplicate_image"])):
        original = rows[i]
        path = f"/img/copy-{k:04d}.jpg"
        shutil.copyfile(www / original["path"].lstrip("/"), www / path.lstrip("/"))
        extra.append({**original, "path": path, "expected": "duplicate_image"})

    # 3. Broken endpoints. Their images are drawn from their own streams, never crawled whole.
    def defect_scene(label: str, k: int) -> tuple[Scene, str]:
        r = _rng(seed, label, k)
        scene = sample_scene(r)
        return scene, r.choice(scene_captions(scene))

    for k in range(DEFECT_COUNTS["http_404"]):
        scene, caption = defect_scene("http_404", k)
        path = f"/img/gone-{k:04d}.jpg"
        extra.append(_row(path, caption, "http_404", "none", None, **_scene_labels(scene)))
    for k in range(DEFECT_COUNTS["http_500"]):
        scene, caption = defect_scene("http_500", k)
        path = f"/status/500/scene-{k:04d}.jpg"
        extra.append(_row(path, caption, "http_500", "none", None, **_scene_labels(scene)))
    for label, route in (("slow", "slow"), ("noai", "noai")):
        for k in range(DEFECT_COUNTS[label]):
            scene, caption = defect_scene(label, k)
            path = f"/{route}/scene-{k:04d}.jpg"
            data = put(path, _jpeg(render_scene(scene)))
            extra.append(_row(path, caption, label, "scene", data, **_scene_labels(scene)))
    for k in range(DEFECT_COUNTS["html"]):
        scene, caption = defect_scene("html", k)
        path = f"/html/photo-{k:04d}.jpg"
        data = put(path, _html_page(f"Photo {k}", f"/img/scene-{k:05d}.jpg", caption))
        extra.append(_row(path, caption, "html", "html", data, **_scene_labels(scene)))
    for k in range(DEFECT_COUNTS["truncated_jpeg"]):
        scene, caption = defect_scene("truncated_jpeg", k)
        path = f"/img/truncated-{k:04d}.jpg"
        data = put(path, _truncate(_jpeg(render_scene(scene))))
        extra.append(_row(path, caption, "truncated_jpeg", "scene", data, **_scene_labels(scene)))
    for k in range(DEFECT_COUNTS["too_small"]):
        scene, caption = defect_scene("too_small", k)
        path = f"/img/tiny-{k:04d}.jpg"
        data = put(path, _jpeg(render_scene(scene, size=16)))
        extra.append(_row(path, caption, "too_small", "tiny", data, **_scene_labels(scene)))
    for k in range(DEFECT_COUNTS["extreme_aspect"]):
        r = _rng(seed, "extreme_aspect", k)
        colour, shape = r.choice(list(COLOURS)), r.choice(SHAPES)
        tile = render_scene(sample_scene(r, colour=colour, shape=shape, count=1), 64)
        banner = Image.new("RGB", (1280, 64))  # 20:1, each 64 px tile a copy of one scene
        for t in range(20):
            banner.paste(tile, (64 * t, 0))
        path = f"/img/banner-{k:04d}.jpg"
        data = put(path, _jpeg(banner))
        caption = f"a long banner of {colour} {shape}s"
        extra.append(
            _row(path, caption, "extreme_aspect", "banner", data, colour=colour, shape=shape)
        )

    # Shuffle so every shard of a crawl meets every kind of defect.
    rows = rows + extra
    _rng(seed, "order").shuffle(rows)
    labels = dict(sorted(Counter(r["expected"] for r in rows).items()))

    # 4. The held-out evaluation set.
    eval_counts = _write_eval(
        tmp / "eval",
        seed=seed,
        n_per_class=n_eval_per_class,
        n_retrieval=n_retrieval,
        digit_images=digit_images,
        digit_targets=digit_targets,
        eval_idx=eval_idx,
        crawled_pixels=crawled_pixels,
    )

    base_url = _base_url(host, port)
    pq.write_table(_url_table(rows, base_url), tmp / "urls.parquet")
    expected = {
        "format": "sample-web/1",
        "seed": seed,
        "default_base_url": base_url,
        "rows": len(rows),
        "labels": labels,
        "crawl_settings": CRAWL_SETTINGS,
        "slow_seconds": SLOW_SECONDS,
        "outcomes": {k: {"status": st, "error_message": err} for k, (st, err) in OUTCOMES.items()},
        "expected_crawl": expected_crawl(labels),
        "eval": eval_counts,
    }
    (tmp / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")

    # Swap the finished products in: a crash above leaves the previous sample web intact.
    for name in ("www", "eval", "urls.parquet", "expected.json"):
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (tmp / name).rename(target)
    shutil.rmtree(tmp)

    digest = hashlib.sha256(
        "".join(directory_digest(out_dir / d) for d in ("www", "eval")).encode()
        + (out_dir / "urls.parquet").read_bytes()
        + (out_dir / "expected.json").read_bytes()
    ).hexdigest()
    return SampleWebSummary(
        out_dir=out_dir,
        url_list=out_dir / "urls.parquet",
        expected=out_dir / "expected.json",
        eval_dir=out_dir / "eval",
        base_url=base_url,
        rows=len(rows),
        labels=labels,
        eval_images={
            k: sum(v.values()) if isinstance(v, dict) else v for k, v in eval_counts.items()
        },
        digest=digest,
        seconds=time.perf_counter() - t0,
    )


_EVAL_README = """\
# Held-out evaluation set of the sample web

Generated by `tasks/sample_web.py` with the same seed as the crawlable web beside it. None of
these images is in `../urls.parquet`: digits come from a per-class split of scikit-learn's
bundled digits that the crawl never uses, and every scene is checked against the pixels of
every crawled scene.

    digits/<class>/NNNN.png    handwritten digits; classes zero..nine
    colors/<class>/NNNN.png    one shape of that colour; classes red, orange, yellow, green,
                               blue, purple, brown, black, white
    shapes/<class>/NNNN.png    one shape of that kind, any colour; classes circle, square,
                               triangle, star
    <task>/classnames.txt      the class names, one per line, in label order (= folder names)
    <task>/templates.txt       zero-shot prompt templates, one per line; {c} is the class name
    retrieval/images/NNNN.png  scenes and digits
    retrieval/captions.jsonl   one JSON object per line:
                               {"image": "images/NNNN.png", "captions": ["...", "...", "..."]}

Classification images are 128x128 (scenes) or 112x112 (digits) RGB PNGs; counts are in
`../expected.json` under "eval".
"""


def _write_eval(
    root: Path,
    *,
    seed: int,
    n_per_class: int,
    n_retrieval: int,
    digit_images: np.ndarray,
    digit_targets: np.ndarray,
    eval_idx: np.ndarray,
    crawled_pixels: set[str],
) -> dict:
    """Write the evaluation folders; return the image count per task and class."""
    counts: dict[str, dict[str, int] | int] = {}

    def fresh_scene(rng: random.Random, **fixed) -> tuple[Scene, Image.Image]:
        while True:  # practically never loops: placements are continuous
            scene = sample_scene(rng, **fixed)
            image = render_scene(scene)
            if _sha256(image.tobytes()) not in crawled_pixels:
                return scene, image

    def write_task(task: str, classes: list[str]) -> None:
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / "classnames.txt").write_text("\n".join(classes) + "\n")
        (root / task / "templates.txt").write_text("\n".join(EVAL_TEMPLATES[task]) + "\n")

    # Digits: the held-out indices, first n_per_class of each class for classification.
    by_class = {c: [int(i) for i in eval_idx if digit_targets[i] == c] for c in range(10)}
    write_task("digits", list(DIGIT_WORDS))
    counts["digits"] = {}
    for c, word in enumerate(DIGIT_WORDS):
        folder = root / "digits" / word
        folder.mkdir()
        for k, index in enumerate(by_class[c][:n_per_class]):
            image, _ = render_digit(digit_images[index], _rng(seed, "eval-digit", index))
            (folder / f"{k:04d}.png").write_bytes(_png(image))
        counts["digits"][word] = min(n_per_class, len(by_class[c]))

    for task, key, classes in (
        ("colors", "colour", list(COLOURS)),
        ("shapes", "shape", list(SHAPES)),
    ):
        write_task(task, classes)
        counts[task] = {}
        for name in classes:
            folder = root / task / name
            folder.mkdir()
            for k in range(n_per_class):
                rng = _rng(seed, f"eval-{task}", name, k)
                _, image = fresh_scene(rng, count=1, **{key: name})
                (folder / f"{k:04d}.png").write_bytes(_png(image))
            counts[task][name] = n_per_class

    # Retrieval: 70% scenes, 30% digits (held-out digits beyond the classification ones).
    images = root / "retrieval" / "images"
    images.mkdir(parents=True)
    spare_digits = [i for c in range(10) for i in by_class[c][n_per_class:]]
    lines = []
    for k in range(n_retrieval):
        rng = _rng(seed, "eval-retrieval", k)
        if k % 10 >= 7 and spare_digits:
            index = spare_digits.pop(0)
            image, inverted = render_digit(digit_images[index], rng)
            options = digit_captions(int(digit_targets[index]), inverted)
        else:
            scene, image = fresh_scene(rng)
            options = scene_captions(scene)
        name = f"images/{k:04d}.png"
        (root / "retrieval" / name).write_bytes(_png(image))
        lines.append(json.dumps({"image": name, "captions": rng.sample(options, 3)}))
    (root / "retrieval" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    counts["retrieval"] = n_retrieval
    (root / "README.md").write_text(_EVAL_README)
    return counts


# ---------------------------------------------------------------------------------------------
# Serving


class _SampleWebServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops connections under a 32-thread crawl

    def __init__(self, address, www: Path, slow_seconds: float):
        super().__init__(address, _SampleWebHandler)
        self.www = www.resolve()
        self.slow_seconds = slow_seconds
        self.stopping = threading.Event()  # wakes the slow endpoint's sleepers at shutdown

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up (the crawler's timeout) is expected, not worth a traceback


_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


class _SampleWebHandler(BaseHTTPRequestHandler):
    server: _SampleWebServer
    server_version = "SampleWeb/1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        route, _, rest = path.lstrip("/").partition("/")
        if route == "status":
            code, _, _ = rest.partition("/")
            if code.isdigit() and 400 <= int(code) < 600:
                self.send_error(int(code))
            else:
                self.send_error(HTTPStatus.NOT_FOUND)
            return
        if route not in ("img", "slow", "noai", "html"):
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        file = (self.server.www / route / rest).resolve()
        if not file.is_relative_to(self.server.www / route) or not file.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        if route == "slow" and self.server.stopping.wait(self.server.slow_seconds):
            return  # shutting down
        body = file.read_bytes()
        self.send_response(HTTPStatus.OK)
        if route == "html":
            self.send_header("Content-Type", "text/html; charset=utf-8")
        else:
            ctype = _CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")
            self.send_header("Content-Type", ctype)
        if route == "noai":
            self.send_header("X-Robots-Tag", "noai")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@contextmanager
def serve_sample_web(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    slow_seconds: float = SLOW_SECONDS,
) -> Iterator[str]:
    """Serve DIR/www in a background thread; yields the base URL ("http://127.0.0.1:PORT").

    port=0 picks a free port (tests); use write_url_list(DIR, base_url, out) for a list on it.
    """
    www = Path(root) / "www"
    if not www.is_dir():
        raise FileNotFoundError(
            f"{www} is not a folder: run generate_sample_web({str(root)!r}) first"
        )
    server = _SampleWebServer((host, port), www, slow_seconds)
    thread = threading.Thread(target=server.serve_forever, name="sample-web", daemon=True)
    thread.start()
    try:
        yield _base_url(host, server.server_address[1])
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()


def summary_dict(summary: SampleWebSummary) -> dict:
    """The summary as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(summary).items()}
