"""Every stage's parameters as pydantic models, in light modules (no Prefect, no torch, no MLflow).

One module per stage. Each model is what the stage's command line is built from (flows/cli.py: a
flag per field, its help text the field's description) and what the flow and its tasks receive,
so the command line, the flow and a deployment's parameters cannot disagree. A model's
`check()` looks at the world (files exist, a dataset's manifest reads, the URL list has the
columns, config files validate) and raises a one-line ValueError/OSError naming the flag, file or
column at fault and what would be accepted: the command line runs it before anything starts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_HELP", "check_dataset", "check_file", "check_precision", "cli", "precision_help"]


def cli(
    flag: str | None = None,
    *,
    short: str | None = None,
    repeat: bool = False,
    comma: bool = False,
    metavar: str | None = None,
) -> dict[str, Any]:
    """How a field appears on the command line, for `Field(json_schema_extra=cli(...))`: another
    `flag` name (default `--<field-name-with-dashes>`), a `short` alias (`-k`), `repeat` (given
    several times, e.g. --set), `comma` (a list as one comma-separated value), a `metavar`."""
    options = {"flag": flag, "short": short, "repeat": repeat, "comma": comma, "metavar": metavar}
    return {"cli": {k: v for k, v in options.items() if v}}


def check_dataset(url: str, flag: str) -> None:
    """A committed dataset is at `url` (its manifest reads and matches its shards); a DatasetError
    (a ValueError) naming the flag and what is wrong otherwise."""
    from storage.dataset import DatasetError, open_dataset

    try:
        open_dataset(url)
    except DatasetError as e:
        raise DatasetError(f"{flag} {e}") from None


def check_file(path: str | None, flag: str) -> None:
    """A local file exists at `path` (a URI such as `models:/name@alias` or `s3://...` is left to
    the stage); FileNotFoundError naming the flag otherwise."""
    from pathlib import Path

    if path is None or "://" in path or path.startswith(("models:/", "runs:/")):
        return
    if not Path(path).expanduser().is_file():
        what = "a folder, not a file" if Path(path).expanduser().is_dir() else "no such file"
        raise FileNotFoundError(f"{flag} {path}: {what}")


MODEL_HELP = (
    "the architecture, when the weights do not say it: a preset as OpenCLIP names it (ViT-B-32 "
    "is GELU, ViT-B-32-quickgelu OpenAI's) or a config YAML/JSON"
)


def precision_help() -> str:
    """Every accepted precision spelling, grouped by behaviour (clip_model/precision.py)."""
    from clip_model.precision import accepted_spellings

    return f"{accepted_spellings()} (docs/checkpoints.md)"


def check_precision(value: str | None) -> str | None:
    """A precision field's validator: one of the accepted spellings (kept as given: the stage
    reads it with the same parser), else a ValueError listing them."""
    from clip_model.precision import parse_precision

    if value is not None:
        parse_precision(value)
    return value
