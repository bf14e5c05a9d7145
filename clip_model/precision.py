"""One precision vocabulary for training, evaluation, indexing and curation's CLIP score.

This project's spellings, Lightning's and OpenCLIP's each name one of five behaviours:

    name       also accepted                               weights  autocast  Lightning
    fp32       32, 32-true, float32                        fp32     off       32-true
    bf16       bf16-mixed, amp_bf16, amp_bfloat16          fp32     bf16      bf16-mixed
    fp16       16, 16-mixed, amp, amp_fp16, fp16-mixed     fp32     fp16      16-mixed
    pure_bf16  bf16-true                                   bf16     off       bf16-true
    pure_fp16  16-true                                     fp16     off       16-true

A bare `bf16` / `fp16` means mixed precision (fp32 weights, matmuls and convolutions in the low
precision under autocast), as it did here before and as Lightning reads `bf16` / `16`. OpenCLIP
reads its `bf16` / `fp16` as "cast the weights": the same numbers up to rounding, but half the
weight memory; here that is `pure_bf16` / `pure_fp16` (the whole model cast; LayerNorms still
compute in fp32, clip_model.model.LayerNorm). The safe reading wins where the spellings
disagree: a training config that says `bf16` never trains with bf16 weights by surprise.

`fp16` is for GPUs without bfloat16 (before Ampere: V100, T4); `Precision.check_device` refuses
bf16 on such a GPU and says so. Both low precisions run on a CPU too (bf16 matmuls are
about 3x faster than fp32 on AVX512-BF16 CPUs: docs/design.md, trap 10).

    precision = parse_precision("amp_bf16")         # -> Precision("bf16", ...)
    model = precision.prepare(model)                 # casts pure_* models in place
    with torch.no_grad(), precision.autocast(device):
        features = model.encode_image(images)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "Precision", "accepted_spellings", "parse_precision"]

DtypeName = Literal["fp32", "bf16", "fp16"]


def _dtype(name: DtypeName) -> torch.dtype:
    import torch  # here, not at import: CLIs validate a precision before loading torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass(frozen=True)
class Precision:
    """How a model computes: the dtype of its weights and of autocast (None: off)."""

    name: str
    weights_name: DtypeName
    autocast_name: DtypeName | None
    lightning: str  # Trainer(precision=...)

    def __str__(self) -> str:
        return self.name

    @property
    def weights(self) -> torch.dtype:
        return _dtype(self.weights_name)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.autocast_name is None else _dtype(self.autocast_name)

    @property
    def low(self) -> DtypeName | None:
        """The low precision in use, if any: "bf16" or "fp16"."""
        if self.autocast_name is not None:
            return self.autocast_name
        return None if self.weights_name == "fp32" else self.weights_name

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """Autocast for mixed precisions on `device`'s type; a no-op for fp32 and pure_*."""
        import torch

        if self.autocast_name is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.autocast_dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` with weights in this precision's dtype (cast in place for pure_*; mixed and
        fp32 keep fp32 weights). Casting to bf16/fp16 loses bits: cast a model you loaded for
        this purpose, not one you are training."""
        return model.to(self.weights)

    def check_model(self, model: torch.nn.Module) -> None:
        """ValueError if a pure_* precision is given a model whose weights are not in its dtype
        (it would silently compute in fp32). Mixed precisions take any model."""
        if self.weights_name == "fp32":
            return
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype is not None and dtype != self.weights:
            raise ValueError(
                f"precision {self.name} computes with {self.weights_name} weights but the "
                f"model's are {dtype}: call parse_precision({self.name!r}).prepare(model) first "
                "(or choose a mixed precision: fp32, bf16, fp16)"
            )

    def check_device(self, device: torch.device | str) -> None:
        """ValueError when `device` cannot compute in this precision (bf16 on a GPU before
        Ampere), naming the device and what to use instead."""
        import torch

        device = torch.device(device)
        if self.low != "bf16" or device.type != "cuda" or not torch.cuda.is_available():
            return  # a missing GPU fails on its own, with its own message
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            major, minor = torch.cuda.get_device_capability(device)
            raise ValueError(
                f"precision {self.name}: {name} (compute capability {major}.{minor}) has no "
                "bfloat16 arithmetic; use fp16 (mixed, fp32 weights) or pure_fp16 on this GPU"
            )


_FP32 = Precision("fp32", "fp32", None, "32-true")
_BF16 = Precision("bf16", "fp32", "bf16", "bf16-mixed")
_FP16 = Precision("fp16", "fp32", "fp16", "16-mixed")
_PURE_BF16 = Precision("pure_bf16", "bf16", None, "bf16-true")
_PURE_FP16 = Precision("pure_fp16", "fp16", None, "16-true")
# every accepted spelling -> its behaviour (this project's, Lightning's, OpenCLIP's)
PRECISIONS: dict[str, Precision] = {
    "fp32": _FP32,
    "32": _FP32,
    "32-true": _FP32,
    "float32": _FP32,
    "bf16": _BF16,
    "bf16-mixed": _BF16,
    "amp_bf16": _BF16,
    "amp_bfloat16": _BF16,
    "fp16": _FP16,
    "16": _FP16,
    "16-mixed": _FP16,
    "fp16-mixed": _FP16,
    "amp": _FP16,
    "amp_fp16": _FP16,
    "pure_bf16": _PURE_BF16,
    "bf16-true": _PURE_BF16,
    "pure_fp16": _PURE_FP16,
    "16-true": _PURE_FP16,
}


def accepted_spellings() -> str:
    """The accepted spellings, grouped by behaviour, for error and help messages."""
    groups: dict[str, list[str]] = {}
    for spelling, precision in PRECISIONS.items():
        groups.setdefault(precision.name, []).append(spelling)
    return "; ".join(" = ".join(names) for names in groups.values())


def parse_precision(value: Any) -> Precision:
    """The Precision a spelling names (a Precision passes through; YAML's 32 and 16 are ints).
    ValueError naming the value and every accepted spelling otherwise."""
    if isinstance(value, Precision):
        return value
    key = str(value).strip().lower() if isinstance(value, str | int) else None
    if key not in PRECISIONS:
        raise ValueError(f"precision {value!r} is not one of: {accepted_spellings()}")
    return PRECISIONS[key]
