"""CLIP as a library: model, checkpoints, tokenizer, transforms and loss (never imports Prefect).

from clip_model import create_model, from_state_dict, to_state_dict, get_tokenizer
model = create_model("tiny")                  # or "ViT-B-32", a YAML path, a ModelConfig
tokenizer = get_tokenizer("openai")           # or a file from train_tokenizer
image_features, text_features, scale = model(images, tokenizer(["a photo of a dog."]))

The names below load on first use, so a light submodule (clip_model.precision, the configs) can
be imported without torch: a CLI validates its arguments before paying for torch's import.
"""

from __future__ import annotations

import importlib
from typing import Any

import storage.environment  # noqa: F401  (safe defaults before mlflow is imported)

_EXPORTS = {
    "CLIP": "clip_model.model",
    "create_model": "clip_model.model",
    "CheckpointError": "clip_model.checkpoint",
    "from_state_dict": "clip_model.checkpoint",
    "infer_config": "clip_model.checkpoint",
    "to_state_dict": "clip_model.checkpoint",
    "ModelConfig": "clip_model.config",
    "available_presets": "clip_model.config",
    "Tokenizer": "clip_model.tokenizer",
    "get_tokenizer": "clip_model.tokenizer",
    "train_tokenizer": "clip_model.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clip_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
