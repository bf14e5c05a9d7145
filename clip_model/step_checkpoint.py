"""Training checkpoints: `step-N.ckpt` every N optimizer steps and at the end, written atomically,
the last K kept, `last.ckpt` beside them (the newest), every rank's RNG states inside.

`StepCheckpoint` adds the RNG states to Lightning's own checkpoint (model, loss parameters,
optimizer, scheduler, scaler, loop counters and the DataModule's position), which is what makes a
resumed run continue exactly (clip_model/lightning_module.py says what is in the model part).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from storage.fs import filesystem, join

__all__ = ["LAST", "StepCheckpoint", "latest_checkpoint"]


_STEP_RE = re.compile(r"^step-(\d+)\.ckpt$")
LAST = "last.ckpt"  # the newest step file's twin


def _checkpoints(directory: str) -> list[tuple[int, str]]:
    fs, path = filesystem(directory)
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if match := _STEP_RE.match(name):
            found.append((int(match.group(1)), join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory: str) -> str | None:
    """The newest `step-N.ckpt` in `directory`, or None."""
    found = _checkpoints(directory)
    return found[-1][1] if found else None


def _rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and ints (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _point_last_at(path: str) -> None:
    """`last.ckpt` beside the step files, always the newest (a stable path for evaluation and
    deployments); replaced in one rename, a hard link where the filesystem has them."""
    directory = path.rsplit("/", 1)[0]
    fs, src = filesystem(path)
    tmp, last = (
        filesystem(join(directory, ".last.ckpt.tmp"))[1],
        filesystem(join(directory, LAST))[1],
    )
    if fs.__class__.__name__ == "LocalFileSystem":
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, last)
    else:
        fs.copy(src, tmp)
        fs.mv(tmp, last)


class StepCheckpoint(Callback):
    """Checkpoint every `every_n_steps` optimizer steps and at the end; keep the last `keep_last`.

    Written under a temporary name and renamed, so a run killed mid-write leaves no half file
    that looks whole. Every rank's RNG states ride along (gathered to rank 0, which writes).
    """

    def __init__(self, dirpath: str, *, every_n_steps: int, keep_last: int = 3):
        if every_n_steps < 1 or keep_last < 1:
            raise ValueError("every_n_steps and keep_last must be >= 1")
        self.dirpath, self.every_n_steps, self.keep_last = dirpath, every_n_steps, keep_last
        self.last_saved_step = -1
        self.last_path: str | None = None
        self._rng: list[dict[str, Any]] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        # global_step moves only when the optimizer steps, so the first batch to see a new step
        # closes an accumulation cycle: no half-accumulated gradient is ever left unsaved
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.last_saved_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> str:
        step = trainer.global_step
        flush = getattr(trainer.lightning_module, "flush_metrics", None)
        if flush is not None:  # metrics.jsonl holds every step the checkpoint has taken
            flush()
        path = join(self.dirpath, f"step-{step:08d}.ckpt")
        tmp = join(self.dirpath, f".step-{step:08d}.ckpt.tmp")
        states = _rng_states()
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, states)
            self._rng = gathered
        else:
            self._rng = [states]
        trainer.save_checkpoint(
            tmp, weights_only=False
        )  # every rank calls it; the strategy writes on rank 0
        if trainer.is_global_zero:
            fs, tmp_path = filesystem(tmp)
            final_path = filesystem(path)[1]
            if fs.__class__.__name__ == "LocalFileSystem":
                os.replace(tmp_path, final_path)  # atomic on POSIX
            else:
                fs.mv(tmp_path, final_path)
            _point_last_at(path)
            for _, old in _checkpoints(self.dirpath)[: -self.keep_last]:
                fs.rm(filesystem(old)[1])
        trainer.strategy.barrier("StepCheckpoint.save")
        self.last_saved_step, self.last_path = step, path
        return path

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["rng_states"] = self._rng or [_rng_states()]

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            return
        if len(states) != trainer.world_size:
            warnings.warn(
                f"checkpoint holds RNG states of {len(states)} ranks, this run has "
                f"{trainer.world_size}: random streams will differ from the interrupted run",
                stacklevel=2,
            )
        _set_rng_states(states[trainer.global_rank % len(states)])

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_saved_step = state_dict.get("last_saved_step", -1)
