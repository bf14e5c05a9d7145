"""Model presets as data: `configs/model/<name>.yaml` validated by `ModelConfig`.

The fields mirror the arguments of OpenAI's `build_model` (image side, vision layers/width/patch,
text context/vocab/width/heads/layers), so a preset reads like the tables in the CLIP paper's
appendix. A ViT has `vision_patch_size`; a modified ResNet has four `vision_layers` and no patch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

import configs

CONFIG_DIR = configs.root() / "model"  # shipped in the package (configs/__init__.py)
OPENAI_VOCAB_SIZE = 49408  # 256 bytes x 2 (with "</w>") + 48,894 merges + [SOS] + [EOS]


class ModelConfig(BaseModel):
    """Sizes of a CLIP model; `create_model(config)` builds it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    embed_dim: int  # joint embedding space
    # image encoder
    image_size: int
    vision_layers: int | tuple[int, int, int, int]  # int: ViT depth; 4 ints: ResNet stages
    vision_width: int  # ViT width, or the ResNet stem width (64 in RN50)
    vision_patch_size: int | None = None  # None means the modified ResNet
    vision_head_width: int = 64  # heads = width // head_width (ResNet: width * 32 // head_width)
    # text encoder
    context_length: int = 77
    vocab_size: int = OPENAI_VOCAB_SIZE
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    # shared
    mlp_ratio: float = 4.0
    activation: Literal["quick_gelu", "gelu"] = "gelu"  # OpenAI's released weights use QuickGELU
    tokenizer: Literal["openai", "bpe"] = "openai"  # "bpe": train_tokenizer on the captions
    grad_checkpointing: bool = False

    @field_validator(
        "embed_dim",
        "image_size",
        "vision_width",
        "vision_head_width",
        "context_length",
        "vocab_size",
        "text_width",
        "text_heads",
        "text_layers",
    )
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be a positive integer, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        problems = []
        if self.is_vit:
            if not isinstance(self.vision_layers, int):
                problems.append(
                    f"vision_layers={list(self.vision_layers)}: a ViT (vision_patch_size set) "
                    "takes one depth; four stage depths mean a ResNet (vision_patch_size: null)"
                )
            if self.image_size % self.vision_patch_size:
                problems.append(
                    f"image_size={self.image_size} is not divisible by "
                    f"vision_patch_size={self.vision_patch_size}"
                )
            if self.vision_width % self.vision_head_width:
                problems.append(
                    f"vision_width={self.vision_width} is not divisible by "
                    f"vision_head_width={self.vision_head_width}"
                )
        else:
            if isinstance(self.vision_layers, int):
                problems.append(
                    f"vision_layers={self.vision_layers}: a ResNet (vision_patch_size: null) "
                    "takes four stage depths, e.g. [3, 4, 6, 3]; set vision_patch_size for a ViT"
                )
            if self.image_size % 32:
                problems.append(
                    f"image_size={self.image_size}: the ResNet downsamples by 32, so it must be "
                    "a multiple of 32"
                )
            if (self.vision_width * 32) % self.vision_head_width:
                problems.append(
                    f"vision_width * 32 = {self.vision_width * 32} (the attention-pool width) is "
                    f"not divisible by vision_head_width={self.vision_head_width}"
                )
            if self.vision_width % 2:
                problems.append(f"vision_width={self.vision_width} must be even (stem halves it)")
        if self.text_width % self.text_heads:
            problems.append(
                f"text_width={self.text_width} is not divisible by text_heads={self.text_heads}"
            )
        if self.tokenizer == "openai" and self.vocab_size != OPENAI_VOCAB_SIZE:
            problems.append(
                f"vocab_size={self.vocab_size} but tokenizer='openai' has {OPENAI_VOCAB_SIZE} ids "
                "(use tokenizer: bpe for a vocabulary trained on the captions)"
            )
        if self.context_length < 3:
            problems.append(f"context_length={self.context_length}: needs [SOS], a token, [EOS]")
        if self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio={self.mlp_ratio} must be positive")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_vit(self) -> bool:
        return self.vision_patch_size is not None

    @property
    def vision_heads(self) -> int:
        width = self.vision_width if self.is_vit else self.vision_width * 32
        return width // self.vision_head_width

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str | Path | dict | ModelConfig) -> ModelConfig:
        """A preset name as OpenCLIP spells it ("ViT-B-32", "ViT-B-32-quickgelu", "tiny"), a
        YAML or JSON path (ours, an OpenCLIP model config, or an `open_clip_config.json`), a
        dict or a ModelConfig."""
        if isinstance(name_or_path, ModelConfig):
            return name_or_path
        if isinstance(name_or_path, dict):
            data = dict(name_or_path)
            if isinstance(data.get("model_cfg"), dict):  # OpenCLIP's hub open_clip_config.json
                data = {"name": data.get("name", "custom"), **data["model_cfg"]}
            if "vision_cfg" in data:  # OpenCLIP's JSON layout
                return cls.from_openclip(data)
            return cls(**data)
        path = Path(name_or_path)
        if not path.is_file():
            path = _preset_path(str(name_or_path))
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: not a readable model config ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: expected a mapping of config fields, got {type(data).__name__}"
            )
        data.setdefault("name", path.parent.name if path.name == OPENCLIP_HUB_CONFIG else path.stem)
        try:
            return cls.load(data)
        except ValidationError as error:
            raise ValueError(f"{path}: invalid model config:\n{error}") from None
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def same_architecture(self, other: ModelConfig) -> bool:
        """True when both build the same network (names and grad checkpointing aside)."""
        return self.model_dump(exclude=_NOT_ARCHITECTURE) == other.model_dump(
            exclude=_NOT_ARCHITECTURE
        )

    @classmethod
    def from_openclip(cls, data: dict[str, Any]) -> ModelConfig:
        """Convert OpenCLIP's `{"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}` layout
        (its model_configs/*.json, or `model_cfg` of a hub `open_clip_config.json`). Fields this
        architecture does not have are refused by name rather than ignored."""
        unknown_top = sorted(set(data) - _OPENCLIP_TOP)
        if data.get("custom_text"):
            unknown_top.append("custom_text")
        vision, text = dict(data["vision_cfg"]), dict(data.get("text_cfg", {}))
        known_vision = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
        known_text = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
        unknown = sorted(
            unknown_top
            + [f"vision_cfg.{k}" for k in set(vision) - known_vision]
            + [f"text_cfg.{k}" for k in set(text) - known_text]
        )
        if unknown:
            raise ValueError(f"OpenCLIP config fields not supported here: {', '.join(unknown)}")
        if vision.get("mlp_ratio", 4.0) != text.get("mlp_ratio", 4.0):
            raise ValueError("different vision and text mlp_ratio are not supported")
        layers = vision["layers"]
        resnet = isinstance(layers, list | tuple)
        vocab_size = text.get("vocab_size", OPENAI_VOCAB_SIZE)
        return cls(
            name=data.get("name", "custom"),
            embed_dim=data["embed_dim"],
            image_size=vision["image_size"],
            vision_layers=tuple(layers) if resnet else layers,
            vision_width=vision["width"],
            vision_patch_size=None if resnet else vision.get("patch_size", 16),
            vision_head_width=vision.get("head_width", 64),
            context_length=text.get("context_length", 77),
            vocab_size=vocab_size,
            text_width=text.get("width", 512),
            text_heads=text.get("heads", 8),
            text_layers=text.get("layers", 12),
            mlp_ratio=vision.get("mlp_ratio", 4.0),
            activation="quick_gelu" if data.get("quick_gelu", False) else "gelu",
            tokenizer="openai" if vocab_size == OPENAI_VOCAB_SIZE else "bpe",
        )


OPENCLIP_HUB_CONFIG = "open_clip_config.json"  # OpenCLIP's hub layout: beside the weights
_OPENCLIP_TOP = {"name", "embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}
_NOT_ARCHITECTURE = {"name", "grad_checkpointing"}


def _preset_path(name: str) -> Path:
    """configs/model/<name>.yaml, or a ValueError saying what the name should be."""
    if Path(name).suffix in (".yaml", ".yml", ".json"):
        raise ValueError(f"model config {name} not found")
    if "/" in name or "@" in name:
        # OpenAI spells "ViT-B/32"; OpenCLIP maps that to its GELU "ViT-B-32", while OpenAI's
        # own ViT-B/32 is QuickGELU: the spelling names two models, so neither is guessed.
        dashed = name.replace("/", "-").replace("@336px", "-336")
        raise ValueError(
            f"model {name!r}: not a file, and presets are named as OpenCLIP names them. "
            f"OpenAI's released {name} is {dashed}-quickgelu (QuickGELU); {dashed} is the same "
            "architecture with GELU, as OpenCLIP trains from scratch"
        )
    preset = CONFIG_DIR / f"{name}.yaml"
    if preset.is_file():
        return preset
    raise ValueError(
        f"unknown model {name!r}: not a file and not a preset in {CONFIG_DIR} "
        f"(available: {', '.join(available_presets())})"
    )


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
