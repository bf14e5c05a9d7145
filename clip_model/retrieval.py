"""Zero-shot image<->text retrieval recall@k, computed in blocks.

Names and meanings follow LAION's CLIP_benchmark (clip_benchmark/metrics/zeroshot_retrieval.py):

- ``image_retrieval_recall@k``: each *text* queries the images; a hit when its image is among the
  k most similar images. Averaged over texts.
- ``text_retrieval_recall@k``: each *image* queries the texts; a hit when any of its captions is
  among the k most similar texts. Averaged over images (an image without captions is a miss).

Similarity is the cosine (features are L2-normalised here). Ties are broken towards the lower
index, so results do not depend on hardware: a query's rank of a target is the number of targets
with a strictly higher similarity plus the number with an equal one and a lower index. A query
hits at k when the rank of its best positive is below k (k above the number of targets: all hit).

Memory: the similarity matrix is computed in `chunk_size` x `chunk_size` blocks, each used for both
directions; only O(images + texts) numbers are kept between blocks, so 100k x 500k never sits in
memory. Two passes over the blocks: the first reads each text's similarity to its own image from
the very block the second pass compares it in (blocks holding no true pair are skipped in the
first pass, so with captions ordered by image it costs little), the second counts what ranks
ahead of the positives.

Several ranks: recall over a shard of the data is not recall over the data, so every query must
see every target. Gather features first (`gather_retrieval_features` under torch.distributed, or
`concat_parts` for parts already in one process) and pass the gathered tensors here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

NO_RANK = torch.iinfo(torch.long).max  # rank of a query without any positive: never a hit


def _check_inputs(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor
) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D [N, D]; got image {tuple(image_features.shape)}, "
            f"text {tuple(text_features.shape)}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image features have dimension {image_features.shape[1]}, text features "
            f"{text_features.shape[1]}; they must match"
        )
    if text_to_image.ndim != 1 or text_to_image.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"text_to_image: expected shape [{text_features.shape[0]}] (one image index per "
            f"text), got {tuple(text_to_image.shape)}"
        )
    n_images = image_features.shape[0]
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(
            f"text_to_image: values must lie in [0, {n_images}) for {n_images} images; got min "
            f"{int(text_to_image.min())}, max {int(text_to_image.max())}"
        )
    if n_images == 0 or text_features.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one text")


def _blocks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


@torch.no_grad()
def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the positives: (per image [N_img], per text [N_txt]), 0-based, int64.

    Per image: rank among all texts of its best caption (`NO_RANK` without captions).
    Per text: rank among all images of its image. Features may be on any device; the work runs
    there, the ranks come back on the CPU.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    _check_inputs(image_features, text_features, text_to_image)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = image_features.device
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.to(device).float(), dim=-1)
    t2i = text_to_image.to(device)
    n_img, n_txt = images.shape[0], texts.shape[0]
    image_blocks, text_blocks = _blocks(n_img, chunk_size), _blocks(n_txt, chunk_size)

    # Pass 1: each text's similarity to its own image, read from the block pass 2 will use.
    positive = torch.empty(n_txt, device=device)
    for t0, t1 in text_blocks:
        owners = t2i[t0:t1]
        for i0, i1 in image_blocks:
            inside = (owners >= i0) & (owners < i1)
            if not inside.any():
                continue
            sim = images[i0:i1] @ texts[t0:t1].t()
            cols = inside.nonzero().squeeze(1)
            positive[t0 + cols] = sim[owners[cols] - i0, cols]

    # An image's best caption: highest similarity, then lowest text index.
    best = torch.full((n_img,), float("-inf"), device=device)
    best.scatter_reduce_(0, t2i, positive, reduce="amax")
    text_index = torch.arange(n_txt, device=device)
    is_best = positive == best[t2i]
    best_text = torch.full((n_img,), n_txt, dtype=torch.long, device=device)
    best_text.scatter_reduce_(0, t2i[is_best], text_index[is_best], reduce="amin")
    has_caption = best_text < n_txt

    # Pass 2: count, per query, the targets ranked ahead of its positive.
    image_rank = torch.zeros(n_img, dtype=torch.long, device=device)
    text_rank = torch.zeros(n_txt, dtype=torch.long, device=device)
    for t0, t1 in text_blocks:
        owners, pos = t2i[t0:t1], positive[t0:t1]
        cols = text_index[t0:t1]
        for i0, i1 in image_blocks:
            sim = images[i0:i1] @ texts[t0:t1].t()
            rows = torch.arange(i0, i1, device=device)
            # image queries (rows) against texts (columns)
            b, bt = best[i0:i1, None], best_text[i0:i1, None]
            ahead = (sim > b) | ((sim == b) & (cols[None, :] < bt))
            image_rank[i0:i1] += ahead.sum(dim=1)
            # text queries (columns) against images (rows)
            ahead = (sim > pos[None, :]) | ((sim == pos[None, :]) & (rows[:, None] < owners))
            text_rank[t0:t1] += ahead.sum(dim=0)
    image_rank[~has_caption] = NO_RANK
    return image_rank.cpu(), text_rank.cpu()


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Fraction of queries whose best positive ranks below k."""
    return float((ranks < k).double().mean())


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 2048,
) -> dict[str, float]:
    """{"image_retrieval_recall@k", "text_retrieval_recall@k"} for each k in `ks`.

    `text_to_image[j]` is the index of the image text j describes; an image may have several
    texts. Pass features gathered from every rank (see the module docstring).
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {list(ks)}")
    image_rank, text_rank = retrieval_ranks(
        image_features, text_features, text_to_image, chunk_size=chunk_size
    )
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = recall_at_k(text_rank, k)
        metrics[f"text_retrieval_recall@{k}"] = recall_at_k(image_rank, k)
    return metrics


def concat_parts(
    parts: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Join (image_features, text_features, text_to_image) parts into one set.

    Each part's `text_to_image` indexes that part's own images; the result's indexes the joined
    images (offset by the images of the parts before it).
    """
    images, texts, owners, offset = [], [], [], 0
    for image_features, text_features, text_to_image in parts:
        images.append(image_features)
        texts.append(text_features)
        owners.append(torch.as_tensor(text_to_image, dtype=torch.long) + offset)
        offset += image_features.shape[0]
    if not images:
        raise ValueError("concat_parts: no parts")
    return torch.cat(images), torch.cat(texts), torch.cat(owners)


def _all_gather_rows(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """all_gather of tensors whose first dimension differs between ranks (padded to the max)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return [g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)]


def gather_retrieval_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's features joined in rank order (a collective: call it on every rank).

    `text_to_image` holds indexes into this rank's own images; shards may differ in size. With
    torch.distributed not initialised this returns the inputs unchanged.
    """
    import torch.distributed as dist

    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=text_features.device)
    if not (dist.is_available() and dist.is_initialized()):
        return image_features, text_features, text_to_image
    return concat_parts(
        zip(
            _all_gather_rows(image_features, group),
            _all_gather_rows(text_features, group),
            _all_gather_rows(text_to_image, group),
            strict=True,
        )
    )


@torch.no_grad()
def topk_texts_for_images(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    k: int = 5,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar texts of each image: (cosine similarities [N_img, k], indexes).

    Computed in blocks like the metrics; ordered by similarity, then by lower text index (exact
    ties included). Each block is sorted, so this is meant for a few query images (the examples
    grid), not for recall over a whole benchmark.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = image_features.device
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.to(device).float(), dim=-1)
    k = min(k, texts.shape[0])
    all_scores, all_index = [], []
    for i0, i1 in _blocks(images.shape[0], chunk_size):
        scores = torch.empty(i1 - i0, 0, device=device)
        index = torch.empty(i1 - i0, 0, dtype=torch.long, device=device)
        for t0, t1 in _blocks(texts.shape[0], chunk_size):
            sim = images[i0:i1] @ texts[t0:t1].t()
            top, where = torch.sort(sim, dim=1, descending=True, stable=True)
            # earlier blocks hold lower indexes: a stable sort keeps them first among equals
            scores = torch.cat([scores, top[:, :k]], dim=1)
            index = torch.cat([index, where[:, :k] + t0], dim=1)
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
            scores, index = scores.gather(1, order), index.gather(1, order)
        all_scores.append(scores.cpu())
        all_index.append(index.cpu())
    return torch.cat(all_scores), torch.cat(all_index)
