"""Image transforms with PIL and torch only (no torchvision).

`eval_transform(size)` is OpenAI's/OpenCLIP's preprocess: resize the shortest side to `size`
with bicubic filtering, centre crop, scale to [0, 1] and normalise with OpenAI's mean/std. It
reproduces torchvision's `Resize(size, BICUBIC) -> CenterCrop(size)` on PIL images exactly.

`train_transform(size)` adds the paper's only augmentation, a random square crop: a square of
side sqrt(U(scale)) x the shortest side (scale=(0.9, 1.0), the area range OpenCLIP's default
RandomResizedCrop uses, but always square so objects are never stretched) at a uniformly random
position, resized to `size`.

Grey, RGBA, palette and other modes become RGB. As OpenCLIP, L/LA/RGB/RGBA are resized in their
own mode (PIL premultiplies alpha) and converted after the crop; palette and exotic modes are
converted first, because PIL would resize a palette image with nearest-neighbour.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_RESIZABLE_MODES = ("RGB", "RGBA", "L", "LA")


def _check_image(image: object) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.mode not in _RESIZABLE_MODES:
        # palette with transparency keeps its alpha until the final RGB conversion
        has_alpha = image.mode == "P" and "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    return image


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's `Resize(size)` semantics: the long side is truncated, not rounded."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]: a quarter of float32's bytes between processes."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float, (x / 255 - mean) / std, on the tensor's own device (the
    training batch is normalised on the GPU, after a uint8 transfer)."""
    mean = torch.tensor(OPENAI_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=images.device).view(3, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float [3, H, W], (x / 255 - mean) / std."""
    return normalize(to_uint8_tensor(image))


class EvalTransform:
    def __init__(self, size: int, *, uint8: bool = False):
        if size <= 0:
            raise ValueError(f"size={size} must be positive")
        self.size, self.uint8 = size, uint8

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = center_crop(resize_shortest_side(_check_image(image), self.size), self.size)
        return to_uint8_tensor(image) if self.uint8 else to_normalized_tensor(image)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}{', uint8' if self.uint8 else ''})"


class TrainTransform:
    def __init__(
        self,
        size: int,
        *,
        scale: tuple[float, float] = (0.9, 1.0),
        generator: torch.Generator | int | None = None,
        uint8: bool = False,
    ):
        if size <= 0:
            raise ValueError(f"size={size} must be positive")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale={scale}: expected 0 < min <= max <= 1 (area fractions)")
        self.size, self.scale, self.uint8 = size, scale, uint8
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        # None: torch's global RNG, which DataLoader seeds differently in every worker
        self.generator = generator

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _check_image(image)
        w, h = image.size
        u = torch.rand(3, generator=self.generator).tolist()
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        side = max(1, round(min(w, h) * math.sqrt(area)))
        left = int(u[1] * (w - side + 1))
        top = int(u[2] * (h - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        if side != self.size:
            crop = crop.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return to_uint8_tensor(crop) if self.uint8 else to_normalized_tensor(crop)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(size={self.size}, scale={self.scale}{', uint8' if self.uint8 else ''})"
        )


def eval_transform(size: int, *, uint8: bool = False) -> EvalTransform:
    """PIL image -> float [3, size, size]: shortest side to `size` (bicubic), centre crop.
    `uint8`: the pixels before normalisation (`normalize` them later, e.g. on the GPU)."""
    return EvalTransform(size, uint8=uint8)


def train_transform(
    size: int,
    *,
    scale: tuple[float, float] = (0.9, 1.0),
    generator: torch.Generator | int | None = None,
    uint8: bool = False,
) -> TrainTransform:
    """PIL image -> float [3, size, size]: a random square crop (the paper's only augmentation).

    `generator` (a torch.Generator or a seed) makes the crops reproducible; leave it None inside
    DataLoader workers, whose global RNGs torch seeds apart (a shared seed repeats crops).
    `uint8`: the pixels before normalisation (`normalize` them later, e.g. on the GPU).
    """
    return TrainTransform(size, scale=scale, generator=generator, uint8=uint8)
