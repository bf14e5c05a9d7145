"""Image transforms: OpenCLIP's eval preprocess to 1e-5, the random square crop, odd modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_model.transforms import OPENAI_MEAN, OPENAI_STD, eval_transform, train_transform

PREPROCESS = Path(__file__).parent / "fixtures" / "openclip" / "preprocess"
EXPECTED = torch.load(PREPROCESS / "expected.pt")


def image(name: str) -> Image.Image:
    with Image.open(PREPROCESS / name) as im:
        im.load()
        return im


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([x.repeat(height, 0), y.repeat(width, 1), (x + y) / 2], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


@pytest.mark.parametrize("size", [32, 64, 224])
def test_eval_transform_matches_openclip_preprocess(size):
    # the fixture holds an RGB landscape, a grey portrait, an RGBA square and a 97x31 strip
    assert [image(f).mode for f in EXPECTED["files"]] == ["RGB", "L", "RGBA", "RGB"]
    transform = eval_transform(size)
    got = torch.stack([transform(image(f)) for f in EXPECTED["files"]])
    assert got.shape == (4, 3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, EXPECTED["by_size"][size], atol=1e-5, rtol=0)
    assert list(OPENAI_MEAN) == EXPECTED["mean"] and list(OPENAI_STD) == EXPECTED["std"]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK", "I", "F"])
def test_any_image_mode_becomes_a_three_channel_tensor(mode):
    picture = gradient(40, 30).convert(mode)
    out = eval_transform(24)(picture)
    assert out.shape == (3, 24, 24) and torch.isfinite(out).all()
    if mode in ("L", "1"):  # grey: three equal channels before normalisation
        pixels = out * torch.tensor(OPENAI_STD).view(3, 1, 1) + torch.tensor(OPENAI_MEAN).view(
            3, 1, 1
        )
        torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)


def test_palette_images_are_converted_before_resizing_not_resized_with_nearest():
    picture = gradient(60, 40)
    palette = picture.quantize(colors=256)
    torch.testing.assert_close(
        eval_transform(32)(palette), eval_transform(32)(palette.convert("RGB")), atol=0, rtol=0
    )


def test_non_image_input_is_a_type_error():
    with pytest.raises(TypeError, match="expected a PIL.Image.Image, got ndarray"):
        eval_transform(32)(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="got Tensor"):
        train_transform(32)(torch.zeros(3, 32, 32))


def test_train_crop_is_reproducible_from_a_seed_or_generator_and_varies_between_draws():
    picture = gradient(90, 60)
    a = train_transform(32, generator=7)(picture)
    b = train_transform(32, generator=torch.Generator().manual_seed(7))(picture)
    assert a.shape == (3, 32, 32)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    transform = train_transform(32, generator=7)
    draws = [transform(picture) for _ in range(4)]
    assert not torch.equal(draws[0], draws[1])  # a new crop every call


def test_train_crop_at_full_scale_of_a_square_image_is_the_eval_transform():
    picture = gradient(48, 48)
    full = train_transform(32, scale=(1.0, 1.0), generator=0)(picture)
    torch.testing.assert_close(full, eval_transform(32)(picture), atol=0, rtol=0)


def test_train_crop_is_a_square_of_the_image_not_a_squashed_whole():
    # 40 x 400, left half black, right half white: a square crop (side >= sqrt(0.9) x 40) lies
    # wholly in one half most of the time; squashing the whole image would always mix both
    array = np.zeros((40, 400, 3), dtype=np.uint8)
    array[:, 200:] = 255
    transform = train_transform(16, generator=1)
    crops = [transform(Image.fromarray(array)) for _ in range(30)]
    black = eval_transform(16)(Image.new("RGB", (16, 16), "black"))
    white = eval_transform(16)(Image.new("RGB", (16, 16), "white"))
    assert any(torch.allclose(crop, black, atol=1e-5) for crop in crops)
    assert any(torch.allclose(crop, white, atol=1e-5) for crop in crops)


def test_bad_sizes_and_scales_are_refused():
    with pytest.raises(ValueError, match="size=0"):
        eval_transform(0)
    with pytest.raises(ValueError, match=r"scale=\(0.0, 1.0\)"):
        train_transform(32, scale=(0.0, 1.0))
