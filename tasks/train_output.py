"""The train stage's out_dir as a stage output (docs/stage-outputs.md, "Training").

A training run folder is written in place: checkpoints land there during the run and a rerun
continues from them, so it is never staged and swapped. What makes it a transaction:

- `training_output` opens it through `storage.output.stage_output` (mode in_place) for the whole
  stage: an out_dir (or checkpoint_dir) that is, holds or lies inside the training data is
  refused; so is a non-empty folder no training wrote, unless `force` (which clears it); and the
  out_dir's lock, held until the stage ends, stops a second run writing it (naming the owner).
  Any training's folder is this stage's (`identity=None`): which training it holds, and whether
  a run may continue it, is the training key's business (tasks/train.py, `resume_unfinished`;
  the trainer refuses a fresh start over another run's checkpoints).
- `start_writing`, before a run changes the folder: the record goes `open` and the finished
  run's `train_done.json` is removed, since its checkpoints are about to be continued or pruned.
  `record_training` writes this run's `train_done.json` last, then `commit()` marks the record
  `committed`: a killed run leaves the folder reading as unfinished, never as complete.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from clip_model.train import TrainConfig
from storage.fs import filesystem, join
from storage.output import StageOutput, check_not_aliased, stage_output
from tasks.train import DONE_FILE, STARTED_FILE

__all__ = ["STAGE", "start_writing", "training_output"]

STAGE = "train"


def _earlier_training(url: str) -> bool:
    """A run folder the train flow wrote before outputs carried a record: it holds the flow's
    train_started.json or train_done.json, each naming a training key."""
    for name in (DONE_FILE, STARTED_FILE):
        fs, path = filesystem(join(url, name))
        try:
            key = json.loads(fs.cat_file(path)).get("key")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(key, str) and key.startswith("sha256:"):
            return True
    return False


@contextlib.contextmanager
def training_output(cfg: TrainConfig, force: bool = False) -> Iterator[StageOutput]:
    """out_dir opened for this run, under its lock (see the module docstring)."""
    inputs = [cfg.data, cfg.val_data]
    if cfg.checkpoint_dir:  # checkpoints outside out_dir: they too stay out of the data
        check_not_aliased(cfg.checkpoint_dir, [i for i in inputs if i])
    with stage_output(
        cfg.out_dir,
        stage=STAGE,
        inputs=inputs,
        force=force,
        mode="in_place",
        legacy=_earlier_training,
    ) as out:
        yield out


def start_writing(out: StageOutput) -> None:
    """The run is about to change out_dir: it stops reading as complete until `commit()`."""
    out.reopen()
    fs, path = filesystem(join(out.url, DONE_FILE))
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)
