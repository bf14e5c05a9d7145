"""The lean data path: uint8 images from the workers, normalised on the device; shared memory
checked before training."""

from __future__ import annotations

import warnings

import pytest
import torch

from clip_model.datamodule import ClipDataModule
from clip_model.shared_memory import SharedMemoryError, batch_bytes, check_shared_memory
from clip_model.tokenizer import get_tokenizer
from clip_model.transforms import eval_transform, train_transform
from tests.test_train import write_shapes


def shapes_module(data: str, *, uint8: bool, **kwargs) -> ClipDataModule:
    return ClipDataModule(
        data,
        tokenizer=get_tokenizer("openai", context_length=16),
        train_transform=train_transform(32, uint8=uint8),
        val_transform=eval_transform(32, uint8=uint8),
        image_size=32,
        batch_size=8,
        workers=2,
        seed=3,
        shuffle_buffer=20,
        **kwargs,
    )


def test_workers_send_uint8_images_that_normalise_to_the_float_path(tmp_path):
    data = write_shapes(tmp_path / "ds", [30, 20, 14])
    lean = shapes_module(data, uint8=True, val_fraction=0.2)
    full = shapes_module(data, uint8=False, val_fraction=0.2)
    for lean_loader, full_loader in (
        (lean.train_dataloader(), full.train_dataloader()),
        (lean.val_dataloader(), full.val_dataloader()),
    ):
        pairs = list(zip(lean_loader, full_loader, strict=True))
        assert pairs
        for small, big in pairs:
            assert small["image"].dtype == torch.uint8 and big["image"].dtype == torch.float32
            on_device = lean.on_after_batch_transfer(small, 0)["image"]
            assert on_device.dtype == torch.float32
            assert torch.equal(on_device, big["image"])  # the same numbers, bit for bit
            assert torch.equal(small["text"], big["text"])


def test_shared_memory_need_is_checked_with_the_settings_named(tmp_path):
    one = batch_bytes(512, 224, 77)
    assert one == 512 * (3 * 224 * 224 + 77 * 8)  # uint8 pixels, int64 tokens
    args = dict(image_size=224, context_length=77, prefetch_factor=4, path=str(tmp_path))
    with pytest.raises(SharedMemoryError, match=r"8 rank\(s\) x workers=8 .*batch_size=10000000"):
        check_shared_memory(batch_size=10**7, workers=8, ranks_on_node=8, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_shared_memory(batch_size=2, workers=1, **args) == 4 * batch_bytes(2, 224, 77)
        assert check_shared_memory(batch_size=10**7, workers=0, **args) == 0  # no workers


def test_persistent_workers_read_each_new_epoch(tmp_path):
    data = write_shapes(tmp_path / "ds", [30, 20, 14])
    dm = shapes_module(data, uint8=True)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    passes = []
    for _ in range(2):  # one loader, its workers kept: the second pass is epoch 1
        batches = [dm.on_before_batch_transfer(b, 0) for b in loader]
        passes.append([(int(b["epoch"]), b["keys"]) for b in batches])
    fresh = shapes_module(data, uint8=True)
    fresh.load_state_dict({"epoch": 1, "batches": 0})
    assert [e for e, _ in passes[0]] == [0] * 8 and [e for e, _ in passes[1]] == [1] * 8
    assert [k for _, k in passes[1]] == [b["keys"] for b in fresh.train_dataloader()]
    assert [k for _, k in passes[0]] != [k for _, k in passes[1]]


def test_training_stops_before_the_first_step_when_shared_memory_is_short(tmp_path):
    from clip_model.train import load_config, train
    from tests.test_train import micro_config

    data = write_shapes(tmp_path / "ds", [20])
    cfg = load_config(micro_config(tmp_path, data, max_steps=1, workers=2, batch_size=10**7))
    with pytest.raises(SharedMemoryError, match=r"workers=2 x prefetch 4 .* batch_size=10000000"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
