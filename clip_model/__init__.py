"""CLIP as a library: model, checkpoints, tokenizer, transforms and loss (never imports Prefect).

from clip_model import create_model, from_state_dict, to_state_dict, get_tokenizer
model = create_model("tiny")                  # or "ViT-B/32", a YAML path, a ModelConfig
tokenizer = get_tokenizer("openai")           # or a file from train_tokenizer
image_features, text_features, scale = model(images, tokenizer(["a photo of a dog."]))
"""

from clip_model.checkpoint import CheckpointError, from_state_dict, infer_config, to_state_dict
from clip_model.config import ModelConfig, available_presets
from clip_model.model import CLIP, create_model
from clip_model.tokenizer import Tokenizer, get_tokenizer, train_tokenizer

__all__ = [
    "CLIP",
    "CheckpointError",
    "ModelConfig",
    "Tokenizer",
    "available_presets",
    "create_model",
    "from_state_dict",
    "get_tokenizer",
    "infer_config",
    "to_state_dict",
    "train_tokenizer",
]
