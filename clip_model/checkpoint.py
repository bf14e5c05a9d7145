"""Load the CLIP checkpoints people already have; export ours under the same names.

Accepted: OpenAI's releases (an fp16 state dict, or the TorchScript archive `clip.load` reads,
opted in), OpenCLIP's training checkpoints (`{"epoch", "state_dict", "optimizer", ...}` with
`module.` keys from DDP and `_orig_mod.` keys from torch.compile), OpenCLIP's hub layout (a
folder, or weights beside `open_clip_config.json`), `.safetensors` files, plain state dicts, and
our own files `{"state_dict": ..., "model_config": {...}}` and training checkpoints. Files are
read as data, never code (`read_checkpoint`, docs/checkpoints.md).

The architecture comes from, in this order:
  1. `config=` (`--model` on the CLIs): a preset name as OpenCLIP spells it, a YAML/JSON path,
     a dict or a ModelConfig;
  2. what the file says: our `model_config` / training hyper-parameters, or OpenCLIP's
     `open_clip_config.json` beside the weights (a given config must agree with it);
  3. a TorchScript archive is OpenAI's release format: OpenAI's conventions (QuickGELU,
     64-wide heads) with sizes from the shapes;
  4. otherwise the shapes give the sizes but not the activation or the head width
     (clip_model.architecture): refused, naming the presets whose sizes fit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from clip_model.architecture import (
    CONVENTIONS,
    ArchitectureError,
    describe_sizes,
    infer_config,
    matching_presets,
)
from clip_model.config import OPENCLIP_HUB_CONFIG, ModelConfig
from clip_model.model import CLIP
from clip_model.tokenizer import get_tokenizer
from clip_model.weights_file import (
    CheckpointError,
    TorchScriptRefused,
    check_openclip_preprocess,
    is_torchscript,
    read_checkpoint,
    resolve_weights,
)

__all__ = [
    "CheckpointError",
    "LoadedClip",
    "ModelUnknown",
    "TorchScriptRefused",
    "from_state_dict",
    "infer_config",
    "load_clip",
    "model_digest",
    "read_checkpoint",
    "resolve_weights",
    "to_state_dict",
]

# entries OpenAI's TorchScript models carry besides parameters (`build_model` drops them too)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
MODEL_FLAG = "--model"  # the CLI flag that says which architecture a bare state dict holds


class ModelUnknown(CheckpointError):
    """Weights that do not say which architecture they are, or say it differently from the
    config given: a model name or config is needed (`--model`, `config=`)."""


def from_state_dict(
    sd_or_path: dict[str, Any] | str | os.PathLike,
    config: ModelConfig | str | dict | None = None,
    *,
    allow_torchscript: bool = False,
    **overrides: Any,
) -> CLIP:
    """A CLIP model in fp32 (eval mode) holding the weights of a state dict, a checkpoint file
    or an OpenCLIP hub folder.

    `config` (a ModelConfig, preset name, YAML/JSON path or dict) says the architecture; it is
    needed when the weights do not say it themselves (module docstring). `overrides` replace
    config fields, e.g. `grad_checkpointing=True`; giving all of activation, vision_head_width
    and text_heads also completes the sizes inferred from a bare state dict.
    """
    if isinstance(sd_or_path, str | os.PathLike):
        weights, hub_config = resolve_weights(sd_or_path)
        source = str(weights)
        obj = read_checkpoint(weights, allow_torchscript=allow_torchscript)
        torchscript = is_torchscript(weights)
    else:
        source, obj, hub_config, torchscript = "state dict", sd_or_path, None, False
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")

    said = _described(obj, hub_config, source)  # [(config, where it came from)]
    state_dict = _clean(obj, source)
    if config is not None:
        config = _load_config(config, source)
        for other, where in said:
            if not config.same_architecture(other):
                raise ModelUnknown(
                    f"{source}: {where} describes {_summary(other)}, but the model given is "
                    f"{_summary(config)}; leave out {MODEL_FLAG} (config=) or give the one that "
                    "matches the weights"
                )
    elif said:
        config = said[0][0]
    else:
        config = _inferred(state_dict, source, torchscript, overrides)
    if overrides:
        config = ModelConfig(**{**config.model_dump(), **overrides})

    model = CLIP(config)
    _check_fits(model, state_dict, source)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return model.float().eval()


def _load_config(config: ModelConfig | str | dict, source: str) -> ModelConfig:
    try:
        return ModelConfig.load(config)
    except ValueError as error:
        raise ModelUnknown(f"{source}: {MODEL_FLAG} {config}: {error}") from None


def _described(
    obj: dict[str, Any], hub_config: Path | None, source: str
) -> list[tuple[ModelConfig, str]]:
    """The architectures the checkpoint itself states, each with where it says so; they must
    agree with one another."""
    said = []
    if isinstance(obj.get("model_config"), dict | ModelConfig):
        said.append((obj["model_config"], "its model_config"))
    hparams = obj.get("hyper_parameters")
    if isinstance(hparams, dict) and isinstance(hparams.get("model"), dict):
        # A Lightning checkpoint of this project keeps the model config in its hyper-parameters.
        said.append((hparams["model"], "its hyper_parameters.model"))
    if hub_config is not None:
        check_openclip_preprocess(hub_config)
        said.append((hub_config, str(hub_config)))
    configs = []
    for config, where in said:
        try:
            configs.append((ModelConfig.load(config), where))
        except ValueError as error:
            raise CheckpointError(
                f"{source}: {where} is not a usable model config: {error}"
            ) from None
    for other, where in configs[1:]:
        if not other.same_architecture(configs[0][0]):
            raise CheckpointError(
                f"{source}: {configs[0][1]} ({_summary(configs[0][0])}) and {where} "
                f"({_summary(other)}) disagree"
            )
    return configs


def _inferred(
    state_dict: dict[str, torch.Tensor], source: str, torchscript: bool, overrides: dict
) -> ModelConfig:
    """Sizes from the shapes, completed by OpenAI's conventions for OpenAI's own release format
    or by overrides that give every convention; else ModelUnknown asking which model it is."""
    try:
        if torchscript:  # OpenAI's release format: QuickGELU, 64-wide heads
            config = infer_config(state_dict, source)
            presets = [n for n in matching_presets(config) if n.endswith("-quickgelu")]
            exact = [n for n in presets if ModelConfig.load(n).same_architecture(config)]
            return config.model_copy(update={"name": exact[0]}) if exact else config
        if all(k in overrides for k in CONVENTIONS):
            return infer_config(state_dict, source)  # the overrides replace the conventions
        sizes = infer_config(state_dict, source)
    except ArchitectureError as error:
        raise CheckpointError(str(error)) from None
    presets = matching_presets(sizes)
    hint = (
        f"its sizes match the presets {', '.join(presets)}"
        if presets
        else "no preset has its sizes: give a config YAML (configs/model/*.yaml shows the fields)"
    )
    raise ModelUnknown(
        f"{source} does not say which CLIP it holds. Its shapes give {describe_sizes(sizes)}, "
        "but not the activation (GELU or QuickGELU: OpenCLIP's ViT-B-32 and ViT-B-32-quickgelu "
        f"have identical tensors) nor the attention head width. Say which model it is: "
        f"{MODEL_FLAG} NAME or {MODEL_FLAG} config.yaml (config= in Python), or keep OpenCLIP's "
        f"{OPENCLIP_HUB_CONFIG} beside the weights; {hint}"
    )


def _summary(config: ModelConfig) -> str:
    act = "QuickGELU" if config.activation == "quick_gelu" else "GELU"
    return f"{config.name!r} ({act}, {config.vision_heads} vision / {config.text_heads} text heads)"


def to_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """OpenAI/OpenCLIP-named tensors on the CPU, unwrapped from DDP and torch.compile."""
    model = _unwrap(model)
    if not isinstance(model, CLIP):
        raise TypeError(f"expected a clip_model CLIP (or a DDP/compiled one), got {type(model)}")
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---- helpers ------------------------------------------------------------------------------


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
    model: ModelConfig | str | dict | None = None,
    allow_torchscript: bool = False,
) -> LoadedClip:
    """A checkpoint with its tokenizer: this project's (a training run's `step-N.ckpt` or an
    exported `{"state_dict", "model_config"}` file), OpenAI's or OpenCLIP's (a file, or a hub
    folder). `model` (`--model`): the architecture, needed when the weights do not say it.

    The tokenizer: `tokenizer` if given; else OpenAI's for a model with its vocabulary; else the
    BPE a training run saved (`tokenizer.json` beside the checkpoint or in the run folder above
    its `checkpoints/`). The checkpoint and the tokenizer may be fsspec URLs (`s3://...`): read
    from a local copy (storage.fs.local_path).
    """
    from storage.fs import is_local, local_path

    if not is_local(str(checkpoint)):
        return _load_remote_clip(str(checkpoint), tokenizer, model, allow_torchscript)
    path = Path(checkpoint).resolve()
    clip = from_state_dict(path, config=model, allow_torchscript=allow_torchscript)
    config = clip.config
    if tokenizer is not None and not is_local(str(tokenizer)):
        tokenizer = local_path(str(tokenizer))
    if tokenizer is None and config.tokenizer != "openai":
        folder = path if path.is_dir() else path.parent
        candidates = [folder / TOKENIZER_FILE, folder.parent / TOKENIZER_FILE]
        tokenizer = next((c for c in candidates if c.is_file()), None)
        if tokenizer is None:
            raise FileNotFoundError(
                f"{checkpoint}: the model uses a trained BPE vocabulary ({config.vocab_size} ids) "
                f"but no {TOKENIZER_FILE} is in {folder} or {folder.parent}; pass the "
                "tokenizer file explicitly"
            )
    tok = get_tokenizer(tokenizer or "openai", context_length=config.context_length)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer {tok.name} has {tok.vocab_size} ids, the model {config.vocab_size}"
        )
    return LoadedClip(clip, tok, config.image_size, model_digest(clip, tok), str(path))


def _load_remote_clip(
    url: str, tokenizer: str | os.PathLike | None, model: Any, allow_torchscript: bool
) -> LoadedClip:
    """`load_clip` of a checkpoint file on object storage: the file and its run's tokenizer (beside
    it or one folder up, as for a local run) read through local copies."""
    from storage.fs import exists, join, local_path

    if tokenizer is None:
        folder = url.rstrip("/").rsplit("/", 1)[0]
        candidates = [join(folder, TOKENIZER_FILE), join(folder.rsplit("/", 1)[0], TOKENIZER_FILE)]
        tokenizer = next((local_path(c) for c in candidates if exists(c)), None)
    loaded = load_clip(
        local_path(url), tokenizer=tokenizer, model=model, allow_torchscript=allow_torchscript
    )
    return loaded._replace(checkpoint=url)
