"""The one embedder: L2-normalised CLIP features of images and texts, in batches, for every stage
that embeds (evaluation, the index and search, curation's CLIP score, the pyfunc model).

    from clip_model.embedder import Embedder

    embedder = Embedder.of(load_clip("run/checkpoints/last.ckpt"), device="auto", precision="bf16")
    images = embedder.images([Path("a.jpg"), jpeg_bytes, pil_image])  # [3, D] float32, on the CPU
    texts = embedder.texts(["a photo of a dog."])                     # [1, D]
    scores = embedder.pairs(pixels, captions)                         # cosine per (image, caption)

Images are decoded by clip_model.images (an ImageDecodeError names the file or item that does
not decode) and go through clip_model.transforms.eval_transform at the model's image size, in a
DataLoader with `num_workers` workers; `pixels` embeds a batch that is already transformed (the
curation workers produce those).

**Device and precision** (one policy). `device="auto"` is the first CUDA GPU when there is one,
else the CPU; `precision` is any spelling of clip_model.precision (`fp32`, `bf16`, `amp_bf16`,
`pure_fp16`, ...), checked against the device. Given a device, the embedder owns the model: it
moves it there and, for a pure_* precision, casts its weights in place. With `device=None` the
model stays where and as it is (a model being trained, evaluated in between steps) and must
already have the precision's weights. The model is put in eval mode while it embeds and given
back in the mode it was in.

**Progress.** Each call shows a per-batch progress bar (clip_model.progress: on stderr when it is
a terminal, quiet in CI logs and services, `CLIP_PIPELINE_PROGRESS` overrides); `progress=False`
silences it for a caller that shows its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_model.images import decode_image, to_rgb
from clip_model.precision import Precision, parse_precision
from clip_model.progress import progress_bar
from clip_model.transforms import eval_transform

if TYPE_CHECKING:
    from clip_model.checkpoint import LoadedClip

__all__ = ["Embedder", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: the first CUDA GPU when there is one, else the CPU; anything else as torch reads
    it (`cpu`, `cuda`, `cuda:1`, `mps`), ValueError naming it if torch cannot."""
    if isinstance(device, torch.device):
        return device
    if str(device).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(str(device).strip())
    except RuntimeError as e:
        raise ValueError(
            f"device {device!r} is not one torch knows ({e}); use auto, cpu, cuda, cuda:N"
        ) from None


def _picture(item: Any, index: int) -> Image.Image:
    """An RGB image of one input: a PIL image, encoded bytes, or a file (a path, or anything
    with `read_bytes()` such as clip_model.eval_data.TarMember)."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, bytes | bytearray | memoryview):
        return decode_image(bytes(item), f"image {index}")
    if isinstance(item, str):
        item = Path(item)
    return decode_image(item.read_bytes(), str(item))


class _Pictures(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Any], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(_picture(self.items[i], i))


class Embedder:
    """Normalised float32 image and text features of a CLIP (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        image_size: int | None = None,
        device: str | torch.device | None = "auto",
        precision: str | Precision = "fp32",
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.precision = parse_precision(precision)
        if device is None:  # the caller's model, where and as it is
            self.device = next(model.parameters()).device
            self.precision.check_model(model)
        else:
            self.device = resolve_device(device)
            self.precision.check_device(self.device)
            model = self.precision.prepare(model.to(self.device))
        self.model, self.tokenizer = model, tokenizer
        self.image_size = image_size or model.config.image_size
        self.transform = eval_transform(self.image_size)
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress

    @classmethod
    def of(cls, clip: LoadedClip, **options: Any) -> Embedder:
        """The embedder of a loaded checkpoint (clip_model.checkpoint.load_clip): its model,
        tokenizer and image size; `options` as for the constructor."""
        return cls(clip.model, clip.tokenizer, image_size=clip.image_size, **options)

    @property
    def dim(self) -> int:
        config = getattr(self.model, "config", None)
        return getattr(config, "embed_dim", 0)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """The model in eval mode, without gradients, under the precision's autocast (its mode
        given back afterwards): what every embedding call runs in, for maths built on the
        model directly (clip_model.zero_shot.zero_shot_classifier)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), self.precision.autocast(self.device):
                yield
        finally:
            self.model.train(was_training)

    def _bar(self, total: int, unit: str, desc: str | None):
        enabled = False if self.progress is False else None
        return progress_bar(total=total, unit=unit, desc=desc or f"embed {unit}s", enabled=enabled)

    def _features(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1)

    def pixels(self, batch: torch.Tensor) -> torch.Tensor:
        """Features [B, D] (on the embedder's device) of one batch of transformed images."""
        with self.inference():
            return self._features(self.model.encode_image(batch.to(self.device)))

    def images(self, items: Sequence[Any], *, desc: str | None = None) -> torch.Tensor:
        """Features [N, D] (float32, CPU) of PIL images, encoded bytes or image files."""
        loader = torch.utils.data.DataLoader(
            _Pictures(items, self.transform),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
        out: list[torch.Tensor] = []
        with self._bar(len(items), "image", desc) as bar, self.inference():
            for batch in loader:
                features = self.model.encode_image(batch.to(self.device, non_blocking=True))
                out.append(self._features(features).cpu())
                bar.update(len(batch))
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    def _tokens(self, texts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this Embedder has no tokenizer: give one to embed texts")
        return self.tokenizer([str(t) for t in texts]).to(self.device)

    def texts(self, texts: Sequence[str], *, desc: str | None = None) -> torch.Tensor:
        """Features [N, D] (float32, CPU) of texts."""
        out: list[torch.Tensor] = []
        with self._bar(len(texts), "text", desc) as bar, self.inference():
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start : start + self.batch_size]
                out.append(self._features(self.model.encode_text(self._tokens(chunk))).cpu())
                bar.update(len(chunk))
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    def pairs(self, pixels: torch.Tensor, captions: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each (transformed image, caption) pair: [B] float32 (a CLIP score
        before any scaling)."""
        if len(pixels) != len(captions):
            raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
        with self.inference():
            images = self._features(self.model.encode_image(pixels.to(self.device)))
            texts = self._features(self.model.encode_text(self._tokens(captions)))
        return (images * texts).sum(-1).cpu().numpy()
