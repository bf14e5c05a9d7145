"""The project's YAML configs, shipped inside the package, and the one way to find them.

    configs.locate("tiny", "pipeline")                 # configs/pipeline/tiny.yaml (a preset)
    configs.locate("configs/filters/sample.yaml")      # project-relative: works from any folder
    configs.locate("my_suite.yaml", "eval")            # a file of your own
    configs.names("model")                             # the presets of a kind

Kinds are the sub-folders: model presets, pipeline profiles, training configs, filter specs, eval
suites. Every loader of these files (clip_model.config, clip_model.train, clip_model.eval_suite,
tasks.curation.spec, the pipeline profiles) resolves what it is given through `locate`, so an
installed package (not only a checkout) finds its presets: they are package data, reached with
importlib.resources. `configs.overrides` is the one parser of `key=value` overrides.

This package imports nothing heavy: the command lines use it before Prefect or torch is loaded.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path, PurePath

__all__ = ["ConfigError", "locate", "names", "root"]

SUFFIXES = (".yaml", ".yml")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or override and the field."""


def root() -> Path:
    """The folder holding the shipped configs (this package's folder, in a checkout or installed)."""
    return Path(str(files(__name__)))


def names(kind: str) -> list[str]:
    """The presets of a kind: `names("pipeline")` -> ["cc3m_vitb32", "micro", "tiny"]."""
    folder = root() / kind
    return (
        sorted(p.stem for p in folder.iterdir() if p.suffix in SUFFIXES) if folder.is_dir() else []
    )


def locate(ref: str | os.PathLike, kind: str | None = None) -> Path:
    """The config file `ref` names, in this order: an existing file (relative to the working
    folder); a project-relative path `configs/<kind>/<file>`, read from the package; with a `kind`,
    a preset name (`tiny`). Raises FileNotFoundError naming what would be accepted."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    parts = PurePath(ref).parts
    if len(parts) > 1 and parts[0] == "configs":
        shipped = root().joinpath(*parts[1:])
        if shipped.is_file():
            return shipped
    if kind is not None and len(parts) == 1 and path.suffix not in SUFFIXES:
        preset = root() / kind / f"{ref}.yaml"
        if preset.is_file():
            return preset
    what = f"{kind} config" if kind else "config"
    known = names(kind) if kind else []
    accepted = f"a preset ({', '.join(known)}) or " if known else ""
    raise FileNotFoundError(f"{what} {str(ref)!r}: no such file; expected {accepted}a YAML path")
