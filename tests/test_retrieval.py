"""Retrieval recall@k: hand-computed cases, a brute-force reference, chunks, parts and ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_model.retrieval import (
    NO_RANK,
    concat_parts,
    gather_retrieval_features,
    retrieval_metrics,
    retrieval_ranks,
    topk_texts_for_images,
)


def unit(*degrees: float) -> torch.Tensor:
    """2-D unit vectors at the given angles: similarities are cosines of angle differences."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


def brute_force_metrics(images, texts, text_to_image, ks):
    """The full similarity matrix, ranked by a stable sort (ties: lower index first)."""
    sim = F.normalize(texts.double(), dim=-1) @ F.normalize(images.double(), dim=-1).t()
    text_hits, image_hits = {}, {}
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices  # text -> images
    rank_of_image = (order == text_to_image[:, None]).float().argmax(dim=1)
    order_t = torch.sort(sim.t(), dim=1, descending=True, stable=True).indices  # image -> texts
    for k in ks:
        text_hits[k] = (rank_of_image < k).double().mean().item()
        hit = [(text_to_image[order_t[i, :k]] == i).any().item() for i in range(len(images))]
        image_hits[k] = sum(hit) / len(hit)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = text_hits[k]
        out[f"text_retrieval_recall@{k}"] = image_hits[k]
    return out


def random_set(n_images=37, captions=(1, 2, 3, 5), dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, dim, generator=g)
    counts = [captions[i % len(captions)] for i in range(n_images)]
    text_to_image = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    # captions near their image, so recall is neither 0 nor 1
    texts = images[text_to_image] + 1.5 * torch.randn(len(text_to_image), dim, generator=g)
    perm = torch.randperm(len(text_to_image), generator=g)  # captions not grouped by image
    return images, texts[perm], text_to_image[perm]


def test_hand_computed_recall_with_several_captions_per_image():
    # Images at 0, 90 and 180 degrees; captions of image 0 at 10 and 100 degrees, of image 1 at
    # 165, of image 2 at 175. Similarity = cos(angle between).
    images = unit(0, 90, 180)
    texts = unit(10, 100, 165, 175)
    text_to_image = torch.tensor([0, 0, 1, 2])
    # Text queries rank the images: 10 -> 0, 90, 180: its image first (rank 0); 100 -> 90, 180,
    # 0: rank 2; 165 -> 180, 90, 0: rank 1; 175 -> 180 first: rank 0.
    # Image queries rank the texts: 0 -> 10, 100, 165, 175: caption 10 at rank 0; 90 -> 100,
    # 165, 10, 175: its caption 165 at rank 1; 180 -> 175, 165, 100, 10: rank 0.
    image_rank, text_rank = retrieval_ranks(images, texts, text_to_image, chunk_size=2)
    assert text_rank.tolist() == [0, 2, 1, 0]
    assert image_rank.tolist() == [0, 1, 0]
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 3), chunk_size=2)
    assert metrics == {
        "image_retrieval_recall@1": 2 / 4,
        "text_retrieval_recall@1": 2 / 3,
        "image_retrieval_recall@2": 3 / 4,
        "text_retrieval_recall@2": 1.0,
        "image_retrieval_recall@3": 1.0,
        "text_retrieval_recall@3": 1.0,
    }


def test_ties_rank_the_lower_index_first():
    # images 0 and 1 are the same vector; the caption of image 1 ties with image 0 and loses,
    # the caption of image 0 ties with image 1 and wins. Texts 0 and 1 are the same vector too.
    images = unit(0, 0, 90)
    texts = unit(0, 0, 90)
    text_to_image = torch.tensor([1, 0, 2])
    image_rank, text_rank = retrieval_ranks(images, texts, text_to_image, chunk_size=1)
    assert text_rank.tolist() == [1, 0, 0]
    # image 0's caption is text 1, tied with text 0 (lower index): rank 1; image 1's caption is
    # text 0: rank 0.
    assert image_rank.tolist() == [1, 0, 0]
    assert retrieval_metrics(images, texts, text_to_image, ks=(1,))["image_retrieval_recall@1"] == (
        2 / 3
    )


def test_k_above_the_number_of_targets_counts_every_query_as_a_hit():
    images, texts, text_to_image = random_set(n_images=4, captions=(1,))
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(10,))
    assert metrics == {"image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0}


def test_an_image_without_captions_is_a_text_retrieval_miss():
    images = unit(0, 90, 180)
    texts = unit(0, 180)
    text_to_image = torch.tensor([0, 2])  # image 1 has no caption
    image_rank, _ = retrieval_ranks(images, texts, text_to_image)
    assert image_rank.tolist() == [0, NO_RANK, 0]
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 5))
    assert metrics["text_retrieval_recall@5"] == 2 / 3
    assert metrics["image_retrieval_recall@1"] == 1.0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 10_000])
def test_blocked_computation_matches_the_full_matrix(chunk_size):
    images, texts, text_to_image = random_set()
    expected = brute_force_metrics(images, texts, text_to_image, ks=(1, 5, 10))
    got = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), chunk_size=chunk_size)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got["image_retrieval_recall@1"] < got["image_retrieval_recall@10"] < 1


def test_features_are_cosine_compared_whatever_their_norm():
    images, texts, text_to_image = random_set(seed=3)
    scale = torch.rand(len(images), 1) * 10 + 0.1
    assert retrieval_metrics(images * scale, texts, text_to_image) == retrieval_metrics(
        images, texts, text_to_image
    )


def test_parts_joined_give_the_metrics_of_the_whole():
    images, texts, text_to_image = random_set(n_images=30, seed=1)
    # split by image: each part holds its images and their captions, indexes local to it
    parts = []
    for lo, hi in [(0, 7), (7, 8), (8, 30)]:
        mine = (text_to_image >= lo) & (text_to_image < hi)
        parts.append((images[lo:hi], texts[mine], text_to_image[mine] - lo))
    joined = concat_parts(parts)
    whole = retrieval_metrics(images, texts, text_to_image)
    assert retrieval_metrics(*joined) == pytest.approx(whole, abs=1e-12)
    # a single part alone is a different (easier) problem: the reason to gather first
    alone = retrieval_metrics(*parts[0])
    assert alone != whole


def _gather_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        images, texts, text_to_image = random_set(n_images=30, seed=1)
        bounds = [(0, 11), (11, 30)][rank]  # uneven shards
        mine = (text_to_image >= bounds[0]) & (text_to_image < bounds[1])
        gathered = gather_retrieval_features(
            images[bounds[0] : bounds[1]], texts[mine], text_to_image[mine] - bounds[0]
        )
        torch.save(retrieval_metrics(*gathered), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_features_gathered_across_ranks_give_the_metrics_of_the_whole(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "metrics")
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    whole = retrieval_metrics(*random_set(n_images=30, seed=1))
    for rank in range(2):
        assert torch.load(f"{out}.{rank}") == pytest.approx(whole, abs=1e-12)


def test_gather_without_a_process_group_returns_the_inputs():
    images, texts, text_to_image = random_set(n_images=5)
    got = gather_retrieval_features(images, texts, text_to_image)
    assert got[0] is images and got[1] is texts and torch.equal(got[2], text_to_image)


def test_bad_inputs_are_named():
    images, texts, text_to_image = random_set(n_images=5)
    with pytest.raises(ValueError, match=r"text_to_image: values must lie in \[0, 5\)"):
        retrieval_metrics(images, texts, torch.full_like(text_to_image, 5))
    with pytest.raises(ValueError, match="text_to_image: expected shape"):
        retrieval_metrics(images, texts, text_to_image[:-1])
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(images[:, :3], texts, text_to_image)


@pytest.mark.parametrize("chunk_size", [2, 5, 1000])
def test_topk_texts_for_images_are_the_most_similar_texts_in_order(chunk_size):
    images, texts, _ = random_set(n_images=9, seed=2)
    scores, index = topk_texts_for_images(images, texts, k=5, chunk_size=chunk_size)
    sim = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).t()
    expected = torch.sort(sim, dim=1, descending=True, stable=True)
    assert torch.equal(index, expected.indices[:, :5])
    assert torch.allclose(scores, expected.values[:, :5])


@pytest.mark.parametrize("chunk_size", [1, 2, 1000])
def test_topk_texts_break_exact_ties_towards_the_lower_index(chunk_size):
    texts = unit(90, 0, 45, 0, 0, 90)  # texts 1, 3, 4 tie, and 0, 5
    scores, index = topk_texts_for_images(unit(0, 90), texts, k=4, chunk_size=chunk_size)
    assert index.tolist() == [[1, 3, 4, 2], [0, 5, 2, 1]]


def test_topk_texts_with_fewer_texts_than_k_returns_them_all():
    scores, index = topk_texts_for_images(unit(0, 90), unit(80, 0, 45), k=5)
    assert index.tolist() == [[1, 2, 0], [0, 2, 1]]
