"""The Embedder of one rank among several: each rank embeds its share of the inputs and every rank
receives all the features, in input order.

    embedder = ShardedEmbedder(model, tokenizer, device=None, batch_size=128, num_workers=4,
                               rank=dist.get_rank(), world_size=dist.get_world_size())
    results = run_suite(embedder, suite)   # the same on every rank, and as one process's

The inputs are cut into contiguous shares of whole batches (rank r: batches r*k ... r*k + k-1),
so every rank runs exactly the batches one process would have run for those inputs: the features
are bitwise those of one process (a row's maths can depend on how many rows share its batch),
and so are the metrics computed from them. Shares are padded to the same length for
`all_gather` (through the model's device: NCCL gathers only GPU tensors) and the padding
dropped. Every rank must embed the same inputs in the same order (the collectives pair up by
call): the same suite everywhere, as the training callback has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from clip_model.embedder import Embedder

__all__ = ["ShardedEmbedder", "share"]


def share(total: int, *, rank: int, world_size: int, batch_size: int) -> range:
    """The input indexes rank `rank` embeds: a contiguous run of whole batches (the last may be
    short, later ranks may have none)."""
    per_rank = math.ceil(math.ceil(total / batch_size) / world_size) * batch_size
    return range(min(rank * per_rank, total), min((rank + 1) * per_rank, total))


class ShardedEmbedder(Embedder):
    """`Embedder` whose `images` and `texts` embed this rank's share and gather every rank's
    (the other methods embed what they are given, on this rank alone)."""

    def __init__(self, *args: Any, rank: int, world_size: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not one of world_size={world_size} ranks")
        self.rank, self.world_size = rank, world_size

    def _share(self, total: int, rank: int | None = None) -> range:
        rank = self.rank if rank is None else rank
        return share(total, rank=rank, world_size=self.world_size, batch_size=self.batch_size)

    def images(self, items: Sequence[Any], *, desc: str | None = None) -> torch.Tensor:
        mine = self._share(len(items))
        return self._gathered(super().images(items[mine.start : mine.stop], desc=desc), len(items))

    def texts(self, texts: Sequence[str], *, desc: str | None = None) -> torch.Tensor:
        mine = self._share(len(texts))
        return self._gathered(super().texts(texts[mine.start : mine.stop], desc=desc), len(texts))

    def _gathered(self, features: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's features [total, D] (float32, CPU), in input order."""
        if self.world_size == 1:
            return features
        width = len(self._share(total, rank=0))  # the longest share
        padded = torch.zeros(width, features.shape[1], dtype=torch.float32, device=self.device)
        padded[: len(features)] = features.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        rows = [part[: len(self._share(total, rank))] for rank, part in enumerate(parts)]
        return torch.cat(rows).cpu()
