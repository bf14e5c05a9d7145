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

import math

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
        # how many texts each image was scored against in the last call: the global batch the
        # loss really saw (all ranks' features gathered), logged as train/global_batch
        self.last_global_batch = 0

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
        self.last_global_batch = text_features.shape[0] * world_size
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


# ---- SigLIP ---------------------------------------------------------------------------------


def _exchange(
    tensor: torch.Tensor, *, send_to: list[int], recv_from: list[int]
) -> list[torch.Tensor]:
    """Send `tensor` to each rank of `send_to` and receive one tensor like it from each of
    `recv_from`, all at once (point-to-point, so no rank holds more than its neighbours' chunks)."""
    tensor = tensor.contiguous()
    received = [torch.empty_like(tensor) for _ in recv_from]
    ops = [dist.P2POp(dist.isend, tensor, peer) for peer in send_to]
    ops += [
        dist.P2POp(dist.irecv, buf, peer) for buf, peer in zip(received, recv_from, strict=True)
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Features from the rank on one side; their gradient goes back the way they came."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
        ctx.send_to, ctx.recv_from = send_to, recv_from
        return _exchange(tensor, send_to=[send_to], recv_from=[recv_from])[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _NeighbourExchange.apply(grad, ctx.recv_from, ctx.send_to), None, None


class _BidirectionalExchange(torch.autograd.Function):
    """(from the left, from the right) in one round of messages, with the gradient's way back."""

    @staticmethod
    def forward(ctx, to_left: torch.Tensor, to_right: torch.Tensor, left: int, right: int):
        ctx.left, ctx.right = left, right
        from_left, from_right = torch.empty_like(to_right), torch.empty_like(to_left)
        ops = [
            dist.P2POp(dist.isend, to_left.contiguous(), left),
            dist.P2POp(dist.isend, to_right.contiguous(), right),
            dist.P2POp(dist.irecv, from_left, left),
            dist.P2POp(dist.irecv, from_right, right),
        ]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        return from_left, from_right

    @staticmethod
    def backward(ctx, grad_from_left: torch.Tensor, grad_from_right: torch.Tensor):
        # what came from the left goes back left, and the left neighbour's gradient for the
        # chunk it sent right comes from us: the same exchange with the gradients
        to_left, to_right = _BidirectionalExchange.apply(
            grad_from_left, grad_from_right, ctx.left, ctx.right
        )
        return to_left, to_right, None, None


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
    Pre-Training", https://arxiv.org/abs/2303.15343), with its learnable bias.

    loss = -1/n sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z_ii = 1 and z_ij = -1 otherwise, n the
    images of this rank. Every pair is an independent binary problem, so no softmax needs the whole
    global batch at once: each rank scores its images against its own texts, then against the
    texts of the other ranks passed round a ring in chunks (both ways at once, the paper's
    "chunked" implementation, as OpenCLIP's `SigLipLoss(dist_impl="bidir")`). Each rank's loss
    sums its images' rows; their mean over ranks (what DDP's gradient averaging optimises) is the
    single-process loss over the global batch. The exchange carries gradients back to the owner
    of each text chunk. Init as the paper: t = exp(logit_scale) = 10, b = -10.
    """

    INIT_LOGIT_SCALE = math.log(10.0)
    INIT_LOGIT_BIAS = -10.0

    def __init__(self):
        super().__init__()
        self.logit_bias = nn.Parameter(torch.tensor(self.INIT_LOGIT_BIAS))
        self.last_global_batch = 0  # texts each image met in the last call (all ranks')

    def _pairs(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        positives: bool,
    ) -> torch.Tensor:
        logits = (logit_scale * images @ texts.T + logit_bias).float()
        signs = -torch.ones_like(logits)
        if positives:
            signs.fill_diagonal_(1.0)
        return -F.logsigmoid(signs * logits).sum()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`logit_bias` None: this loss's own learnable bias (a caller passes its detached value
        where the bias must get no gradient, as OpenCLIP's accumulation does for the scale)."""
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image_features {list(image_features.shape)} and text_features "
                f"{list(text_features.shape)} must have the same shape [N, D]"
            )
        bias = self.logit_bias if logit_bias is None else logit_bias
        n = image_features.shape[0]
        total = self._pairs(image_features, text_features, logit_scale, bias, positives=True)
        rank, world_size = _world()
        self.last_global_batch = text_features.shape[0] * world_size
        if world_size > 1:
            left, right = (rank - 1) % world_size, (rank + 1) % world_size
            to_left = to_right = text_features
            rounds, odd = divmod(world_size - 1, 2)
            for _ in range(rounds):  # each round brings the next chunk from either side
                from_left, from_right = _BidirectionalExchange.apply(to_left, to_right, left, right)
                for chunk in (from_left, from_right):
                    total = total + self._pairs(image_features, chunk, logit_scale, bias, False)
                to_left, to_right = from_right, from_left  # passed on round the ring
            if odd:  # an even world: the one chunk left is opposite, reached from one side
                chunk = _NeighbourExchange.apply(to_right, right, left)
                total = total + self._pairs(image_features, chunk, logit_scale, bias, False)
        return total / n
