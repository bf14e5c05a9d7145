"""Progress bars: the one helper for every long loop (training steps, embedding batches, shards).

    from clip_model.progress import progress_bar
    with progress_bar(total=len(shards), desc="curate", unit="shard") as bar:
        for shard in shards:
            ...
            bar.update(1)

A bar is drawn on stderr only when stderr is a terminal, so CI logs and Prefect's captured output
stay quiet (issue 14: "all quiet in CI logs when not a TTY"). `CLIP_PIPELINE_PROGRESS=1` forces
bars on (e.g. under `script` or a pager), `=0` turns them off. tqdm draws them: rate, total and ETA
come with it. Lightning's own bar can follow the same rule through `progress_enabled()`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

__all__ = ["ENV", "progress_bar", "progress_enabled"]

ENV = "CLIP_PIPELINE_PROGRESS"


def progress_enabled(stream: IO | None = None) -> bool:
    """Whether bars are drawn: CLIP_PIPELINE_PROGRESS if set (1/0), else whether `stream`
    (default stderr) is a terminal."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool | None = None,
    **options: Any,
) -> tqdm:
    """A tqdm bar on stderr, or a silent one (same API, draws nothing) when bars are off.
    `enabled=False` always silences (a caller's --no-progress); otherwise `progress_enabled()`."""
    on = enabled is not False and progress_enabled()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not on,
        file=sys.stderr,
        dynamic_ncols=True,
        **options,
    )
