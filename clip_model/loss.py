"""CLIP's contrastive loss: symmetric cross-entropy over the N x N scaled cosine similarities.

The paper's figure 3 in code: `logits = scale * I @ T.T`, `labels = arange(n)`,
`loss = (CE(logits, labels) + CE(logits.T, labels)) / 2`. Across ranks every feature is
gathered so each image competes against the texts of the whole global batch.

Distributed semantics (as OpenCLIP's, mlfoundations/open_clip `loss.py`):
- `gather_with_grad=True` gathers with `torch.distributed.nn.functional.all_gather`, whose
  backward sums the gradients every rank computes for a feature and sends them to its owner.
- `local_loss=False`: each rank computes the full global loss (identical on every rank).
- `local_loss=True`: each rank scores only its own rows (images and texts) against all
  columns: O(n x N) instead of O(N^2) logits. The mean of the ranks' losses is the global loss.
In both modes DDP's gradient averaging then yields exactly the gradient of the global loss for a
single process holding the concatenated batch (tests/test_loss.py checks it on 2 ranks).
With `gather_with_grad=False` the gathered copies carry no gradient; only each rank's own slice
does, which is cheaper but not the exact global gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    local_loss: bool,
    gather_with_grad: bool,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's features along the batch (rank order)."""
    if gather_with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(image_features)), torch.cat(all_gather(text_features))
    images = [torch.zeros_like(image_features) for _ in range(world_size)]
    texts = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(images, image_features)
    dist.all_gather(texts, text_features)
    if not local_loss:  # put this rank's own features back, with their gradient
        images[rank], texts[rank] = image_features, text_features
    return torch.cat(images), torch.cat(texts)


class ClipLoss(nn.Module):
    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def labels(self, n: int, device: torch.device, rank: int, world_size: int) -> torch.Tensor:
        """Row i's positive column; cached per device, batch size and offset."""
        offset = n * rank if self.local_loss and world_size > 1 else 0
        key = (device, n, offset)
        if key not in self._labels:
            self._labels[key] = torch.arange(offset, offset + n, device=device)
        return self._labels[key]

    def logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text), rows local or global as the mode says."""
        rank, world_size = _world()
        if world_size == 1:
            logits_per_image = logit_scale * image_features @ text_features.T
            return logits_per_image, logits_per_image.T
        all_images, all_texts = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=rank,
            world_size=world_size,
        )
        if self.local_loss:
            return (
                logit_scale * image_features @ all_texts.T,
                logit_scale * text_features @ all_images.T,
            )
        logits_per_image = logit_scale * all_images @ all_texts.T
        return logits_per_image, logits_per_image.T

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image_features {list(image_features.shape)} and text_features "
                f"{list(text_features.shape)} must have the same shape [N, D]"
            )
        rank, world_size = _world()
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        labels = self.labels(logits_per_image.shape[0], logits_per_image.device, rank, world_size)
        # fp32 softmax: bf16 logits of a 100x scale lose the contrast the loss is about
        loss_image = F.cross_entropy(logits_per_image.float(), labels)
        loss_text = F.cross_entropy(logits_per_text.float(), labels)
        return (loss_image + loss_text) / 2
