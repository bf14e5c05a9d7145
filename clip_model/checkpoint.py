"""Load the CLIP checkpoints people already have; export ours under the same names.

Accepted: OpenAI's releases (an fp16 state dict, or the TorchScript archive `clip.load` reads),
OpenCLIP's training checkpoints (`{"epoch", "state_dict", "optimizer", ...}` with `module.`
keys from DDP and `_orig_mod.` keys from torch.compile), plain state dicts, and our own files
`{"state_dict": ..., "model_config": {...}}`. Without a config the architecture is inferred from
tensor shapes exactly as OpenAI's `build_model` does; what shapes cannot tell (attention heads:
OpenAI's convention is 64 per head; the activation: OpenAI trained with QuickGELU) comes from
`config=` or keyword overrides.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from clip_model.config import OPENAI_VOCAB_SIZE, ModelConfig
from clip_model.model import CLIP
from clip_model.tokenizer import get_tokenizer

# entries OpenAI's TorchScript models carry besides parameters (`build_model` drops them too)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
    """A file or state dict that is not a CLIP checkpoint this library can load."""


class TorchScriptRefused(CheckpointError):
    """A TorchScript archive given without the opt-in: loading it would run its code."""


def from_state_dict(
    sd_or_path: dict[str, Any] | str | os.PathLike,
    config: ModelConfig | str | dict | None = None,
    *,
    allow_torchscript: bool = False,
    **overrides: Any,
) -> CLIP:
    """A CLIP model in fp32 (eval mode) holding the weights of a state dict or checkpoint file.

    `config` (a ModelConfig, preset name, YAML path or dict) skips shape inference; `overrides`
    replace inferred fields, e.g. `from_state_dict(path, activation="gelu")` for OpenCLIP models
    trained with GELU.
    """
    source = str(sd_or_path) if isinstance(sd_or_path, str | os.PathLike) else "state dict"
    if isinstance(sd_or_path, str | os.PathLike):
        obj = read_checkpoint(sd_or_path, allow_torchscript=allow_torchscript)
    else:
        obj = sd_or_path
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if config is None and isinstance(obj.get("model_config"), dict | ModelConfig):
        config = obj["model_config"]
    hparams = obj.get("hyper_parameters")
    if config is None and isinstance(hparams, dict) and isinstance(hparams.get("model"), dict):
        # A Lightning checkpoint of this project keeps the model config in its hyper-parameters;
        # shapes alone cannot tell GELU from QuickGELU.
        config = hparams["model"]
    state_dict = _clean(obj, source)

    if config is None:
        config = infer_config(state_dict, source=source)
    else:
        config = ModelConfig.load(config)
    if overrides:
        config = ModelConfig(**{**config.model_dump(), **overrides})

    model = CLIP(config)
    _check_fits(model, state_dict, source)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return model.float().eval()


def to_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """OpenAI/OpenCLIP-named tensors on the CPU, unwrapped from DDP and torch.compile."""
    model = _unwrap(model)
    if not isinstance(model, CLIP):
        raise TypeError(f"expected a clip_model CLIP (or a DDP/compiled one), got {type(model)}")
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def infer_config(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> ModelConfig:
    """The architecture a state dict holds, read off its tensor shapes (OpenAI's build_model)."""
    sd = state_dict

    def need(*keys: str) -> None:
        missing = [k for k in keys if k not in sd]
        if missing:
            some = ", ".join(sorted(sd)[:8]) + (", ..." if len(sd) > 8 else "")
            raise CheckpointError(
                f"{source}: cannot infer a CLIP architecture: missing {', '.join(missing)} "
                f"(expected OpenAI/OpenCLIP CLIP parameter names; found {some})"
            )

    need("visual.conv1.weight", "text_projection", "positional_embedding")
    need("token_embedding.weight", "ln_final.weight")
    vit = "visual.proj" in sd
    if vit:
        need("visual.positional_embedding")
        vision_width = sd["visual.conv1.weight"].shape[0]
        vision_layers: int | tuple[int, ...] = len(
            [k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]
        )
        patch_size = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        image_size = patch_size * grid
        vision_mlp = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    else:
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
        raise CheckpointError(f"{source}: vision and text MLP ratios differ; not supported")
    vocab_size = sd["token_embedding.weight"].shape[0]
    try:
        return ModelConfig(
            name=Path(source).stem if source != "state dict" else "inferred",
            embed_dim=sd["text_projection"].shape[1],
            image_size=image_size,
            vision_layers=vision_layers,
            vision_width=vision_width,
            vision_patch_size=patch_size,
            vision_head_width=64,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=vocab_size,
            text_width=text_width,
            text_heads=max(1, text_width // 64),
            text_layers=text_layers,
            mlp_ratio=mlp_ratio,
            activation="quick_gelu",
            tokenizer="openai" if vocab_size == OPENAI_VOCAB_SIZE else "bpe",
        )
    except ValueError as error:
        raise CheckpointError(
            f"{source}: the inferred architecture is inconsistent ({error}); pass config="
        ) from None


# ---- helpers ------------------------------------------------------------------------------


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
    if _is_torchscript(path):
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


def _is_torchscript(path: Path) -> bool:
    """A zip holding `<archive>/constants.pkl`, as torch.jit.save writes (and torch.load's own
    check looks for)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _clean(obj: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Unwrap `state_dict`, strip `module.`/`_orig_mod.` and any prefix before the model."""
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    cleaned = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        key = key.replace("_orig_mod.", "")
        cleaned[key] = value
    # a wrapper module (e.g. a LightningModule's `model.`) prefixes every key: drop it
    anchor = [k for k in cleaned if k.endswith("token_embedding.weight")]
    if len(anchor) == 1 and anchor[0] != "token_embedding.weight":
        prefix = anchor[0][: -len("token_embedding.weight")]
        cleaned = {k[len(prefix) :]: v for k, v in cleaned.items() if k.startswith(prefix)}
    for key in _OPENAI_EXTRA_KEYS:
        cleaned.pop(key, None)
    bad = [k for k, v in cleaned.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: non-tensor entries {bad[:5]} in the state dict")
    return cleaned


def _check_fits(model: CLIP, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mismatched", mismatched),
        ):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{label} keys: {', '.join(items[:10])}{more}")
        raise CheckpointError(
            f"{source} does not fit the CLIP architecture {model.config.name!r}: "
            + "; ".join(parts)
        )


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


# ---- a model with its tokenizer ----------------------------------------------------------------

TOKENIZER_FILE = "tokenizer.json"  # a trained BPE, saved by a training run beside its checkpoints


class LoadedClip(NamedTuple):
    """A model ready to embed: its tokenizer, input size and an identity of its weights."""

    model: CLIP
    tokenizer: Any
    image_size: int
    model_id: str
    checkpoint: str = ""


def model_digest(model: CLIP, tokenizer: Any = None) -> str:
    """sha256 of what makes embeddings: config, every tensor (name, dtype, shape, bytes), and a
    trained tokenizer's file. The same weights give the same digest whatever file held them."""
    h = hashlib.sha256()
    h.update(model.config.model_dump_json(exclude={"name", "grad_checkpointing"}).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    path = getattr(tokenizer, "path", None)
    if path is not None:
        h.update(Path(path).read_bytes())
    return "sha256:" + h.hexdigest()


def load_clip(
    checkpoint: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    allow_torchscript: bool = False,
) -> LoadedClip:
    """A checkpoint with its tokenizer: this project's (a training run's `step-N.ckpt` or an
    exported `{"state_dict", "model_config"}` file), OpenAI's or OpenCLIP's.

    The tokenizer: `tokenizer` if given; else OpenAI's for a model with its vocabulary; else the
    BPE a training run saved (`tokenizer.json` beside the checkpoint or in the run folder above
    its `checkpoints/`).
    """
    path = Path(checkpoint).resolve()
    model = from_state_dict(path, allow_torchscript=allow_torchscript)
    config = model.config
    if tokenizer is None and config.tokenizer != "openai":
        candidates = [path.with_name(TOKENIZER_FILE), path.parent.parent / TOKENIZER_FILE]
        tokenizer = next((c for c in candidates if c.is_file()), None)
        if tokenizer is None:
            raise FileNotFoundError(
                f"{checkpoint}: the model uses a trained BPE vocabulary ({config.vocab_size} ids) "
                f"but no {TOKENIZER_FILE} is in {path.parent} or {path.parent.parent}; pass the "
                "tokenizer file explicitly"
            )
    tok = get_tokenizer(tokenizer or "openai", context_length=config.context_length)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer {tok.name} has {tok.vocab_size} ids, the model {config.vocab_size}"
        )
    return LoadedClip(model, tok, config.image_size, model_digest(model, tok), str(path))
