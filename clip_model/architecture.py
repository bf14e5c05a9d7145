"""What a state dict's tensor shapes say about its CLIP architecture, and what they cannot.

Shapes give every size (widths, depths, patch, image and embedding sizes, vocabulary), exactly
as OpenAI's `build_model` reads them. They cannot tell the activation (OpenCLIP's `ViT-B-32` is
GELU, `ViT-B-32-quickgelu` QuickGELU, with identical tensors) nor the attention head width (the
heads split one in_proj matrix), so a bare state dict needs a model name or config
(docs/design.md, trap 11). `infer_config` takes those two as arguments; `matching_presets` names
the presets whose sizes fit, for the message that asks which one it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from clip_model.config import OPENAI_VOCAB_SIZE, ModelConfig, available_presets

__all__ = ["ArchitectureError", "describe_sizes", "infer_config", "matching_presets"]

# what shapes cannot say: the fields a name or config must supply
CONVENTIONS = ("activation", "vision_head_width", "text_heads")


class ArchitectureError(ValueError):
    """A state dict whose shapes are not a CLIP this library builds."""


def infer_config(
    state_dict: dict[str, torch.Tensor],
    source: str = "state dict",
    *,
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu",
    head_width: int = 64,
) -> ModelConfig:
    """The architecture a state dict holds, read off its tensor shapes (OpenAI's build_model).

    The activation and the head width (vision heads = width / head_width, text heads =
    text width / head_width) are not in the shapes: they default to OpenAI's conventions
    (QuickGELU, 64), which hold for OpenAI's releases only; clip_model.checkpoint never applies
    them to a file that does not say what it is.
    """
    sd = state_dict

    def need(*keys: str) -> None:
        missing = [k for k in keys if k not in sd]
        if missing:
            some = ", ".join(sorted(sd)[:8]) + (", ..." if len(sd) > 8 else "")
            raise ArchitectureError(
                f"{source}: cannot infer a CLIP architecture: missing {', '.join(missing)} "
                f"(expected OpenAI/OpenCLIP CLIP parameter names; found {some})"
            )

    need("visual.conv1.weight", "text_projection", "positional_embedding")
    need("token_embedding.weight", "ln_final.weight")
    if "visual.proj" in sd:  # a ViT
        need("visual.positional_embedding")
        vision_width = sd["visual.conv1.weight"].shape[0]
        vision_layers: int | tuple[int, ...] = len(
            [k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]
        )
        patch_size = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        image_size = patch_size * grid
        vision_mlp = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    else:  # the modified ResNet
        need("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")
        vision_layers = tuple(
            len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{stage}.")})
            for stage in (1, 2, 3, 4)
        )
        vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
        output_width = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        patch_size, image_size, vision_mlp = None, output_width * 32, None

    text_width = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    text_mlp = "transformer.resblocks.0.mlp.c_fc.weight"
    mlp_ratio = sd[text_mlp].shape[0] / text_width if text_mlp in sd else 4.0
    if vision_mlp in sd and sd[vision_mlp].shape[0] / vision_width != mlp_ratio:
        raise ArchitectureError(f"{source}: vision and text MLP ratios differ; not supported")
    vocab_size = sd["token_embedding.weight"].shape[0]
    try:
        return ModelConfig(
            name=Path(source).stem if source != "state dict" else "inferred",
            embed_dim=sd["text_projection"].shape[1],
            image_size=image_size,
            vision_layers=vision_layers,
            vision_width=vision_width,
            vision_patch_size=patch_size,
            vision_head_width=head_width,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=vocab_size,
            text_width=text_width,
            text_heads=max(1, text_width // head_width),
            text_layers=text_layers,
            mlp_ratio=mlp_ratio,
            activation=activation,
            tokenizer="openai" if vocab_size == OPENAI_VOCAB_SIZE else "bpe",
        )
    except ValueError as error:
        raise ArchitectureError(
            f"{source}: the inferred architecture is inconsistent ({error}); give its config"
        ) from None


def _sizes(config: ModelConfig) -> dict:
    return config.model_dump(exclude={"name", "grad_checkpointing", *CONVENTIONS})


def matching_presets(config: ModelConfig) -> list[str]:
    """The presets with `config`'s sizes (whatever their activation and head width)."""
    sizes = _sizes(config)
    return [n for n in available_presets() if _sizes(ModelConfig.load(n)) == sizes]


def describe_sizes(config: ModelConfig) -> str:
    """One line of the sizes shapes tell, e.g. 'a ViT (width 768, 12 layers, 32 px patches,
    224 px) with a 512-wide 12-layer text transformer, embed_dim 512'."""
    c = config
    if c.is_vit:
        vision = (
            f"a ViT (width {c.vision_width}, {c.vision_layers} layers, "
            f"{c.vision_patch_size} px patches, {c.image_size} px)"
        )
    else:
        layers = list(c.vision_layers)
        vision = f"a ResNet (stages {layers}, stem width {c.vision_width}, {c.image_size} px)"
    return (
        f"{vision} with a {c.text_width}-wide {c.text_layers}-layer text transformer, "
        f"embed_dim {c.embed_dim}"
    )
