"""Validation that scales: its own dataset (default `<data>/val`), read once, in parallel.

Each (rank, worker) slot reads its own range of the validation samples (no rank rescans the
training shards or another rank's share); two ranks simulated by (rank, world_size), real
DataLoader workers.
"""

from __future__ import annotations

from clip_model.datamodule import is_validation_key
from clip_model.train import load_config, validation_data
from storage import open_dataset
from tests.test_train import datamodule, micro_config, write_shapes


def valid_keys(dm) -> tuple[int, list[str]]:
    """(batches, keys of the real, unpadded samples) of one rank's validation pass."""
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k, ok in zip(b["keys"], b["valid"].tolist(), strict=True) if ok]
    return len(batches), keys


def test_a_validation_dataset_is_read_once_across_ranks_and_workers(tmp_path):
    data = write_shapes(tmp_path / "ds", [64, 64])
    val = write_shapes(tmp_path / "ds" / "val", [13, 30, 7], seed=1)
    first_40 = [s.key for s in open_dataset(val).iter_samples()][:40]
    counts, keys = [], []
    for rank in (0, 1):
        dm = datamodule(data, rank=rank, world_size=2, workers=2, val_data=val, val_max_samples=40)
        n, mine = valid_keys(dm)
        counts.append(n)
        keys += mine
    assert counts[0] == counts[1]  # as many batches on every rank: no DDP hang
    assert sorted(keys) == sorted(first_40) and len(keys) == len(set(keys))


def test_a_held_out_split_is_read_once_across_ranks_and_workers(tmp_path):
    data = write_shapes(tmp_path / "ds", [50, 3, 61, 40])
    held_out = [s.key for s in open_dataset(data).iter_samples() if is_validation_key(s.key, 0.3)]
    counts, keys = [], []
    for rank in (0, 1):
        dm = datamodule(data, rank=rank, world_size=2, workers=2, val_fraction=0.3)
        n, mine = valid_keys(dm)
        counts.append(n)
        keys += mine
    assert counts[0] == counts[1]
    assert sorted(keys) == sorted(held_out) and len(keys) == len(set(keys))


def test_fewer_validation_samples_than_slots_still_gives_every_rank_its_batches(tmp_path):
    data = write_shapes(tmp_path / "ds", [64])
    val = write_shapes(tmp_path / "val", [3])
    counts, keys = [], []
    for rank in (0, 1):
        n, mine = valid_keys(datamodule(data, rank=rank, world_size=2, workers=2, val_data=val))
        counts.append(n)
        keys += mine
    assert counts == [2, 2] and len(keys) == 3 == len(set(keys))


def test_the_validation_dataset_defaults_to_the_split_beside_the_training_shards(tmp_path):
    data = write_shapes(tmp_path / "ds", [20])
    cfg = load_config(micro_config(tmp_path, data, max_steps=1))
    assert validation_data(cfg) is None  # none there: val_fraction holds samples out
    val = write_shapes(tmp_path / "ds" / "val", [5])
    assert validation_data(cfg) == val
    other = write_shapes(tmp_path / "other", [5])
    assert validation_data(cfg.model_copy(update={"val_data": other})) == other
