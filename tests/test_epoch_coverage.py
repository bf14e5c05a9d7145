"""Every training sample once per epoch, whatever the shard count (clip_model/shard_plan.py).

Real shards, real DataLoader worker processes, two ranks simulated by (rank, world_size): the
shard counts below do not divide 2 ranks x 2 workers = 4 slots (more shards, fewer shards, and
uneven sizes), which is where dealing whole shards to slots repeated some samples and skipped
others.
"""

from __future__ import annotations

import pytest

from clip_model.datamodule import is_validation_key
from clip_model.shard_plan import ShardRef, deal
from storage import open_dataset
from tests.test_train import datamodule, write_shapes

GLOBAL_BATCH = 2 * 8  # datamodule(): batch 8 per rank


def epoch_keys(data: str, epoch: int, **kwargs) -> list[str]:
    """The keys both ranks' loaders hand to the model in `epoch`, in order."""
    keys: list[str] = []
    for rank in (0, 1):
        dm = datamodule(data, rank=rank, world_size=2, workers=2, **kwargs)
        dm.load_state_dict({"epoch": epoch, "batches": 0})
        for batch in dm.train_dataloader():
            assert len(batch["keys"]) == 8
            keys += batch["keys"]
    return keys


@pytest.mark.parametrize(
    "sizes",
    [
        [40, 40, 40, 40, 40],  # 5 shards over 4 slots
        [70, 70, 61],  # fewer shards than slots
        [12, 20, 36, 124, 9, 3, 17],  # 7 uneven shards
    ],
)
def test_every_sample_is_read_once_per_epoch_whatever_the_shard_count(tmp_path, sizes):
    data = write_shapes(tmp_path / "ds", sizes)
    every = {s.key for s in open_dataset(data).iter_samples()}
    left_out = []
    for epoch in (0, 1):
        keys = epoch_keys(data, epoch)
        assert len(keys) == len(set(keys)), "a sample repeated within an epoch"
        # only the tail short of one global batch waits for another epoch (drop_last)
        assert len(keys) == len(every) // GLOBAL_BATCH * GLOBAL_BATCH
        assert set(keys) <= every
        left_out.append(every - set(keys))
    assert left_out[0] != left_out[1] or not left_out[0]  # the left-out tail moves per epoch


def test_a_held_out_split_is_never_trained_on_and_the_rest_is_read_once(tmp_path):
    data = write_shapes(tmp_path / "ds", [30, 50, 41, 77, 5])
    keys = epoch_keys(data, 0, val_fraction=0.2)
    held_out = {s.key for s in open_dataset(data).iter_samples() if is_validation_key(s.key, 0.2)}
    assert held_out and not held_out & set(keys)
    assert len(keys) == len(set(keys))
    train_samples = datamodule(data, val_fraction=0.2).train_samples
    assert train_samples == 203 - len(held_out)
    assert len(keys) == train_samples // GLOBAL_BATCH * GLOBAL_BATCH


def test_deal_cuts_shards_at_exact_counts():
    shards = [ShardRef(f"{n}.tar", str(n), size) for n, size in enumerate([5, 3, 9])]
    plans = deal(shards, [4, 4, 4, 4])
    assert [[(p.shard.name, p.first, p.stop) for p in plan] for plan in plans] == [
        [("0", 0, 4)],
        [("0", 4, 5), ("1", 0, 3)],
        [("2", 0, 4)],
        [("2", 4, 8)],
    ]
    with pytest.raises(ValueError, match="need 18 samples, the shards hold 17"):
        deal(shards, [9, 9])
