"""The evaluate stage's OUTPUT: many evaluations, and OUTPUT/results.json indexing them by key.

Kept apart from tasks/evaluate.py (no torch, no Prefect) so the bookkeeping is cheap to import.
OUTPUT is bound to the stage before any work (`claim`); an entry is added to results.json by
reading, changing and atomically replacing it while holding OUTPUT's lock (`add_entry`), so
evaluations recording at the same moment never lose each other's entries (docs/stage-outputs.md,
"Evaluation").
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from storage.fs import atomic_write_bytes, filesystem, join
from storage.output import stage_output

__all__ = ["INDEX_FORMAT", "INDEX_NAME", "STAGE", "add_entry", "claim", "read_index"]

INDEX_NAME = "results.json"  # OUTPUT/results.json: every run's metrics, keyed by its inputs
INDEX_FORMAT = "clip-eval-results/1"
STAGE = "evaluate"
# how long an evaluation waits for OUTPUT's lock: others hold it only to add their entry, and a
# dead holder's lock is broken as stale (storage/lock.py)
LOCK_WAIT = 300.0


def claim(output: str, inputs: Sequence[str | None], force: bool = False) -> None:
    """Bind OUTPUT to this stage: refused if it is, holds or lies inside an input, or holds
    anything but evaluations (unless `force`, which replaces it). An OUTPUT written before
    outputs carried a record is recognised by its results index, and kept."""
    with stage_output(
        output,
        stage=STAGE,
        inputs=inputs,
        force=force,
        mode="in_place",
        lock_wait=LOCK_WAIT,
        legacy=_holds_an_index,
    ) as out:
        out.commit()


def _holds_an_index(output: str) -> bool:
    """OUTPUT/results.json is an evaluation results index: OUTPUT is this stage's."""
    fs, inside = filesystem(join(output, INDEX_NAME))
    if not fs.isfile(inside):
        return False
    try:
        read_index(output)
    except ValueError:
        return False
    return True


def read_index(output: str) -> dict[str, Any]:
    path = join(output, INDEX_NAME)  # a folder or an fsspec URL
    fs, inside = filesystem(path)
    if not fs.isfile(inside):
        return {"format": INDEX_FORMAT, "runs": {}}
    try:
        with fs.open(inside, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error}); move it away to start afresh") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not an evaluation results index ({INDEX_FORMAT})")
    return index


def add_entry(output: str, key: str, entry: dict[str, Any]) -> str:
    """Record `entry` under `key` in OUTPUT/results.json, under OUTPUT's lock; the file's path."""
    path = join(output, INDEX_NAME)
    with stage_output(output, stage=STAGE, mode="in_place", lock_wait=LOCK_WAIT) as out:
        index = read_index(output)
        recorded = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        index["runs"][key] = {**entry, "recorded": recorded}
        atomic_write_bytes(str(path), json.dumps(index, indent=2).encode())
        out.commit()
    return str(path)
