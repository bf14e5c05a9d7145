"""Which samples each (rank, worker) slot reads in an epoch: every training sample once.

The epoch's shard order (shuffled per epoch by the caller) is one long sequence of training
samples; slot `s` takes the next `needs[s]` of them, so slots get contiguous ranges that cut
shards wherever the counts fall. No sample is read by two slots and none is left out, whatever
the shard count and sizes: only the tail past `sum(needs)` (less than one global batch, the
DataLoader's `drop_last`) waits for another epoch, and the per-epoch shuffle moves that tail.
A slot whose range starts inside a shard reads that shard's earlier samples undecoded and skips
them: at most one shard's worth of tar reads per slot per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Piece", "ShardRef", "deal"]


@dataclass(frozen=True)
class ShardRef:
    url: str
    name: str
    num_samples: int  # in the tar (the manifest's count)
    split_samples: int = -1  # of those, the split's (training or held-out ones); -1: all of them

    @property
    def in_split(self) -> int:
        return self.num_samples if self.split_samples < 0 else self.split_samples


@dataclass(frozen=True)
class Piece:
    """The split's samples `first <= i < stop` of `shard`, counted in tar order (others skipped)."""

    shard: ShardRef
    first: int
    stop: int


def deal(order: Sequence[ShardRef], needs: Sequence[int]) -> list[list[Piece]]:
    """Slot s's pieces: the next `needs[s]` samples of the split in `order`, slot after slot."""
    total = sum(s.in_split for s in order)
    if sum(needs) > total:
        raise ValueError(f"the slots need {sum(needs)} samples, the shards hold {total}")
    plans: list[list[Piece]] = []
    shards = iter(order)
    shard, offset = None, 0
    for need in needs:
        pieces: list[Piece] = []
        while need > 0:
            if shard is None or offset >= shard.in_split:
                shard, offset = next(shards), 0
                continue
            take = min(need, shard.in_split - offset)
            pieces.append(Piece(shard, offset, offset + take))
            offset += take
            need -= take
        plans.append(pieces)
    return plans
