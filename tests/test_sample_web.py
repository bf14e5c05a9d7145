"""The sample web: a deterministic internet with known defects, served over real HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.sample_web import (
    COLOURS,
    CRAWL_SETTINGS,
    DEFAULT_PORT,
    DEFECT_COUNTS,
    DIGIT_WORDS,
    OUTCOMES,
    SHAPES,
    expected_crawl,
    generate_sample_web,
    load_digit_images,
    render_scene,
    sample_scene,
    serve_sample_web,
    split_digits,
    write_url_list,
)
from tasks.sample_web.files import jpeg_bytes
from tasks.sample_web.seeds import item_rng

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_scenes=100, n_digits=60, n_eval_per_class=4, n_retrieval=10)


@pytest.fixture
def web(sample_web):
    """The full-size sample web with its default parameters (conftest: generated once)."""
    return sample_web.out_dir, sample_web


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _urls(root: Path):
    return pq.read_table(root / "urls.parquet").to_pandas()


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers, r.read()


def test_same_seed_writes_byte_identical_files_and_another_seed_does_not(tmp_path):
    a = generate_sample_web(tmp_path / "a", seed=3, **SMALL)
    b = generate_sample_web(tmp_path / "b", seed=3, **SMALL)
    c = generate_sample_web(tmp_path / "c", seed=4, **SMALL)
    files_a, files_b, files_c = (
        _files(tmp_path / "a"),
        _files(tmp_path / "b"),
        _files(tmp_path / "c"),
    )
    assert files_a == files_b
    assert a.digest == b.digest
    assert files_a.keys() == files_c.keys()
    assert files_a["urls.parquet"] != files_c["urls.parquet"]
    assert files_a["www/img/scene-00000.jpg"] != files_c["www/img/scene-00000.jpg"]
    assert c.digest != a.digest


def test_regenerating_replaces_the_previous_web(tmp_path):
    generate_sample_web(tmp_path, seed=0, **{**SMALL, "n_scenes": 150})
    summary = generate_sample_web(tmp_path, seed=0, **SMALL)
    assert not (tmp_path / "www/img/scene-00120.jpg").exists()
    assert len(_urls(tmp_path)) == summary.rows
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_too_few_images_for_the_defects_is_refused(tmp_path):
    with pytest.raises(ValueError, match="n_scenes \\+ n_digits"):
        generate_sample_web(tmp_path, n_scenes=20, n_digits=20)


def test_url_list_has_3000_rows_with_the_documented_defect_counts(web):
    root, summary = web
    urls = _urls(root)
    assert len(urls) >= 3000 and len(urls) == summary.rows
    labels = Counter(urls["expected"])
    for defect, n in DEFECT_COUNTS.items():
        assert labels[defect] == n, defect
    assert labels["ok"] == len(urls) - sum(DEFECT_COUNTS.values())
    assert set(labels) == set(OUTCOMES)
    assert urls["url"].str.startswith(f"http://127.0.0.1:{DEFAULT_PORT}/").all()
    assert (urls["url"] == f"http://127.0.0.1:{DEFAULT_PORT}" + urls["path"]).all()

    expected = json.loads((root / "expected.json").read_text())
    assert expected["rows"] == len(urls)
    assert expected["labels"] == dict(labels)
    assert expected["expected_crawl"] == expected_crawl(dict(labels))
    statuses = expected["expected_crawl"]["status"]
    assert sum(statuses.values()) == len(urls)
    assert statuses["failed_to_download"] == sum(
        DEFECT_COUNTS[k] for k in ("http_404", "http_500", "slow", "noai")
    )


def test_scenes_and_digits_cover_every_colour_shape_size_position_count_and_digit(web):
    urls = _urls(web[0])
    scenes = urls[urls["kind"] == "scene"]
    assert set(scenes["colour"]) == set(COLOURS)
    assert set(scenes["shape"]) == set(SHAPES)
    assert set(scenes["size"]) == {"small", "large"}
    assert set(scenes["position"]) == {"left", "right", "top", "bottom", "center"}
    assert set(scenes["count"]) == {1, 2, 3, 4}
    assert set(urls.loc[urls["kind"] == "digit", "digit"]) == set(range(10))
    english = urls[urls["expected"] == "ok"]["caption"]
    assert english.str.contains("photo of").any() and english.str.contains(" on the left").any()
    assert english.str.contains("handwritten").any() and english.str.contains(r"\d").any()


def test_every_defect_is_in_the_served_files(web):
    import cv2

    root, _ = web
    urls = _urls(root)
    www = root / "www"

    def rows(label):
        return urls[urls["expected"] == label]

    def body(path):
        return (www / path.lstrip("/")).read_bytes()

    assert not any((www / p.lstrip("/")).exists() for p in rows("http_404")["path"])
    assert rows("http_500")["path"].str.startswith("/status/500/").all()
    assert rows("slow")["path"].str.startswith("/slow/").all()
    assert rows("noai")["path"].str.startswith("/noai/").all()
    for p in rows("html")["path"]:
        assert p.endswith(".jpg") and body(p).startswith(b"<!doctype html>")
    for p in rows("truncated_jpeg")["path"]:
        data = body(p)
        assert data.startswith(b"\xff\xd8") and not data.endswith(b"\xff\xd9")
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None
    for p in rows("too_small")["path"]:
        w, h = Image.open(io.BytesIO(body(p))).size
        assert max(w, h) < CRAWL_SETTINGS["min_image_size"]
    for p in rows("extreme_aspect")["path"]:
        w, h = Image.open(io.BytesIO(body(p))).size
        assert w / h == 20 and min(w, h) >= CRAWL_SETTINGS["min_image_size"]
    for p in rows("ok")["path"].head(50):
        w, h = Image.open(io.BytesIO(body(p))).size
        assert min(w, h) >= 96

    # duplicate URLs: the same url (and caption) twice; one image behind two different URLs
    dup_urls = rows("duplicate_url")
    assert dup_urls["url"].isin(rows("ok")["url"]).all()
    assert Counter(urls["url"])[dup_urls["url"].iloc[0]] == 2
    assert urls["url"].duplicated().sum() == DEFECT_COUNTS["duplicate_url"]
    ok_by_hash = dict(zip(rows("ok")["image_sha256"], rows("ok")["path"], strict=True))
    for p, digest in zip(
        rows("duplicate_image")["path"], rows("duplicate_image")["image_sha256"], strict=True
    ):
        assert hashlib.sha256(body(p)).hexdigest() == digest
        assert ok_by_hash[digest] != p

    assert (rows("empty_caption")["caption"] == "").all()
    one_word = rows("one_word_caption")["caption"]
    assert (one_word.str.fullmatch(r"[a-z]+")).all()


def test_non_english_captions_are_french_german_or_spanish(web):
    import langid

    identifier = langid.langid.LanguageIdentifier.from_modelstring(
        langid.langid.model, norm_probs=True
    )
    identifier.set_languages(["en", "fr", "de", "es"])
    foreign = _urls(web[0]).query("expected == 'non_english_caption'")
    assert set(foreign["lang"]) == {"fr", "de", "es"}
    for caption, lang in zip(foreign["caption"], foreign["lang"], strict=True):
        assert identifier.classify(caption)[0] == lang, caption


def test_server_answers_each_behaviour_over_http(web):
    root, _ = web
    urls = _urls(root)

    def first(label):
        return urls[urls["expected"] == label].iloc[0]

    with serve_sample_web(root, port=0, slow_seconds=30) as base:
        assert base.startswith("http://127.0.0.1:") and not base.endswith(f":{DEFAULT_PORT}")
        ok = first("ok")
        status, headers, data = _get(base + ok["path"])
        assert (status, headers["Content-Type"]) == (200, "image/jpeg")
        assert hashlib.sha256(data).hexdigest() == ok["image_sha256"]
        assert headers["X-Robots-Tag"] is None

        for label, code in (("http_404", 404), ("http_500", 500)):
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(base + first(label)["path"])
            assert err.value.code == code
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(base + "/img/../../urls.parquet")
        assert err.value.code == 404

        status, headers, data = _get(base + first("html")["path"])
        assert headers["Content-Type"].startswith("text/html") and data.startswith(b"<!doctype")

        noai = first("noai")
        status, headers, data = _get(base + noai["path"])
        assert headers["X-Robots-Tag"] == "noai"
        assert hashlib.sha256(data).hexdigest() == noai["image_sha256"]

        dup = first("duplicate_image")
        original = urls[
            (urls["image_sha256"] == dup["image_sha256"]) & (urls["path"] != dup["path"])
        ]
        assert _get(base + dup["path"])[2] == _get(base + original["path"].iloc[0])[2]

        with pytest.raises(TimeoutError):  # the server holds the answer for 30 s
            _get(base + first("slow")["path"], timeout=0.5)


def test_slow_endpoint_serves_its_image_once_the_delay_is_over(web):
    root, _ = web
    slow = _urls(root).query("expected == 'slow'").iloc[0]
    with serve_sample_web(root, slow_seconds=0.2) as base:
        status, headers, data = _get(base + slow["path"], timeout=30)
    assert status == 200 and hashlib.sha256(data).hexdigest() == slow["image_sha256"]


def test_write_url_list_rebases_every_url_and_keeps_the_rest(web, tmp_path):
    root, _ = web
    out = write_url_list(root, "http://127.0.0.1:1234/", tmp_path / "urls.parquet")
    original, rebased = _urls(root), pq.read_table(out).to_pandas()
    assert (rebased["url"] == "http://127.0.0.1:1234" + original["path"]).all()
    assert rebased.drop(columns="url").equals(original.drop(columns="url"))


def test_eval_set_has_every_class_with_templates_and_retrieval_captions(web):
    root, summary = web
    eval_dir = root / "eval"
    counts = json.loads((root / "expected.json").read_text())["eval"]
    classes = {"digits": list(DIGIT_WORDS), "colors": list(COLOURS), "shapes": list(SHAPES)}
    for task, names in classes.items():
        assert (eval_dir / task / "classnames.txt").read_text().split("\n")[:-1] == names
        templates = (eval_dir / task / "templates.txt").read_text().splitlines()
        assert templates and all("{c}" in t for t in templates)
        assert sorted(p.name for p in (eval_dir / task).iterdir() if p.is_dir()) == sorted(names)
        for name in names:
            images = sorted((eval_dir / task / name).glob("*.png"))
            assert len(images) == counts[task][name] == 50
            with Image.open(images[0]) as im:
                assert im.mode == "RGB" and min(im.size) >= 96

    lines = (eval_dir / "retrieval" / "captions.jsonl").read_text().splitlines()
    assert len(lines) == counts["retrieval"] == 100
    for line in lines:
        entry = json.loads(line)
        assert (eval_dir / "retrieval" / entry["image"]).is_file()
        assert 2 <= len(entry["captions"]) <= 3 and len(set(entry["captions"])) == len(
            entry["captions"]
        )
    assert (eval_dir / "README.md").is_file()
    assert summary.eval_images == {"digits": 500, "colors": 450, "shapes": 200, "retrieval": 100}


def test_eval_images_are_never_crawled(web):
    root, _ = web
    crawled = set(_urls(root)["image_sha256"].dropna())

    # Re-encoding a crawled scene's pixels gives exactly its served bytes, so re-encoding each
    # (lossless) eval image the same way would find any eval image that is also crawled.
    scene_0 = render_scene(sample_scene(item_rng(0, "scene", 0)))
    assert hashlib.sha256(jpeg_bytes(scene_0)).hexdigest() in crawled

    eval_images = sorted((root / "eval").rglob("*.png"))
    assert len(eval_images) == 500 + 450 + 200 + 100
    for path in eval_images:
        assert hashlib.sha256(path.read_bytes()).hexdigest() not in crawled
        with Image.open(path) as im:
            assert hashlib.sha256(jpeg_bytes(im.convert("RGB"))).hexdigest() not in crawled, path

    # Digits come from disjoint halves of scikit-learn's digits: no source image in both.
    _, targets = load_digit_images()
    crawl_idx, eval_idx = split_digits(targets, seed=0, n_eval_per_class=53)
    assert not set(crawl_idx) & set(eval_idx)
    assert len(crawl_idx) + len(eval_idx) == len(targets)
    assert Counter(targets[eval_idx]) == dict.fromkeys(range(10), 53)


def test_img2dataset_crawl_gives_each_defect_its_documented_outcome(web, tmp_path):
    """A real img2dataset crawl, over loopback, of every defect row and a few good ones."""
    root, _ = web
    urls = _urls(root)
    defects = urls["expected"] != "ok"
    # every defect row, plus the good rows whose URL or bytes a duplicate row repeats
    twins = urls["image_sha256"].isin(urls.loc[defects, "image_sha256"])
    subset = urls[defects | twins]
    with serve_sample_web(root) as base:
        full = write_url_list(root, base, tmp_path / "all.parquet")
        table = pq.read_table(full).take(list(subset.index))
        pq.write_table(table, tmp_path / "subset.parquet")
        config = {
            "url_list": str(tmp_path / "subset.parquet"),
            "input_format": "parquet",
            "url_col": "url",
            "caption_col": "caption",
            "save_additional_columns": ["expected"],
            "output_format": "webdataset",
            "output_folder": str(tmp_path / "crawl"),
            "processes_count": 1,
            "thread_count": 16,
            "enable_wandb": False,
            **{k: v for k, v in CRAWL_SETTINGS.items() if v is not None},
        }
        (tmp_path / "crawl.json").write_text(json.dumps(config))
        subprocess.run(
            [sys.executable, "-m", "tasks.crawl", str(tmp_path / "crawl.json")],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    crawl = pq.read_table(sorted((tmp_path / "crawl").glob("*.parquet"))).to_pandas()
    assert len(crawl) == len(subset)
    observed = Counter(zip(crawl["expected"], crawl["status"], crawl["error_message"], strict=True))
    documented = Counter()
    for label, n in Counter(subset["expected"]).items():
        documented[(label, *OUTCOMES[label])] = n
    assert observed == documented

    # one image under two URLs: both crawled, same sha256
    sha_by_url = dict(zip(crawl["url"], crawl["sha256"], strict=True))
    for url, digest in zip(
        table.column("url").to_pylist(), table.column("image_sha256"), strict=True
    ):
        if sha_by_url.get(url) is not None:
            assert sha_by_url[url] == digest.as_py()


def test_flow_help_runs_without_a_server():
    result = subprocess.run(
        [sys.executable, "-m", "flows.sample", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--serve" in result.stdout and "--seed" in result.stdout
