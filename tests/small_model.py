"""The small CLIP the loss, accumulation and train-step tests build, and random batches for it.

A 16-pixel ViT with one layer per tower and no BatchNorm (splitting a batch changes nothing but
the loss), a 50-id vocabulary: a forward and backward cost milliseconds.
"""

from __future__ import annotations

import torch

SMALL_MODEL = dict(
    name="small-test",
    embed_dim=16,
    image_size=16,
    vision_layers=1,
    vision_width=32,
    vision_patch_size=8,
    vision_head_width=16,
    context_length=8,
    vocab_size=50,
    text_width=32,
    text_heads=2,
    text_layers=1,
    tokenizer="bpe",
)


def random_pairs(n: int, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [n, 3, 16, 16], token ids [n, 8]) for SMALL_MODEL, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    text = torch.randint(1, 48, (n, 8), generator=g)
    text[:, 5] = 49  # [EOS], the highest id
    return images, text
