"""The training step's bookkeeping: every step's logged values are that step's own, and between
reads (every log_every steps) nothing in the step turns a tensor into a Python value.

On a GPU such a read (`float(loss)`, `.item()`, `int(batch["index"])`) waits for the device to
finish the step; on this CPU it costs nothing, so the test watches for the reads themselves with a
TorchFunctionMode (which sees `Tensor.item`, `__float__`, `__int__`, `__bool__`, `tolist`...).
It fails on the step as it was (`float(loss)`, the token-id range check's `int(text.min())`).
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from clip_model.lightning_module import ClipLightningModule
from clip_model.loss import ClipLoss
from clip_model.model import create_model
from tests.small_model import SMALL_MODEL as MODEL

STEPS, BATCH, LOG_EVERY = 5, 4, 2
HOST_READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy"}


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(STEPS):
        text = torch.randint(1, 48, (BATCH, 8), generator=g)
        text[:, 5] = 49
        out.append({"image": torch.randn(BATCH, 3, 16, 16, generator=g), "text": text})
    return out


class _HostReads(TorchFunctionMode):
    """Each tensor-to-Python read, with the number of the batch (= step) in progress."""

    def __init__(self):
        super().__init__()
        self.batch, self.reads = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append((self.batch, name))
        return func(*args, **(kwargs or {}))


class _Watch(L.Callback):
    """Watches from the first batch to the end of the loop (the module's final read is after)."""

    def on_train_batch_start(self, trainer, *args) -> None:
        if not hasattr(self, "mode"):
            self.mode = _HostReads()
            self.mode.__enter__()
        self.mode.batch += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.mode.__exit__(None, None, None)


def test_every_step_is_logged_with_its_own_values_and_read_only_every_log_every_steps(tmp_path):
    torch.manual_seed(0)
    # lr 0: the model never changes, so each step's loss is its batch's loss under the initial model
    module = ClipLightningModule(
        model=MODEL,
        lr=0.0,
        warmup_steps=1,
        log_every=LOG_EVERY,
        # the default on a GPU; unfused AdamW reads its step counts (CPU tensors even there)
        fused_adamw=True,
        metrics_path=str(tmp_path / "metrics.jsonl"),
    )
    watch = _Watch()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        gradient_clip_val=1.0,
        callbacks=[watch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(batches(), batch_size=None))

    # the step reads nothing between windows; each window is one read of its steps' values
    assert watch.mode.reads == [(s, "tolist") for s in range(1, STEPS + 1) if s % LOG_EVERY == 0]

    torch.manual_seed(0)
    model = create_model(MODEL)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # the last, unread, too
    with torch.no_grad():
        for record, batch in zip(records, batches(), strict=True):
            expected = ClipLoss()(*model(batch["image"], batch["text"]))
            assert record["train/loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
            assert record["batch"] == record["step"] - 1 and record["epoch"] == 0
            assert record["train/temperature"] == pytest.approx(0.07, rel=1e-5)
            assert record["train/global_batch"] == BATCH and record["train/lr"] == 0.0
    # throughput over each window, on its last step (the first window includes the start)
    assert ["perf/samples_per_s" in r for r in records] == [False, False, False, True, True]
    assert module.last_metrics["train/loss"] == records[-1]["train/loss"]


def test_speed_options_default_per_device(tmp_path):
    from clip_model.train_config import device_options, load_config

    cfg = load_config(None, [f"data={tmp_path}", "max_steps=1"])
    on = {"tf32": True, "fused_adamw": True, "compile": True, "channels_last": True}
    assert device_options(cfg, "cuda", resnet=True) == on
    assert device_options(cfg, "cuda", resnet=False) == {**on, "channels_last": False}
    assert not any(device_options(cfg, "cpu", resnet=True).values())
    # asked for: kept where the device has it (no TF32 off CUDA, NHWC only for a ResNet)
    asked = load_config(None, [f"data={tmp_path}", "max_steps=1", "tf32=true", "compile=true"])
    assert device_options(asked, "cpu", resnet=False) == {
        "tf32": False,
        "fused_adamw": False,
        "compile": True,
        "channels_last": False,
    }
    off = load_config(None, [f"data={tmp_path}", "max_steps=1", "compile=false"])
    assert device_options(off, "cuda", resnet=False)["compile"] is False
