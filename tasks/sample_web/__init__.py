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

The modules, by domain:

    scenes.py     coloured shapes on a gradient: parameters and rendering
    digits.py     scikit-learn's 8x8 digits, split crawl/held-out, upscaled onto paper
    captions.py   the English phrasings of a scene or a digit; French, German, Spanish ones
    defects.py    the defects (`DEFECT_COUNTS`) and img2dataset's outcome for each (`OUTCOMES`,
                  observed with `CRAWL_SETTINGS`)
    eval_set.py   the held-out evaluation set and its zero-shot templates
    url_list.py   urls.parquet's rows; `write_url_list`
    files.py      image encodings, hashes, `directory_digest`
    server.py     `serve_sample_web`
    generate.py   `generate_sample_web`: all of the above, written atomically
"""

from tasks.sample_web.captions import (
    COUNT_WORDS,
    digit_captions,
    foreign_digit_caption,
    foreign_scene_caption,
    scene_captions,
)
from tasks.sample_web.defects import (
    CRAWL_SETTINGS,
    DEFECT_COUNTS,
    OUTCOMES,
    SLOW_SECONDS,
    expected_crawl,
)
from tasks.sample_web.digits import (
    DIGIT_SIZE,
    DIGIT_WORDS,
    load_digit_images,
    render_digit,
    split_digits,
)
from tasks.sample_web.eval_set import EVAL_TASKS, EVAL_TEMPLATES
from tasks.sample_web.files import directory_digest
from tasks.sample_web.generate import SampleWebSummary, generate_sample_web, summary_dict
from tasks.sample_web.scenes import (
    COLOURS,
    POSITIONS,
    SCENE_SIZE,
    SHAPES,
    SIZES,
    Scene,
    render_scene,
    sample_scene,
)
from tasks.sample_web.server import serve_sample_web
from tasks.sample_web.url_list import DEFAULT_PORT, write_url_list

__all__ = [
    "COLOURS",
    "COUNT_WORDS",
    "CRAWL_SETTINGS",
    "DEFAULT_PORT",
    "DEFECT_COUNTS",
    "DIGIT_SIZE",
    "DIGIT_WORDS",
    "EVAL_TASKS",
    "EVAL_TEMPLATES",
    "OUTCOMES",
    "POSITIONS",
    "SCENE_SIZE",
    "SHAPES",
    "SIZES",
    "SLOW_SECONDS",
    "SampleWebSummary",
    "Scene",
    "digit_captions",
    "directory_digest",
    "expected_crawl",
    "foreign_digit_caption",
    "foreign_scene_caption",
    "generate_sample_web",
    "load_digit_images",
    "render_digit",
    "render_scene",
    "sample_scene",
    "scene_captions",
    "serve_sample_web",
    "split_digits",
    "summary_dict",
    "write_url_list",
]
