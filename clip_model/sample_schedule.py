"""A run resumed at another global batch keeps its LR schedule and step budget in samples.

The schedule (warmup, then cosine) and `max_steps` are counted in optimizer steps of the global
batch the run started with: its *planned* steps. Resumed at step `s` on another number of devices
(or another batch size), a step is `q = new global batch / old global batch` planned steps'
worth of samples, so step `t` is scheduled as planned step `p(s) + (t - s) * q`, and the run
stops after the samples the plan had left: at `s + ceil((max_steps - p(s)) / q)`. The map rides
in the checkpoints, so a second resume composes with the first. The DataModule keeps the epoch
position in samples the same way (ClipDataModule.load_state_dict). Runs limited by `max_epochs`
are left as Lightning lays them out (their length is in epochs, already counted in samples).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["SampleSchedule"]


class SampleSchedule(Callback):
    """planned(t) = base + (t - at) * scale: optimizer step t in steps of the original plan."""

    def __init__(self) -> None:
        self.base, self.at, self.scale = 0.0, 0, 1.0
        self._resumed: tuple[int, float] | None = None  # (step, new / old global batch)

    def planned(self, step: float) -> float:
        return self.base + (step - self.at) * self.scale

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "at": self.at, "scale": self.scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base, self.at, self.scale = state_dict["base"], state_dict["at"], state_dict["scale"]

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        data = checkpoint.get(type(datamodule).__qualname__) if datamodule is not None else None
        if data and "world_size" in data and hasattr(datamodule, "global_batch_size"):
            old = data["world_size"] * data["batch_size"]
            self._resumed = (checkpoint["global_step"], datamodule.global_batch_size / old)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed is None or trainer.max_steps == -1:
            return
        step, q = self._resumed
        # composed with any earlier rescaling (load_state_dict ran after on_load_checkpoint)
        self.base, self.at, self.scale = self.planned(step), step, self.scale * q
        if (self.base, self.scale) == (step, 1.0):
            return  # the plan's own steps: nothing to rescale
        left = max(0.0, trainer.max_steps - self.base)
        trainer.fit_loop.epoch_loop.max_steps = step + math.ceil(left / self.scale)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: each group's multiplier, re-timed
                scheduler.lr_lambdas = [
                    (lambda t, f=f: f(self.planned(t))) for f in scheduler.lr_lambdas
                ]
