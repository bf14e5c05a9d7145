"""The defects of a real crawl, planted in the sample web, and what img2dataset does with each.

`DEFECT_COUNTS`: rows per defect label; `OUTCOMES`: img2dataset 1.47's status and error message
for each label, observed with opencv 4.14 and `CRAWL_SETTINGS`. `caption_defects` spoils good rows
(empty, one-word and foreign captions; duplicate URLs and images); `broken_endpoints` adds the rows
whose URL fails (404, 500, slow, HTML, truncated, tiny, 20:1 banners, `X-Robots-Tag: noai`).
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from tasks.sample_web.captions import (
    foreign_digit_caption,
    foreign_scene_caption,
    scene_captions,
)
from tasks.sample_web.digits import DIGIT_WORDS
from tasks.sample_web.files import jpeg_bytes
from tasks.sample_web.scenes import (
    COLOURS,
    SHAPES,
    Scene,
    render_scene,
    sample_scene,
    scene_labels,
)
from tasks.sample_web.seeds import item_rng
from tasks.sample_web.url_list import url_row

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
    # clip_model.images reads the header and names what it accepts
    "html": (
        "failed_to_resize",
        "image does not decode (not an image format we read); expected a JPEG, PNG, WebP, GIF,"
        " BMP, TIFF or AVIF image",
    ),
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

# Good images a URL list needs to carry the caption and duplicate defects.
CAPTION_DEFECTS = ("empty_caption", "one_word_caption", "non_english_caption", "duplicate_url")
GOOD_IMAGES_NEEDED = (
    sum(DEFECT_COUNTS[k] for k in CAPTION_DEFECTS) + DEFECT_COUNTS["duplicate_image"]
)


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


def truncate_jpeg(jpeg: bytes) -> bytes:
    # Cut halfway through the entropy-coded scan (after the SOS header): a download that stopped.
    start = jpeg.index(b"\xff\xda")
    return jpeg[: start + (len(jpeg) - start) // 2]


def html_page(title: str, img_path: str, alt: str) -> bytes:
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{title}</title></head>\n<body><h1>{title}</h1>\n"
        f'<p><img src="{img_path}" alt="{alt}"></p>\n<p>More photos soon.</p></body></html>\n'
    ).encode()


def caption_defects(rows: list[dict], seed: int, www: Path) -> list[dict]:
    """Spoil the captions of some good `rows` in place; return the duplicate rows to add.

    A duplicate image is a copy of a good row's file in `www` under a new URL.
    """
    rng = item_rng(seed, "defects")
    picks = rng.sample(range(len(rows)), GOOD_IMAGES_NEEDED)
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
    return extra


def broken_endpoints(seed: int, put: Callable[[str, bytes], bytes]) -> list[dict]:
    """Rows whose URL fails; `put(path, data)` serves `data` at `path`. Their images are drawn
    from their own streams, never crawled whole."""
    extra: list[dict] = []

    def defect_scene(label: str, k: int) -> tuple[Scene, str]:
        r = item_rng(seed, label, k)
        scene = sample_scene(r)
        return scene, r.choice(scene_captions(scene))

    for k in range(DEFECT_COUNTS["http_404"]):
        scene, caption = defect_scene("http_404", k)
        path = f"/img/gone-{k:04d}.jpg"
        extra.append(url_row(path, caption, "http_404", "none", None, **scene_labels(scene)))
    for k in range(DEFECT_COUNTS["http_500"]):
        scene, caption = defect_scene("http_500", k)
        path = f"/status/500/scene-{k:04d}.jpg"
        extra.append(url_row(path, caption, "http_500", "none", None, **scene_labels(scene)))
    for label, route in (("slow", "slow"), ("noai", "noai")):
        for k in range(DEFECT_COUNTS[label]):
            scene, caption = defect_scene(label, k)
            path = f"/{route}/scene-{k:04d}.jpg"
            data = put(path, jpeg_bytes(render_scene(scene)))
            extra.append(url_row(path, caption, label, "scene", data, **scene_labels(scene)))
    for k in range(DEFECT_COUNTS["html"]):
        scene, caption = defect_scene("html", k)
        path = f"/html/photo-{k:04d}.jpg"
        data = put(path, html_page(f"Photo {k}", f"/img/scene-{k:05d}.jpg", caption))
        extra.append(url_row(path, caption, "html", "html", data, **scene_labels(scene)))
    for k in range(DEFECT_COUNTS["truncated_jpeg"]):
        scene, caption = defect_scene("truncated_jpeg", k)
        path = f"/img/truncated-{k:04d}.jpg"
        data = put(path, truncate_jpeg(jpeg_bytes(render_scene(scene))))
        extra.append(url_row(path, caption, "truncated_jpeg", "scene", data, **scene_labels(scene)))
    for k in range(DEFECT_COUNTS["too_small"]):
        scene, caption = defect_scene("too_small", k)
        path = f"/img/tiny-{k:04d}.jpg"
        data = put(path, jpeg_bytes(render_scene(scene, size=16)))
        extra.append(url_row(path, caption, "too_small", "tiny", data, **scene_labels(scene)))
    for k in range(DEFECT_COUNTS["extreme_aspect"]):
        r = item_rng(seed, "extreme_aspect", k)
        colour, shape = r.choice(list(COLOURS)), r.choice(SHAPES)
        tile = render_scene(sample_scene(r, colour=colour, shape=shape, count=1), 64)
        banner = Image.new("RGB", (1280, 64))  # 20:1, each 64 px tile a copy of one scene
        for t in range(20):
            banner.paste(tile, (64 * t, 0))
        path = f"/img/banner-{k:04d}.jpg"
        data = put(path, jpeg_bytes(banner))
        caption = f"a long banner of {colour} {shape}s"
        extra.append(
            url_row(path, caption, "extreme_aspect", "banner", data, colour=colour, shape=shape)
        )
    return extra
