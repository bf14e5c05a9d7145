"""Curation: each filter drops exactly its defect, counts add up, output and rejects are complete."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import DatasetError, DatasetWriter, describe_shard, open_dataset, write_manifest
from storage.fs import join
from tasks.curation import (
    REJECTED_NAME,
    FilterSpecError,
    open_input,
    parse_filter_spec,
    select_samples,
    shard_sizes,
    write_curated,
)
from tasks.curation.filters import FilterContext, basic
from tasks.curation.near_dup import HashIndex, greedy_dedup, hamming, phash64
from tasks.curation.spec import Basic

GOOD_CAPTION = "a photo of a small {} shape drawn on a plain white background"
COLOURS = ["red", "blue", "green", "yellow", "black", "orange", "purple", "brown", "pink", "grey"]


def picture(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture: an 8x8 colour grid upscaled (distinct pHash per seed)."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# what each planted sample must be dropped by (None: kept); the spec below lists the filters
EXPECTED = {
    "tiny": "basic",
    "banner": "basic",
    "empty": "basic",
    "oneword": "basic",
    "french": "language",
    "dupurl": "dedup_url",
    "dupbytes": "dedup_sha256",
    "broken": "undecodable",
    "evalcopy": "near_duplicates",
    "nearcopy": "near_duplicates",
}
SPEC = {
    "filters": [
        {"name": "basic", "min_side": 48},
        {"name": "language", "languages": ["en"], "candidates": ["en", "fr", "de", "es"]},
        {"name": "dedup_url"},
        {"name": "dedup_sha256"},
        {"name": "near_duplicates", "threshold": 6},
    ],
    "num_shards": 4,
}


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for task, seeds in {"digits/three": [1000, 1001], "retrieval/images": [1002]}.items():
        (root / task).mkdir(parents=True)
        for s in seeds:
            (root / task / f"{s}.png").write_bytes(png(picture(s, 96)))
    return root


def _sample(key, image_bytes, caption, *, url=None, size=(300, 300)):
    return {
        "key": key,
        "image": image_bytes,
        "caption": caption,
        "url": url or f"http://example.com/{key}.jpg",
        "original_width": size[0],
        "original_height": size[1],
    }


def build_crawl(root, *, per_shard: int = 8) -> tuple[str, list[dict]]:
    """A crawled dataset with every defect, plus failed rows (not samples) in the Parquet."""
    good = [
        _sample(f"good{i:02d}", jpeg(picture(i)), GOOD_CAPTION.format(COLOURS[i % 10]))
        for i in range(14)
    ]
    near = picture(2).resize((56, 56), Image.Resampling.BILINEAR)
    defects = [
        _sample("tiny", jpeg(picture(100)), GOOD_CAPTION.format("red"), size=(20, 24)),
        _sample("banner", jpeg(picture(101)), GOOD_CAPTION.format("red"), size=(1000, 200)),
        _sample("empty", jpeg(picture(102)), ""),
        _sample("oneword", jpeg(picture(103)), "cat"),
        _sample("french", jpeg(picture(104)), "Une image d'un cercle rouge sur un fond uni."),
        {**good[0], "key": "dupurl"},
        {**good[1], "key": "dupbytes", "url": "http://mirror.example.com/copy.jpg"},
        _sample("broken", jpeg(picture(105))[:200], GOOD_CAPTION.format("blue")),
        _sample(
            "evalcopy", jpeg(picture(1001, 96).resize((64, 64)), 80), GOOD_CAPTION.format("tan")
        ),
        _sample("nearcopy", jpeg(near, 70), GOOD_CAPTION.format("teal")),
    ]
    samples = good[:7] + defects[:5] + good[7:] + defects[5:]
    shards, url = [], str(root)
    writer = DatasetWriter(url, stage="ingest", samples_per_shard=per_shard)
    for s in samples:
        row = {
            "url": s["url"],
            "width": 64,
            "height": 64,
            "original_width": s["original_width"],
            "original_height": s["original_height"],
            "sha256": hashlib.sha256(s["image"]).hexdigest(),
            "error_message": None,
        }
        writer.write(s["key"], s["image"], s["caption"], {"url": s["url"]}, row)
    writer.close()
    # a crawl's Parquet also lists the rows that failed: add one per shard, then re-seal
    for entry in writer.shards:
        path = join(url, f"{entry.name}.parquet")
        table = pq.read_table(path)
        failed = {c: [None] for c in table.column_names}
        failed.update(
            key=[f"fail{entry.name}"], caption=["a red circle on white"], url=["http://x/404"]
        )
        failed.update(status=["failed_to_download"], error_message=["HTTP Error 404"])
        both = pa.concat_tables([table, pa.table(failed)], promote_options="permissive")
        pq.write_table(both, path)
        shards.append(describe_shard(url, entry.name))
    write_manifest(url, shards, stage="ingest")
    return url, samples


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    return build_crawl(tmp_path_factory.mktemp("crawl"))


def test_each_filter_removes_exactly_its_defects(crawl, eval_dir):
    url, samples = crawl
    spec = parse_filter_spec(SPEC).with_eval_dirs([str(eval_dir)])
    ds, bad = open_input(url)
    sel = select_samples(ds, spec, bad_shards=bad, progress=False)

    reasons = dict(zip(sel.samples.column("key").to_pylist(), sel.reason.tolist(), strict=True))
    assert reasons == {s["key"]: EXPECTED.get(s["key"]) for s in samples}  # failed rows absent
    assert sel.input_rows == len(samples) + len(ds.manifest.shards)
    assert [s["filter"] for s in sel.steps] == [
        "basic",
        "language",
        "dedup_url",
        "dedup_sha256",
        "undecodable",  # the image pass runs just before the first filter on pixels
        "near_duplicates",
    ]
    assert sel.removed == {
        "basic": 4,
        "language": 1,
        "dedup_url": 1,
        "dedup_sha256": 1,
        "undecodable": 1,
        "near_duplicates": 2,
    }
    assert sum(sel.removed.values()) + sel.kept.sum() == len(samples)
    details = dict(zip(sel.samples.column("key").to_pylist(), sel.detail.tolist(), strict=True))
    assert details["tiny"] == "shorter side < 48 px"
    assert details["banner"] == "aspect ratio > 3"
    assert details["empty"] == "caption < 3 words"
    assert details["french"].startswith("language fr")
    assert details["dupurl"] == "same url as good00"
    assert details["dupbytes"] == "same image bytes as good01"
    assert details["evalcopy"].startswith(f"near eval image {eval_dir}/digits/three/1001.png")
    assert details["nearcopy"].startswith("near good02 (distance")
    assert details["broken"].startswith("image does not decode")


def test_output_is_resharded_evenly_with_complete_rejects(crawl, eval_dir, tmp_path):
    url, samples = crawl
    spec = parse_filter_spec(SPEC).with_eval_dirs([str(eval_dir)])
    ds, bad = open_input(url)
    sel = select_samples(ds, spec, bad_shards=bad, progress=False)
    out = str(tmp_path / "curated")
    params = {"spec": spec.model_dump(mode="json")}
    manifest = write_curated(ds, sel, out, num_shards=4, parameters=params, progress=False)

    curated = open_dataset(out, verify=True)
    kept = sorted(s["key"] for s in samples if s["key"] not in EXPECTED)
    assert [s.num_samples for s in manifest.shards] == [4, 4, 3, 3]  # 14 kept over 4 shards
    assert sorted(s.key for s in curated.iter_samples()) == kept
    assert manifest.producer.stage == "curate"
    assert manifest.producer.input_digest == ds.digest
    assert manifest.producer.parameters == params
    assert manifest.stats["removed"]["basic"] == 4 and manifest.stats["kept"] == len(kept)
    assert manifest.stats["input_samples"] == len(samples)
    assert manifest.stats["crawl_failures"] == len(ds.manifest.shards)
    meta = curated.metadata()
    assert not {"shard", "_phash"} & set(meta.column_names)
    assert set(meta.column("status").to_pylist()) == {"success"}

    rejected = pq.read_table(join(out, REJECTED_NAME)).to_pylist()
    assert {r["key"]: r["filter"] for r in rejected} == EXPECTED
    assert len(rejected) + curated.manifest.total_samples == len(samples)
    by_key = {r["key"]: r for r in rejected}
    assert by_key["dupurl"]["url"] == "http://example.com/good00.jpg"
    assert by_key["french"]["caption"].startswith("Une image")
    assert by_key["dupbytes"]["detail"] == "same image bytes as good01"


def test_shard_sizes_differ_by_at_most_one():
    assert shard_sizes(10, 4) == [3, 3, 2, 2]
    assert shard_sizes(3, 8) == [1, 1, 1]
    assert shard_sizes(0, 8) == []
    for n in range(1, 60):
        sizes = shard_sizes(n, 7)
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


def test_truncated_shard_counts_its_samples_as_undecodable(tmp_path):
    url, samples = build_crawl(tmp_path / "crawl")
    ds = open_dataset(url)
    victim = ds.tar_urls()[1]
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])  # a half-copied shard
    with pytest.raises(DatasetError):
        open_dataset(url)

    ds, bad = open_input(url)
    assert list(bad) == [ds.manifest.shards[1].name]
    spec = parse_filter_spec({"filters": [{"name": "dedup_url"}]})
    sel = select_samples(ds, spec, bad_shards=bad, progress=False)
    in_victim = set(pq.read_table(ds.parquet_urls()[1]).column("key").to_pylist())
    undecodable = {
        k
        for k, r in zip(sel.samples.column("key").to_pylist(), sel.reason, strict=True)
        if r == "undecodable"
    }
    assert undecodable == (in_victim - {f"fail{ds.manifest.shards[1].name}"}) | {"broken"}
    out = str(tmp_path / "out")
    manifest = write_curated(ds, sel, out, num_shards=3, parameters={}, progress=False)
    assert manifest.total_samples + sum(sel.removed.values()) == len(samples)


def test_input_that_is_not_a_dataset_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="not a dataset"):
        open_input(str(tmp_path))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"filters": [{"name": "blur"}]}, "'blur'.*'basic', 'language'"),
        ({"filters": [{"name": "basic", "min_sid": 3}]}, r"min_sid.*accepts: name, min_side"),
        ({"filters": [{"name": "basic", "max_aspect": 0.5}]}, r"filters\[0\].basic.max_aspect"),
        ({"filters": [{"name": "language", "languages": ["xx"]}]}, r"\['xx'\].*'en'"),
        ({"filters": [{"name": "near_duplicates", "threshold": "far"}]}, "threshold"),
        ({"filters": [{"name": "dedup_url"}, {"name": "dedup_url"}]}, "more than once"),
        ({"filtres": []}, "filtres.*accepts: filters, num_shards"),
        ({"filters": [], "num_shards": 0}, "num_shards"),
    ],
)
def test_bad_filter_spec_names_the_problem(spec, message):
    with pytest.raises(FilterSpecError, match=message):
        parse_filter_spec(spec)


def test_basic_filter_bounds_are_inclusive():
    captions = ["one two three", "one two", "ab cd e", "  one   two  three ", "x", None]
    captions += ["one\u00a0two\u3000three", "one two\n"]
    table = pa.table(
        {
            "key": list("abcdefgh"),
            "caption": captions,
            "original_width": [200, 600, 300, 199, 300, 300, None, 300],
            "original_height": [600, 600, 300, 300, 300, 300, None, 900],
            "width": [64] * 6 + [250, 64],  # g: original size unknown, the stored one counts
            "height": [64] * 6 + [250, 64],
        }
    )
    why = basic(table, Basic(name="basic", min_side=200, max_aspect=3.0), FilterContext())
    assert why.to_pylist() == [
        None,  # 200 px and aspect exactly 3: kept
        "caption < 3 words",
        None,  # "ab cd e": 3 words, 7 characters
        "shorter side < 200 px",
        "caption < 3 words",
        "caption < 3 words",
        None,  # Unicode spaces separate words too
        "caption < 3 words",
    ]


def test_hash_index_finds_exactly_the_pairs_brute_force_finds():
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 2**63, 50, dtype=np.int64).astype(np.uint64)
    noise = np.zeros(2000, np.uint64)
    for bit in range(64):  # flip each bit with probability 5%: clusters of near neighbours
        noise |= (rng.random(2000) < 0.05).astype(np.uint64) << np.uint64(bit)
    hashes = centres[rng.integers(0, 50, 2000)] ^ noise
    for t in (0, 3, 6, 10):
        brute = np.argwhere(hamming(hashes[:, None], hashes[None, :]) <= t)
        q, d, dist = HashIndex(hashes, t).search(hashes)
        assert set(zip(q.tolist(), d.tolist(), strict=True)) == set(map(tuple, brute.tolist()))
        assert (dist <= t).all()


def test_greedy_dedup_keeps_the_first_of_each_group():
    zero, one, three = np.uint64(0), np.uint64(0b1), np.uint64(0b111)
    hashes = np.array([zero, one, np.uint64(2**64 - 1), zero, three], np.uint64)
    kept, match, dist = greedy_dedup(hashes, threshold=2)
    # 0b111 is 3 bits from the kept 0 and 2 from the dropped 0b1: only kept samples count
    assert kept.tolist() == [True, False, True, False, True]
    assert match.tolist() == [-1, 0, -1, 0, -1]
    assert dist.tolist() == [-1, 1, -1, 0, -1]


def test_greedy_dedup_matches_a_sample_by_sample_scan():
    # repeated (hash, thumbnail) pairs, the same hash under other thumbnails, near hashes: the
    # collapsed groups and the hash index must decide as a plain scan over every earlier sample
    from tasks.curation.near_dup import thumb_difference

    rng = np.random.default_rng(3)
    n = 400
    centres = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
    hashes = centres[rng.integers(0, 40, n)] ^ (flips * (rng.random(n) < 0.4).astype(np.uint64))
    thumbs = (rng.integers(0, 2, (n, 48)) * 20 * (rng.random((n, 1)) < 0.5)).astype(np.uint8)
    for t, tol in ((0, 255.0), (1, 5.0), (3, 12.0)):
        kept, match, dist = greedy_dedup(hashes, t, thumbs, tol)
        for i in range(n):
            earlier = [
                j
                for j in range(i)
                if kept[j]
                and hamming(hashes[i], hashes[j]) <= t
                and thumb_difference(thumbs[i], thumbs[j]) <= tol
            ]
            assert kept[i] == (not earlier), (t, i)
            assert match[i] == (earlier[0] if earlier else -1), (t, i)
            expected = hamming(hashes[i], hashes[earlier[0]]) if earlier else -1
            assert dist[i] == expected, (t, i)


def test_phash_is_stable_under_reencoding_and_resizing():
    image = picture(7, 128)
    copy = Image.open(io.BytesIO(jpeg(image.resize((80, 80)), 60)))
    other = picture(8, 128)
    h = np.array([phash64(image), phash64(copy), phash64(other)], np.uint64)
    assert hamming(h[0], h[1]) <= 3
    assert hamming(h[0], h[2]) > 12


def test_near_duplicate_needs_alike_colours_too():
    from tasks.curation.near_dup import thumb_difference, thumbnail

    image = picture(9, 96)
    recoloured = Image.fromarray(255 - np.asarray(image)[:, :, ::-1])  # other colours, same layout
    copy = Image.open(io.BytesIO(jpeg(image.resize((64, 64)), 70)))
    assert thumb_difference(thumbnail(image), thumbnail(copy)) <= 4
    assert thumb_difference(thumbnail(image), thumbnail(recoloured)) > 30
    h = np.array([phash64(image), phash64(copy), phash64(recoloured)], np.uint64)
    thumbs = np.stack([thumbnail(image), thumbnail(copy), thumbnail(recoloured)])
    kept, _, _ = greedy_dedup(h, 64, thumbs, 12.0)  # any pHash matches: colours decide
    assert kept.tolist() == [True, False, True]


def test_curate_flow_end_to_end(crawl, eval_dir, tmp_path, prefect_harness, mlflow_tmp):
    import mlflow
    import yaml

    from flows.curate import curate

    url, samples = crawl
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    out = str(tmp_path / "curated")
    result = curate(input=url, output=out, filters=str(spec_file), eval_dirs=[str(eval_dir)])
    assert result.kept == len(samples) - len(EXPECTED) and not result.skipped
    assert result.removed["near_duplicates"] == 2
    run = mlflow.get_run(result.mlflow_run_id)
    assert run.data.metrics["removed_basic"] == 4
    assert run.data.metrics["input_samples"] == len(samples)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/image_sizes.png"}
    from prefect.artifacts import Artifact

    table = Artifact.get("curate-filter-counts").data
    table = json.loads(table) if isinstance(table, str) else table
    assert [r["step"] for r in table][-3:] == ["undecodable", "near_duplicates", "kept"]
    assert table[-1]["remaining"] == result.kept
    manifest = json.loads(open(join(out, "manifest.json")).read())
    assert manifest["producer"]["parameters"]["eval_sets"][0]["images"] == 3

    again = curate(input=url, output=out, filters=str(spec_file), eval_dirs=[str(eval_dir)])
    assert again.skipped and again.digest == result.digest


def test_clip_score_is_written_and_keeps_the_top_fraction(crawl, tmp_path):
    import torch

    from clip_model import create_model, to_state_dict
    from clip_model.tokenizer import get_tokenizer, train_tokenizer
    from clip_model.transforms import eval_transform

    url, samples = crawl
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    ckpt = tmp_path / "tiny.pt"
    torch.save(
        {"state_dict": to_state_dict(model), "model_config": model.config.model_dump()}, ckpt
    )
    tok_file = tmp_path / "bpe.json"
    train_tokenizer([s["caption"] for s in samples] * 3, 300, tok_file)
    spec = parse_filter_spec(
        {
            "filters": [
                {"name": "basic", "min_side": 48},
                {
                    "name": "clip_score",
                    "checkpoint": str(ckpt),
                    "tokenizer": str(tok_file),
                    "top_fraction": 0.5,
                    "precision": "fp32",
                    "batch_size": 4,
                },
            ]
        }
    )
    ds, bad = open_input(url)
    sel = select_samples(ds, spec, bad_shards=bad, progress=False)
    scored = sel.samples.column("clip_score").to_numpy(zero_copy_only=False)
    keys = sel.samples.column("key").to_pylist()
    alive = len(samples) - sel.removed["basic"] - sel.removed["undecodable"]
    assert np.isfinite(scored).sum() == alive  # every sample that reached the filter is scored
    assert sel.removed["clip_score"] == alive - int(np.ceil(alive / 2))
    kept = sel.kept
    dropped = np.equal(sel.reason, "clip_score")
    assert scored[kept].min() >= scored[dropped].max()

    # the score is the cosine of the model's own image and caption embeddings
    i = keys.index("good03")
    sample = next(s for s in samples if s["key"] == "good03")
    image = eval_transform(64)(Image.open(io.BytesIO(sample["image"])).convert("RGB"))
    with torch.no_grad():
        img_f, txt_f, _ = model(image[None], get_tokenizer(tok_file, 32)([sample["caption"]]))
    assert scored[i] == pytest.approx(float((img_f * txt_f).sum()), abs=1e-4)

    out = str(tmp_path / "out")
    write_curated(ds, sel, out, num_shards=2, parameters={}, progress=False)
    curated = open_dataset(out)
    assert curated.metadata().column("clip_score").null_count == 0
    rejected = pq.read_table(join(out, REJECTED_NAME))
    assert "clip_score" in rejected.column_names
