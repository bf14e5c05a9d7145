"""The image pass: decode every surviving sample once, hash it, and score it with CLIP.

Images decode with clip_model.images. A sample whose image does not decode, whose caption or
metadata does not read (storage.dataset.SampleError), whose shard is corrupt, or which is missing
from its tar is reported (reason `undecodable`; a pixel bomb,
`too_large`) instead of stopping the run. Decoding runs in torch DataLoader
workers (shards split between them); CLIP runs in the main process in batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from clip_model.images import ImageDecodeError, decode_image
from storage import Dataset, DatasetError, SampleError, read_shard
from storage.fs import join
from tasks.curation.near_dup import THUMB_BYTES, phash64, thumbnail
from tasks.curation.spec import ClipScore

__all__ = ["ClipScorer", "ImageFeatures", "scan_images"]

log = logging.getLogger(__name__)


class ClipScorer:
    """Cosine similarity of (image, caption) pairs under a CLIP model of `clip_model`."""

    def __init__(self, cfg: ClipScore):
        from clip_model import create_model, get_tokenizer
        from clip_model.checkpoint import load_clip
        from clip_model.embedder import Embedder

        tokenizer = cfg.tokenizer
        if cfg.checkpoint is not None:
            # this project's checkpoint finds its own tokenizer; OpenAI/OpenCLIP use OpenAI's;
            # `model` says the architecture of weights that do not say it themselves
            clip = load_clip(
                cfg.checkpoint,
                tokenizer=cfg.tokenizer,
                model=cfg.model,
                allow_torchscript=cfg.allow_torchscript,
            )
            self.model = clip.model
            tokenizer = str(getattr(clip.tokenizer, "path", None) or "openai")
        else:
            name = cfg.model or "tiny"
            log.warning("clip_score: no checkpoint; %r has RANDOM weights (benchmarks only)", name)
            self.model = create_model(name)
        if tokenizer is None:
            if self.model.config.tokenizer != "openai":
                raise ValueError(
                    f"clip_score: model {self.model.config.name!r} uses a trained BPE tokenizer; "
                    "give its file as clip_score.tokenizer"
                )
            tokenizer = "openai"
        self.tokenizer = get_tokenizer(tokenizer, context_length=self.model.config.context_length)
        # the scan shows its own bar (decode + clip), so the embedder shows none
        self.embedder = Embedder(
            self.model,
            self.tokenizer,
            device=cfg.device,
            precision=cfg.precision,
            batch_size=cfg.batch_size,
            progress=False,
        )
        self.transform = self.embedder.transform  # runs in the scan's workers
        self.image_size = self.embedder.image_size
        self.batch_size = cfg.batch_size

    def score(self, images: torch.Tensor, captions: list[str]) -> np.ndarray:
        """Cosine of each (transformed image, caption) pair."""
        return self.embedder.pairs(images, captions)


@dataclass
class ImageFeatures:
    """Per requested row: decoded?, why not (reason, error), pHash, CLIP score (NaN where not
    computed)."""

    ok: np.ndarray
    reason: np.ndarray  # clip_model.images.REASONS, None where decoded
    error: np.ndarray
    phash: np.ndarray
    thumbs: np.ndarray  # [N, 48] uint8 colour thumbnails (zeros where not decoded)
    clip_score: np.ndarray
    widths: np.ndarray
    heights: np.ndarray


class _ShardScan(IterableDataset):
    """Yields (row, (reason, error) or None, phash, thumbnail, width, height, tensor) per wanted
    sample."""

    def __init__(
        self,
        jobs: list[tuple[str, dict[str, int], str | None]],
        want_phash: bool,
        transform: Callable | None,
        min_size: int,
    ):
        self.jobs, self.want_phash, self.transform, self.min_size = (
            jobs,
            want_phash,
            transform,
            min_size,
        )

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id :: info.num_workers]
        for tar_url, wanted, shard_problem in jobs:
            yield from self._scan(tar_url, wanted, shard_problem)

    def _scan(self, tar_url: str, wanted: dict[str, int], problem: str | None) -> Iterator[tuple]:
        seen: set[str] = set()
        bad: dict[str, SampleError] = {}  # caption not UTF-8, metadata not JSON, no image
        if problem is None:
            try:
                for sample in read_shard(tar_url, lambda e: bad.setdefault(e.key, e)):
                    row = wanted.get(sample.key)
                    if row is None or sample.key in seen:
                        continue
                    seen.add(sample.key)
                    yield self._features(row, sample.key, sample.image)
            except DatasetError as e:
                problem = f"corrupt shard: {e}"
        for key, row in wanted.items():
            if key not in seen:
                why = str(bad[key]) if key in bad else problem or f"sample missing from {tar_url}"
                yield (row, ("undecodable", why), 0, None, 0, 0, None)

    def _features(self, row: int, key: str, data: bytes) -> tuple:
        try:
            image = decode_image(data, key, draft_size=self.min_size)
        except ImageDecodeError as e:
            return (row, (e.reason, e.detail), 0, None, 0, 0, None)
        try:
            h = phash64(image) if self.want_phash else 0
            thumb = thumbnail(image) if self.want_phash else None
            tensor = self.transform(image) if self.transform is not None else None
        except Exception as e:  # noqa: BLE001  (any decoder failure is this sample's, not the run's)
            why = f"cannot decode image: {type(e).__name__}: {e}"[:300]
            return (row, ("undecodable", why), 0, None, 0, 0, None)
        return (row, None, h, thumb, image.width, image.height, tensor)


def _collate(items: list[tuple]) -> list[tuple]:
    return items


def scan_images(
    ds: Dataset,
    rows: pa.Table,
    *,
    want_phash: bool,
    scorer: ClipScorer | None = None,
    bad_shards: dict[str, str] | None = None,
    workers: int = 0,
    progress: bool = True,
) -> ImageFeatures:
    """Decode the samples listed in `rows` (columns key, shard, caption) from their shards."""
    n = rows.num_rows
    keys = rows.column("key").to_pylist()
    shards = rows.column("shard").to_pylist()
    captions = [c or "" for c in rows.column("caption").to_pylist()]
    by_shard: dict[str, dict[str, int]] = {}
    for i, (key, shard) in enumerate(zip(keys, shards, strict=True)):
        by_shard.setdefault(shard, {})[key] = i
    bad_shards = bad_shards or {}
    jobs = [
        (join(ds.url, f"{s}.tar"), wanted, bad_shards.get(s))
        for s, wanted in sorted(by_shard.items())
    ]
    min_size = scorer.image_size if scorer is not None else 64
    scan = _ShardScan(jobs, want_phash, scorer.transform if scorer else None, min_size)
    batch = scorer.batch_size if scorer is not None else 256
    workers = min(workers, len(jobs))
    loader = DataLoader(
        scan,
        batch_size=batch,
        collate_fn=_collate,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
    out = ImageFeatures(
        ok=np.zeros(n, bool),
        reason=np.full(n, None, dtype=object),
        error=np.full(n, None, dtype=object),
        phash=np.zeros(n, np.uint64),
        thumbs=np.zeros((n, THUMB_BYTES), np.uint8),
        clip_score=np.full(n, np.nan, np.float32),
        widths=np.zeros(n, np.int64),
        heights=np.zeros(n, np.int64),
    )
    seen = np.zeros(n, bool)
    with tqdm(total=n, desc="decode" + (" + clip" if scorer else ""), disable=not progress) as bar:
        for items in loader:
            good: list[Any] = []
            for row, failure, h, thumb, w, ht, tensor in items:
                seen[row] = True
                if failure is not None:
                    out.reason[row], out.error[row] = failure
                else:
                    out.ok[row], out.phash[row], out.widths[row], out.heights[row] = True, h, w, ht
                    if thumb is not None:
                        out.thumbs[row] = thumb
                    if tensor is not None:
                        good.append((row, tensor))
            if scorer is not None and good:
                idx = [r for r, _ in good]
                scores = scorer.score(torch.stack([t for _, t in good]), [captions[r] for r in idx])
                out.clip_score[idx] = scores
            bar.update(len(items))
    if not seen.all():  # every wanted row is answered by _ShardScan; anything else is a bug
        raise RuntimeError(f"image pass lost {(~seen).sum()} samples")
    return out
