"""Training progress on a terminal: optimizer step / total, samples/s and the ETA.

    train 120/500 [00:41<02:10, 2.9 step/s, 742 samples/s]

A Lightning callback drawing one bar with clip_model.progress (tqdm on stderr), rank 0 only;
silent when stderr is not a terminal (CI logs, Prefect's captured output) unless
CLIP_PIPELINE_PROGRESS=1. The total is `max_steps`, or the steps of `max_epochs` epochs; a resumed
run starts the bar at its step. samples/s is the bar's smoothed step rate times the global batch
(batch size x ranks x accumulated micro-batches); nothing here reads a tensor, so drawing the bar
never waits for the device.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from clip_model.progress import progress_bar

__all__ = ["TrainProgress"]


class TrainProgress(L.Callback):
    """One bar over the run's optimizer steps (Lightning's own bar stays off: it counts batches
    per epoch and draws on every rank)."""

    def __init__(self, batch_size: int, *, enabled: bool | None = None):
        self.batch_size, self.enabled = batch_size, enabled
        self.bar = None
        self.global_batch = batch_size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        if trainer.max_steps and trainer.max_steps > 0:
            total = trainer.max_steps
        else:
            total = int(trainer.estimated_stepping_batches)
        self.global_batch = self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        self.bar = progress_bar(
            total=total,
            initial=trainer.global_step,
            desc="train",
            unit="step",
            enabled=self.enabled,
        )

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        bar = self.bar
        if bar is None or trainer.global_step <= bar.n:  # a micro-batch of an accumulated step
            return
        bar.update(trainer.global_step - bar.n)
        rate = bar.format_dict.get("rate")
        if rate:
            bar.set_postfix_str(f"{rate * self.global_batch:,.0f} samples/s", refresh=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, error: Exception):
        self.on_train_end(trainer, pl_module)  # an interrupted run leaves the line clean
