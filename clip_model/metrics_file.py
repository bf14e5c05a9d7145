"""metrics.jsonl: one JSON line per optimizer step (rank 0 writes it), and the progress lines.

    {"step": 12, "epoch": 0, "batch": 11, "train/loss": 4.7, "train/lr": 0.001, ...}

The file is what the resume tests compare with an uninterrupted run: a run resumed into the same
folder first drops the rows an interrupted run had written from its first step on, so the file
keeps one row per step.
"""

from __future__ import annotations

import json
import os
from typing import Any

from storage.fs import atomic_write_bytes, filesystem

__all__ = ["MetricsFile"]


class MetricsFile:
    """Appends each step's row to `url` (None: no file) and prints every `print_every`-th step
    (0: none) as `step N epoch E loss=... lr=...`."""

    def __init__(self, url: str | None, *, print_every: int = 0):
        self.url, self.print_every = url, print_every
        self._file = None

    def write(self, row: dict[str, Any], metrics: dict[str, float]) -> None:
        step = row["step"]
        record = {"step": step, "epoch": row["epoch"], "batch": row["batch"], **metrics}
        if self.url:
            if self._file is None:
                fs, path = filesystem(self.url)
                fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                _drop_rows_from(self.url, step)
                self._file = fs.open(path, "a")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.print_every and step % self.print_every == 0:
            fields = " ".join(
                f"{k.split('/')[-1]}={v:.4g}"
                for k, v in metrics.items()
                if not k.startswith("data")
            )
            print(f"step {step} epoch {row['epoch']} {fields}", flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _drop_rows_from(url: str, step: int) -> None:
    """Before a run appends its first row (step `step`), drop the rows an interrupted run had
    written from that step on: a run resumed into the same folder rewrites them, and
    metrics.jsonl keeps one row per step. A torn last line (a kill mid-write) goes too."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return
    with fs.open(path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_bytes(url, "".join(f"{line}\n" for line in kept).encode())
