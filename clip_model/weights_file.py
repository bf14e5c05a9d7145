"""Reading a weights file as data, never code (docs/checkpoints.md).

`read_checkpoint` is the one reader of weights files in this project: `.safetensors` with
safetensors, everything else with `torch.load(weights_only=True)` (tensors, containers and
primitive types, plus an allow-list the caller gives), and TorchScript archives (OpenAI's
released `.pt` files) only when the caller opts in, because loading one runs the code it
carries. `resolve_weights` finds the weights and `open_clip_config.json` of OpenCLIP's hub
layout.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clip_model.config import OPENCLIP_HUB_CONFIG
from clip_model.transforms import OPENAI_MEAN, OPENAI_STD

__all__ = [
    "OPENCLIP_HUB_WEIGHTS",
    "TORCHSCRIPT_FLAG",
    "CheckpointError",
    "TorchScriptRefused",
    "check_openclip_preprocess",
    "is_torchscript",
    "read_checkpoint",
    "resolve_weights",
]

# the weights files of OpenCLIP's hub layout, preferred first
OPENCLIP_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class CheckpointError(ValueError):
    """A file or state dict that is not a CLIP checkpoint this library can load."""


class TorchScriptRefused(CheckpointError):
    """A TorchScript archive given without the opt-in: loading it would run its code."""


TORCHSCRIPT_FLAG = "--allow-torchscript"  # the CLI flag every loading stage offers


def read_checkpoint(
    path: str | os.PathLike,
    *,
    allow_torchscript: bool = False,
    safe_globals: Sequence[Any] = (),
) -> Any:
    """What a checkpoint file holds, read as data, never code (docs/checkpoints.md).

    `.safetensors` files are read with safetensors; everything else with
    `torch.load(weights_only=True)`, which only rebuilds tensors, containers and primitive types
    (plus the classes in `safe_globals`, e.g. the few a Lightning checkpoint needs). A TorchScript
    archive (OpenAI's released .pt files are TorchScript) runs the code it carries as it loads,
    so it is refused unless the caller opts in with `allow_torchscript=True`; it then yields the
    archive's state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if is_torchscript(path):
        if not allow_torchscript:
            raise TorchScriptRefused(
                f"{path} is a TorchScript archive (as OpenAI's released .pt files are): loading "
                "one runs the code it carries. Load it only from a source you trust, with "
                f"{TORCHSCRIPT_FLAG} (`allow_torchscript: true` in a curation filter spec, "
                "allow_torchscript=True in Python)"
            )
        with warnings.catch_warnings():  # torch.jit is deprecated, but it is how they ship
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - name the file and why it was refused
        raise CheckpointError(
            f"{path}: not loadable as a weights-only torch checkpoint ({error})"
        ) from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # a declared dependency; only a broken install lacks it
        raise CheckpointError(f"{path}: reading .safetensors needs `safetensors`") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - name the file and why it was refused
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def is_torchscript(path: Path) -> bool:
    """A zip holding `<archive>/constants.pkl`, as torch.jit.save writes (and torch.load's own
    check looks for)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def resolve_weights(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(the weights file, OpenCLIP's `open_clip_config.json` beside it if there is one) for a
    weights file or an OpenCLIP hub folder (`open_clip_config.json` and
    `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`)."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in OPENCLIP_HUB_WEIGHTS if (path / n).is_file()), None)
        if weights is None:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
            raise CheckpointError(
                f"{path} is a folder but not OpenCLIP's hub layout: expected "
                f"{' or '.join(OPENCLIP_HUB_WEIGHTS)} (with {OPENCLIP_HUB_CONFIG}); found {found}"
            )
        path = weights
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    hub_config = path.parent / OPENCLIP_HUB_CONFIG
    return path, hub_config if hub_config.is_file() else None


# OpenCLIP's PreprocessCfg as clip_model.transforms.eval_transform does it; anything else is
# refused rather than evaluated with the wrong preprocessing
_EVAL_PREPROCESS = {
    "mean": OPENAI_MEAN,
    "std": OPENAI_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "mode": "RGB",
}


def check_openclip_preprocess(hub_config: Path) -> None:
    """CheckpointError unless the hub config's `preprocess_cfg` is what evaluation does."""
    try:
        preprocess = json.loads(hub_config.read_text()).get("preprocess_cfg") or {}
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{hub_config}: not a readable OpenCLIP config ({error})") from None
    for field, ours in _EVAL_PREPROCESS.items():
        value = preprocess.get(field)
        if value is None:
            continue
        if not _same(value, ours):
            raise CheckpointError(
                f"{hub_config}: preprocess_cfg.{field}={value!r}, but evaluation preprocesses as "
                f"OpenAI did ({field}={ours!r}, clip_model/transforms.py); these weights would "
                "be scored on inputs they were not trained on"
            )


def _same(value: Any, ours: Any) -> bool:
    if not isinstance(ours, tuple):
        return value == ours
    try:
        return len(value) == len(ours) and all(
            abs(float(a) - b) < 1e-6 for a, b in zip(value, ours, strict=True)
        )
    except (TypeError, ValueError):
        return False
