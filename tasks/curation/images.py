"""CLIP scoring for curation: the cosine of an image and its caption under a CLIP model.

The image pass that calls it, one shard at a time in the engine's workers, is
tasks/curation/scan.py.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from tasks.curation.spec import ClipScore

__all__ = ["ClipScorer"]

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
