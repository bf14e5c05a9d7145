"""A small random CLIP saved as this project's checkpoint, for the fault tests of index/evaluate."""

from __future__ import annotations

from pathlib import Path


def tiny_checkpoint(path: Path) -> Path:
    """{"state_dict", "model_config"} of a 32-pixel, one-layer CLIP with OpenAI's tokenizer."""
    import torch

    from clip_model import ModelConfig, create_model, to_state_dict

    config = ModelConfig.load("tiny").model_copy(
        update={
            "image_size": 32,
            "embed_dim": 32,
            "vision_layers": 1,
            "vision_width": 64,
            "vision_head_width": 32,
            "text_width": 64,
            "text_heads": 2,
            "text_layers": 1,
            "context_length": 16,
            "vocab_size": 49408,
            "tokenizer": "openai",
        }
    )
    torch.manual_seed(0)
    model = create_model(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": to_state_dict(model), "model_config": config.model_dump()}, path)
    return path
