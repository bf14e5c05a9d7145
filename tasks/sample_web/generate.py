"""generate_sample_web: the good images with their captions, the defects, the held-out set, and
the files that describe them (urls.parquet, expected.json), swapped in whole at the end."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from tasks.sample_web.captions import digit_captions, scene_captions
from tasks.sample_web.defects import (
    CRAWL_SETTINGS,
    GOOD_IMAGES_NEEDED,
    OUTCOMES,
    SLOW_SECONDS,
    broken_endpoints,
    caption_defects,
    expected_crawl,
)
from tasks.sample_web.digits import load_digit_images, render_digit, split_digits
from tasks.sample_web.eval_set import write_eval
from tasks.sample_web.files import directory_digest, jpeg_bytes, sha256_hex
from tasks.sample_web.scenes import render_scene, sample_scene, scene_labels
from tasks.sample_web.seeds import item_rng
from tasks.sample_web.url_list import DEFAULT_PORT, base_url_of, url_row, url_table


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


def summary_dict(summary: SampleWebSummary) -> dict:
    """The summary as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(summary).items()}


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
    if n_scenes + n_digits < GOOD_IMAGES_NEEDED:
        raise ValueError(
            f"n_scenes + n_digits = {n_scenes + n_digits} is too small: the caption and duplicate "
            f"defects need at least {GOOD_IMAGES_NEEDED} images"
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
        rng = item_rng(seed, "scene", i)
        scene = sample_scene(rng)
        image = render_scene(scene)
        crawled_pixels.add(sha256_hex(image.tobytes()))
        path = f"/img/scene-{i:05d}.jpg"
        data = put(path, jpeg_bytes(image))
        caption = rng.choice(scene_captions(scene))
        rows.append(url_row(path, caption, "ok", "scene", data, **scene_labels(scene)))
    for j in range(n_digits):
        rng = item_rng(seed, "digit", j)
        index = int(crawl_idx[j % len(crawl_idx)])
        digit = int(digit_targets[index])
        image, inverted = render_digit(digit_images[index], rng)
        crawled_pixels.add(sha256_hex(image.tobytes()))
        path = f"/img/digit-{j:05d}.jpg"
        data = put(path, jpeg_bytes(image))
        caption = rng.choice(digit_captions(digit, inverted))
        rows.append(url_row(path, caption, "ok", "digit", data, digit=digit))

    # 2. Caption defects on good images, duplicates of good rows, and broken endpoints.
    extra = caption_defects(rows, seed, www)
    extra += broken_endpoints(seed, put)

    # Shuffle so every shard of a crawl meets every kind of defect.
    rows = rows + extra
    item_rng(seed, "order").shuffle(rows)
    labels = dict(sorted(Counter(r["expected"] for r in rows).items()))

    # 3. The held-out evaluation set.
    eval_counts = write_eval(
        tmp / "eval",
        seed=seed,
        n_per_class=n_eval_per_class,
        n_retrieval=n_retrieval,
        digit_images=digit_images,
        digit_targets=digit_targets,
        eval_idx=eval_idx,
        crawled_pixels=crawled_pixels,
    )

    base_url = base_url_of(host, port)
    pq.write_table(url_table(rows, base_url), tmp / "urls.parquet")
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
