"""Search: the index flow (build, resume, growth), queries, bad input, the web page in a real
headless Chromium, and recall through the index against the evaluation stage's recall.

The data: small coloured shapes written with storage.DatasetWriter (8 samples a shard). The
model: a small random CLIP saved the way a training run saves it (a Lightning `step-N.ckpt`
under `run/checkpoints/`, its trained BPE in `run/tokenizer.json`); random weights keep the test
quick and change nothing the tests check (an image still finds itself first, recall is recall).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clip_model.checkpoint import load_clip
from clip_model.embedder import Embedder
from storage import DatasetWriter, open_dataset, stage_output
from storage.embeddings import EmbeddingStore, choose_spec
from tasks.search import (
    ModelMismatchError,
    SearchError,
    SearchIndex,
)

COLOURS = {
    "red": (215, 30, 35),
    "green": (35, 155, 55),
    "blue": (30, 75, 215),
    "yellow": (245, 215, 25),
}
SHAPES = ("circle", "square", "triangle")
SMALL = dict(
    embed_dim=32, vision_layers=2, vision_width=64, text_width=64, text_layers=2, text_heads=2
)


def picture(colour: str, shape: str, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    x, y, r = rng.randint(18, 46), rng.randint(18, 46), rng.randint(10, 16)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def shapes(n: int) -> list[tuple[str, bytes, str]]:
    out = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 3]
        out.append((f"s{i:04d}", picture(colour, shape, i), f"a {colour} {shape}"))
    return out


def write_dataset(url: Path, n: int) -> Path:
    with DatasetWriter(str(url), stage="test", samples_per_shard=8) as w:
        for key, image, caption in shapes(n):
            w.write(key, image, caption)
    return url


def save_run_checkpoint(run: Path, seed: int) -> Path:
    """A training run's layout: run/tokenizer.json and run/checkpoints/step-N.ckpt."""
    from clip_model import ModelConfig, train_tokenizer
    from clip_model.lightning_module import ClipLightningModule

    captions = [c for _, _, c in shapes(32)] * 4
    tok = train_tokenizer(captions, 300, run / "tokenizer.json", min_frequency=1)
    config = ModelConfig.load("tiny").model_copy(update={**SMALL, "vocab_size": tok.vocab_size})
    torch.manual_seed(seed)
    module = ClipLightningModule(model=config)  # what clip_model.train checkpoints
    path = run / "checkpoints" / "step-00000000.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """24 samples (3 shards) and the same dataset grown to 32 (4 shards, the first 3 identical)."""
    root = tmp_path_factory.mktemp("search-data")
    return {"small": write_dataset(root / "d24", 24), "grown": write_dataset(root / "d32", 32)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_run_checkpoint(tmp_path_factory.mktemp("run"), seed=0)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """Another model, exported as `{"state_dict", "model_config"}` with its tokenizer beside."""
    from clip_model import to_state_dict

    run = tmp_path_factory.mktemp("other")
    clip = load_clip(save_run_checkpoint(run, seed=1))
    path = run / "checkpoints" / "model.pt"
    torch.save(
        {"state_dict": to_state_dict(clip.model), "model_config": clip.model.config.model_dump()},
        path,
    )
    shutil.copy(run / "tokenizer.json", path.with_name("tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def built(prefect_harness, session_mlflow, data, checkpoint, tmp_path_factory):
    """The index flow run once over the 24-sample dataset: (index folder, IndexResult)."""
    from flows.index import index

    out = tmp_path_factory.mktemp("index") / "idx"
    result = index(checkpoint=str(checkpoint), data=str(data["small"]), output=str(out))
    return out, result


@pytest.fixture(scope="module")
def search(built) -> SearchIndex:
    return SearchIndex.open(built[0])


def brute_force(index_dir: Path, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    """Keys and scores of the k best images by numpy over the stored vectors."""
    store = EmbeddingStore(str(index_dir))
    names = store.manifest().index.shards
    vectors = store.all_vectors(names)
    keys = [k for n in names for k in store.keys(n).column("key").to_pylist()]
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [keys[i] for i in order], scores[order]


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "embeddings").iterdir())}


# ---- building ----------------------------------------------------------------------------------


def test_index_flow_embeds_every_image_and_caption(built, data, checkpoint):
    out, result = built
    assert (result.vectors, result.kind, result.embedded_shards, result.reused_shards) == (
        24,
        "Flat",
        3,
        0,
    )
    manifest = EmbeddingStore(str(out)).manifest()
    assert [s.status for s in manifest.shards] == ["indexed"] * 3
    assert manifest.dataset_digest == open_dataset(str(data["small"])).digest
    assert manifest.model.model_id == load_clip(checkpoint).model_id

    # the stored vectors are the model's embeddings of the dataset's images and captions
    store, samples = EmbeddingStore(str(out)), list(open_dataset(str(data["small"])).iter_samples())
    embedder = Embedder.of(load_clip(checkpoint), device="cpu")
    keys = [k for n in ("00000", "00001", "00002") for k in store.keys(n).column("key").to_pylist()]
    assert keys == [s.key for s in samples]
    images = store.all_vectors(["00000", "00001", "00002"])
    texts = store.all_vectors(["00000", "00001", "00002"], modality="text")
    assert images.shape == texts.shape == (24, 32)
    np.testing.assert_allclose(images, embedder.images([s.image for s in samples]), atol=1e-5)
    np.testing.assert_allclose(texts, embedder.texts([s.caption for s in samples]), atol=1e-5)

    run = mlflow.get_run(result.mlflow_run_id)
    assert run.data.metrics["vectors"] == 24
    assert run.data.metrics["images_per_s"] > 0
    assert run.data.tags["stage"] == "index"
    assert run.data.params["model_id"] == manifest.model.model_id


def test_rerun_of_a_finished_index_embeds_nothing(built, data, checkpoint):
    from flows.index import index

    out, _ = built
    before = mtimes(out)
    again = index(checkpoint=str(checkpoint), data=str(data["small"]), output=str(out))
    assert (again.embedded_shards, again.reused_shards, again.vectors) == (0, 3, 24)
    assert not again.rebuilt
    assert mtimes(out) == before


def test_interrupted_run_resumes_at_the_first_shard_not_embedded(
    prefect_harness, session_mlflow, data, checkpoint, tmp_path
):
    from prefect import flow

    from flows.index import index
    from tasks.index import embed_shard, plan_index

    out = str(tmp_path / "idx")
    clip, dataset = load_clip(checkpoint), open_dataset(str(data["small"]))
    store = EmbeddingStore(out)

    @flow
    def killed_after_first_shard() -> None:
        # as the index flow does, under the folder's lock and record (the process "dies" here:
        # the record stays open)
        with stage_output(out, stage="index", mode="in_place"):
            manifest = plan_index(dataset, out, clip, "float32")
            first = embed_shard(dataset, out, manifest.shards[0], Embedder.of(clip, device="cpu"))
            shards = [first, *manifest.shards[1:]]
            store.write_manifest(manifest.model_copy(update={"shards": shards}))

    killed_after_first_shard()
    assert store.manifest().counts() == {"pending": 2, "embedded": 1, "indexed": 0}
    with pytest.raises(Exception, match="not built yet"):
        SearchIndex.open(out)
    done = mtimes(tmp_path / "idx")

    result = index(checkpoint=str(checkpoint), data=str(data["small"]), output=out)
    assert (result.embedded_shards, result.reused_shards, result.vectors) == (2, 1, 24)
    assert {k: v for k, v in mtimes(tmp_path / "idx").items() if k in done} == done


def test_grown_dataset_embeds_and_adds_only_its_new_shards(built, data, checkpoint, tmp_path):
    from flows.index import index

    out = tmp_path / "idx"
    shutil.copytree(built[0], out)
    before = mtimes(out)
    result = index(checkpoint=str(checkpoint), data=str(data["grown"]), output=str(out))
    assert (result.embedded_shards, result.reused_shards, result.vectors) == (1, 3, 32)
    assert not result.rebuilt  # the new vectors were added to the existing index
    after = mtimes(out)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"00003.image.npy", "00003.text.npy", "00003.keys.parquet"}

    grown = SearchIndex.open(out)
    query = grown.embed_text("a blue square")
    keys, scores = brute_force(out, query, 32)
    hits = grown.query_text("a blue square", k=32)
    assert [h.key for h in hits] == keys
    np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)


def test_index_kind_is_exact_for_small_sets_and_ivf_for_large_ones():
    assert choose_spec(24).kind == "flat"
    assert choose_spec(100_000).kind == "flat"
    large = choose_spec(1_000_000)
    assert (large.kind, large.nlist, large.nprobe) == ("ivf", 4096, 256)
    assert choose_spec(1000, kind="hnsw").factory() == "HNSW32,Flat"
    with pytest.raises(ValueError, match="not one of auto, flat, ivf, hnsw"):
        choose_spec(10, kind="pq")


def test_embedding_files_round_trip_in_float16_at_half_the_size(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sizes = {}
    for dtype in ("float32", "float16"):
        store = EmbeddingStore(str(tmp_path / dtype))
        keys, captions = [f"k{i}" for i in range(50)], [f"caption {i}" for i in range(50)]
        store.write_shard(
            "00000",
            keys=keys,
            captions=captions,
            image_vectors=vectors,
            text_vectors=vectors,
            dtype=dtype,
        )
        back = store.vectors("00000")
        assert back.dtype == np.float32 and back.shape == (50, 64)
        np.testing.assert_allclose(back, vectors, atol=1e-3 if dtype == "float16" else 0)
        assert store.keys("00000").column("key").to_pylist() == keys
        sizes[dtype] = (tmp_path / dtype / "embeddings" / "00000.image.npy").stat().st_size
    assert sizes["float16"] < 0.6 * sizes["float32"]


def test_an_index_of_another_model_is_refused(built, data, other_checkpoint):
    from flows.index import index

    out, _ = built
    with pytest.raises(ModelMismatchError, match="Write the new index to another folder"):
        index(checkpoint=str(other_checkpoint), data=str(data["small"]), output=str(out))
    other = load_clip(other_checkpoint)
    with pytest.raises(ModelMismatchError, match="not comparable") as error:
        SearchIndex.open(out, clip=other)
    assert other.model_id[:23] in str(error.value)
    assert EmbeddingStore(str(out)).manifest().model.model_id[:23] in str(error.value)


# ---- querying ----------------------------------------------------------------------------------


def test_text_query_returns_the_k_nearest_images_by_cosine(search, built):
    hits = search.query_text("a red circle", k=5)
    keys, scores = brute_force(built[0], search.embed_text("a red circle"), 5)
    assert [h.key for h in hits] == keys
    np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    truth = {key: (caption, f"{i // 8:05d}") for i, (key, _, caption) in enumerate(shapes(24))}
    assert all((h.caption, h.shard) == truth[h.key] for h in hits)


def test_image_query_finds_the_image_itself_first(search):
    key, image, caption = shapes(24)[13]
    hits = search.query_image(image, k=3)
    assert (hits[0].key, hits[0].caption, hits[0].shard) == (key, caption, "00001")
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[1].score < hits[0].score
    assert search.query_image(Image.open(io.BytesIO(image)), k=1)[0].key == key  # PIL works too


def test_text_and_image_query_is_a_weighted_sum_of_normalised_embeddings(search, built):
    _, image, _ = shapes(24)[5]
    text = "a yellow triangle"
    assert search.query(text=text, image=image, weight=1.0, k=24) == search.query_text(text, k=24)
    assert search.query(text=text, image=image, weight=0.0, k=24) == search.query_image(image, k=24)
    t, i = search.embed_text(text), search.embed_image(image)
    mixed = 0.3 * t + 0.7 * i
    keys, scores = brute_force(built[0], mixed / np.linalg.norm(mixed), 24)
    hits = search.query(text=text, image=image, weight=0.3, k=24)
    assert [h.key for h in hits] == keys
    np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)


def test_bad_queries_are_refused_with_a_clear_error(search, caplog):
    jpeg = shapes(1)[0][1]
    for text in ("", "   \n"):
        with pytest.raises(SearchError, match="empty text query"):
            search.query_text(text)
    with pytest.raises(SearchError, match="does not decode"):
        search.query_image(b"this is not an image")
    with pytest.raises(SearchError, match="does not decode"):
        search.query_image(jpeg[: len(jpeg) // 3])  # a truncated JPEG
    with pytest.raises(SearchError, match="0 bytes"):
        search.query_image(b"")
    with pytest.raises(SearchError, match="no query"):
        search.query()
    with pytest.raises(SearchError, match="k must be a positive integer"):
        search.query_text("a red circle", k=0)
    with pytest.raises(SearchError, match=r"weight must lie in \[0, 1\]"):
        search.query(text="a red circle", image=jpeg, weight=1.5)
    # k beyond the index: every image, ranked, and a warning saying so
    with caplog.at_level(logging.WARNING, logger="tasks.search"):
        hits = search.query_text("a red circle", k=1000)
    assert len(hits) == 24 and len({h.key for h in hits}) == 24
    assert "k=1000 is larger than the index (24 vectors)" in caplog.text


def test_openclip_state_dict_loads_with_openai_tokenizer():
    path = Path(__file__).parent / "fixtures" / "openclip" / "vit_tiny" / "state_dict.pt"
    if not path.exists():
        pytest.skip(f"{path} not copied into tests/fixtures yet")
    config = str(path.with_name("config.json"))  # a bare state dict: say which model it is
    clip = load_clip(path, model=config)
    assert clip.tokenizer.vocab_size == 49408  # OpenAI's vocabulary, no tokenizer file needed
    assert (clip.image_size, clip.model.config.embed_dim) == (32, 32)
    assert clip.model_id == load_clip(path, model=config).model_id


def test_cli_prints_a_table_of_hits(search, built, tmp_path, capsys):
    from flows.search import main

    out = str(built[0])
    assert main(["--index", out, "--text", "a green square", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "shard", "key", "caption"]
    assert len(lines) == 4 and lines[1].split()[0] == "1"

    query = tmp_path / "query.jpg"
    key, image, _ = shapes(24)[7]
    query.write_bytes(image)
    assert main(["--index", out, "--image", str(query), "-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[3] == key

    assert main(["--index", out, "--text", " "]) == 2
    assert "empty text query" in capsys.readouterr().err


# ---- the web page ------------------------------------------------------------------------------


def test_web_api_answers_queries_and_refuses_bad_input(search):
    from fastapi.testclient import TestClient

    from tasks.search import create_app

    client = TestClient(create_app(search))
    assert "<form" in client.get("/").text
    assert client.get("/api/info").json()["vectors"] == 24
    body = client.post("/api/search", data={"text": "a red circle", "k": "4"}).json()
    assert len(body["hits"]) == 4 and body["warning"] is None
    first = body["hits"][0]
    thumb = client.get(first["image"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (64, 64)

    key, image, _ = shapes(24)[20]
    files = {"image": ("q.jpg", image, "image/jpeg")}
    assert client.post("/api/search", files=files).json()["hits"][0]["key"] == key
    many = client.post("/api/search", data={"text": "a red circle", "k": "99"}).json()
    assert len(many["hits"]) == 24 and "larger than the index" in many["warning"]

    empty = client.post("/api/search", data={"text": "  "})
    assert empty.status_code == 400 and "empty query" in empty.json()["detail"]
    junk = client.post("/api/search", files={"image": ("q.jpg", b"junk", "image/jpeg")})
    assert junk.status_code == 400 and "does not decode" in junk.json()["detail"]
    assert client.get("/image/00000/no-such-key").status_code == 404
    assert client.get("/image/..%2F..%2Fetc/passwd").status_code == 404


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium + chromium-driver: apt-get install -y chromium chromium-driver",
)
def test_search_page_shows_results_in_headless_chromium(search, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tasks.search import serve_search

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    query_image = tmp_path / "query.jpg"
    key, image, _ = shapes(24)[9]
    query_image.write_bytes(image)

    def results_shown(driver) -> list:
        state = driver.find_element(By.ID, "results").get_attribute("data-state")
        if state == "error":
            raise AssertionError(driver.find_element(By.ID, "message").text)
        return state == "done" and driver.find_elements(By.CSS_SELECTOR, "#results .hit")

    def thumbnails_loaded(driver) -> bool:
        return driver.execute_script(
            "const imgs = [...document.querySelectorAll('#results img')];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"
        )

    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        with serve_search(search) as base_url:
            driver.get(base_url + "/")
            WebDriverWait(driver, 60).until(
                lambda d: "24 images" in d.find_element(By.ID, "info").text
            )
            # a text query
            driver.find_element(By.ID, "text").send_keys("a red circle")
            driver.find_element(By.ID, "go").click()
            hits = WebDriverWait(driver, 60).until(results_shown)
            WebDriverWait(driver, 60).until(thumbnails_loaded)
            assert len(hits) == 12
            first = hits[0].find_element(By.CLASS_NAME, "caption").text
            assert first in {c for _, _, c in shapes(24)}
            text_shot = tmp_path / "search_text.png"
            assert driver.save_screenshot(str(text_shot))

            # an image query: the upload finds the image itself first
            driver.find_element(By.ID, "text").clear()
            driver.find_element(By.ID, "image").send_keys(str(query_image))
            driver.find_element(By.ID, "go").click()
            hits = WebDriverWait(driver, 60).until(results_shown)
            WebDriverWait(driver, 60).until(thumbnails_loaded)
            assert hits[0].get_attribute("data-key") == key
            assert "1.0000" in hits[0].find_element(By.CLASS_NAME, "score").text
            image_shot = tmp_path / "search_image.png"
            assert driver.save_screenshot(str(image_shot))
    finally:
        driver.quit()
    for shot in (text_shot, image_shot):
        assert Image.open(shot).size[0] > 0
        if os.access("/tmp", os.W_OK):
            shutil.copy(shot, Path("/tmp") / shot.name)  # for a person to look at


# ---- quality check -----------------------------------------------------------------------------


def test_recall_through_the_index_equals_the_evaluation_stage(
    prefect_harness, session_mlflow, sample_web, checkpoint, tmp_path
):
    """Text->image recall@k on the held-out sample retrieval set, two code paths: the evaluate
    stage's maths (clip_model.evaluate / retrieval) and queries through the FAISS index."""
    from clip_model.eval_data import read_sample_retrieval
    from clip_model.evaluate import evaluate_retrieval
    from clip_model.retrieval import retrieval_ranks
    from flows.index import index

    data = read_sample_retrieval(Path(sample_web.eval_dir) / "retrieval")
    dataset = tmp_path / "retrieval-dataset"
    with DatasetWriter(str(dataset), stage="test", samples_per_shard=40) as w:
        for i, (path, captions) in enumerate(zip(data.images, data.captions, strict=True)):
            w.write(
                f"r{i:04d}", path.read_bytes(), captions[0], {"captions": captions}, None, "png"
            )
    out = tmp_path / "idx"
    index(checkpoint=str(checkpoint), data=str(dataset), output=str(out), batch_size=32)

    clip = load_clip(checkpoint)
    embedder = Embedder.of(clip, device="cpu", batch_size=32)
    expected = evaluate_retrieval(embedder, data, ks=(1, 5, 10)).metrics

    search = SearchIndex.open(out, clip=clip)
    texts = [c for captions in data.captions for c in captions]
    owners = [f"r{i:04d}" for i, captions in enumerate(data.captions) for _ in captions]
    results = search.query_texts(texts, k=10)
    # where each caption's own image came, through the index (10: not in the top 10)
    position = []
    for owner, hits in zip(owners, results, strict=True):
        keys = [h.key for h in hits]
        position.append(keys.index(owner) if owner in keys else 10)
    position = np.array(position)
    got = {f"image_retrieval_recall@{k}": float(np.mean(position < k)) for k in (1, 5, 10)}
    print(json.dumps({"index": got, "evaluate": expected}))
    assert len(texts) == 300 and len(search) == 100
    for name, value in got.items():
        assert value == expected[name], name

    # and query by query: a caption hits at k through the index iff its rank is below k
    image_features, text_features = embedder.images(data.images), embedder.texts(texts)
    owner_index = torch.tensor([int(o[1:]) for o in owners])
    _, text_rank = retrieval_ranks(image_features, text_features, owner_index)
    for k in (1, 5, 10):
        assert (position < k).tolist() == (text_rank < k).tolist(), k
