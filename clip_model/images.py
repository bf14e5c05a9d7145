"""The one image decoder: encoded bytes in, an RGB PIL image out, the same pixels on every path.

    from clip_model.images import ImageDecodeError, decode_image

    image = decode_image(data, name="00003.tar:0000042.jpg")   # RGB, EXIF orientation applied
    image = decode_image(data, name=key, draft_size=64)        # a big JPEG may decode at 1/2..1/8

Every stage decodes through here: the crawl (img2dataset's processes, through tasks/crawl.py),
the training workers, curation, evaluation, the index, the search page and the pyfunc model.
A failure raises `ImageDecodeError`, whose `reason` is one of `REASONS`, so every stage counts
the same reasons.

**Size first** (docs/design.md, trap 13). The header is read before any pixel is decoded; an
image declaring more than `MAX_PIXELS` pixels is refused as `too_large`. A 283 KiB PNG can
declare 256 Mpx (768 MiB as RGB), a 629-byte JPEG 144 Mpx: without the check each costs
gigabytes in every worker that meets it. The cap is `CLIP_MAX_IMAGE_PIXELS` (read at import),
by default 89,478,485 px: Pillow's own threshold (a quarter gibibyte of 3-byte pixels), about
9,459 x 9,459. It passes the photos cameras and phones commonly save (a 50 Mpx camera's
8,192 x 6,144 included) and every image a web page shows, bounds one decoded image at 268 MB,
and is where Pillow alone starts warning. It is also set as Pillow's `MAX_IMAGE_PIXELS` and,
before OpenCV is imported, as `OPENCV_IO_MAX_IMAGE_PIXELS` (inherited by child processes such
as img2dataset's), so neither library decodes past it even when called directly.

**Modes** (normalised identically everywhere, `to_rgb`):

- EXIF orientation is applied (what a browser shows, and what the caption describes).
- Transparency (RGBA, LA, palette or grey with a transparent colour) is composited on white:
  the page a web image was shown on, and what img2dataset does for the crawl.
- 16-bit grey and RGB keep their top 8 bits (v >> 8, as libpng and Pillow's RGB;16 do): a
  16-bit image gives exactly the pixels of its 8-bit equivalent (Pillow's plain `convert`
  clips 16-bit grey at 255, a washed-out image of mean ~251).
- CMYK uses Pillow's conversion R = (255 - C)(255 - K) / 255; palette and 1-bit expand.
- Floating-point and other modes without a defined 8-bit range are refused (`undecodable`).

Formats: JPEG (and its MPO variant), PNG, WebP, GIF (first frame), BMP, TIFF, AVIF where Pillow
has it; anything else is `undecodable` (Pillow is never asked to try its other plugins, some of
which run external programs).

**Speed** (`bench/decode.py`). A JPEG in RGB or grey decodes with OpenCV's `imdecode` (about 2x
Pillow at training sizes), which gives bit-identical pixels to Pillow plus EXIF orientation (the
same libjpeg-turbo; tests/faults/test_decode.py checks it); with `draft_size`, a JPEG at least twice
that size decodes with Pillow's draft mode at 1/2, 1/4 or 1/8 scale instead, never below
`draft_size` (3x plain Pillow). Everything else decodes with Pillow. Reading the header first
costs what the training decoder already paid (it opened every JPEG with Pillow), and refusing a
pixel bomb takes about 25 us.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Final

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "REASONS",
    "ImageDecodeError",
    "decode_image",
    "image_header",
    "orientation",
    "to_rgb",
]

MAX_PIXELS_ENV: Final = "CLIP_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS: Final = 89_478_485  # Pillow's MAX_IMAGE_PIXELS default (see above)
REASONS: Final = ("undecodable", "too_large")
FORMATS: Final = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
WHITE: Final = (255, 255, 255)
_ACCEPTED = "a JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF image"


def _configured_cap() -> int:
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"{MAX_PIXELS_ENV}={text!r}: expected a positive whole number of pixels "
            f"(default {DEFAULT_MAX_PIXELS})"
        )
    return value


MAX_PIXELS: Final = _configured_cap()


def _opencv_cap() -> str:
    """OpenCV's cap: ours, or a lower one already set (by the user, or inherited)."""
    try:
        inherited = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", ""))
    except ValueError:
        inherited = MAX_PIXELS
    return str(min(max(inherited, 1), MAX_PIXELS))


# OpenCV reads its cap once, when its library loads (docs/design.md, trap 13): set it before the
# import, and in the environment so that processes started from this one (img2dataset's crawl
# workers) inherit it.
os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = _opencv_cap()
import cv2  # noqa: E402

cv2.setNumThreads(1)  # one decode per process or thread; OpenCV's own pool only adds contention
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow warns between 1x and 2x its cap and raises above; images over the cap are refused here
# as `too_large` either way, so its warning only repeats what the counted reason says.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
Image.init()
_OPEN_FORMATS: Final = [f for f in FORMATS if f in Image.OPEN]


class ImageDecodeError(ValueError):
    """An image that cannot be used: `reason` is "undecodable" or "too_large" (see REASONS)."""

    def __init__(self, reason: str, detail: str, *, name: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
        self.reason, self.detail, self.name = reason, detail, name
        super().__init__(f"{name}: {detail}" if name else detail)


def _undecodable(name: str | None, problem: object) -> ImageDecodeError:
    return ImageDecodeError(
        "undecodable", f"image does not decode ({problem}); expected {_ACCEPTED}", name=name
    )


def _too_large(name: str | None, size: str) -> ImageDecodeError:
    return ImageDecodeError(
        "too_large",
        f"image too large: {size}, over the cap of {MAX_PIXELS / 1e6:.1f} Mpx ({MAX_PIXELS_ENV})",
        name=name,
    )


def image_header(data: bytes, name: str | None = None) -> Image.Image:
    """The image opened lazily (format, mode and size read from its header, no pixel decoded);
    ImageDecodeError if it is no image we read or declares more than MAX_PIXELS pixels."""
    if not data:
        raise _undecodable(name, "empty: 0 bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as e:  # over twice the cap: Pillow refuses to open it
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)) / 1e6:.1f} Mpx" if found else "over twice the cap"
        raise _too_large(name, size) from None
    except UnidentifiedImageError:
        raise _undecodable(name, "not an image format we read") from None
    except Exception as e:  # noqa: BLE001 - a broken header: any parser error is the file's
        raise _undecodable(name, f"broken header: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _too_large(name, f"{width} x {height} = {width * height / 1e6:.1f} Mpx")
    if width < 1 or height < 1:
        raise _undecodable(name, f"empty image ({width} x {height})")
    return image


def decode_image(data: bytes, name: str | None = None, *, draft_size: int | None = None):
    """RGB PIL image of encoded `data`; `name` (a path, a shard and key) goes into errors.

    `draft_size`: the caller resizes to this many pixels on the shorter side anyway, so a JPEG
    at least twice as large may decode at a reduced scale (never below it).
    Raises ImageDecodeError (reason `undecodable` or `too_large`); MemoryError propagates.
    """
    image = image_header(data, name)
    try:
        if image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L"):
            if draft_size and min(image.size) >= 2 * draft_size:
                image.draft("RGB", (draft_size, draft_size))
            else:
                fast = _opencv_jpeg(data)
                if fast is not None:
                    return fast
        image.load()
        return to_rgb(image)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - truncated data, bad chunks: all the file's fault
        raise _undecodable(name, f"{type(e).__name__}: {e}") from None


def _opencv_jpeg(data: bytes) -> Image.Image | None:
    """OpenCV's decode of an RGB or grey JPEG, EXIF orientation applied (IMREAD_COLOR does),
    bit-identical to Pillow's; None when OpenCV cannot (Pillow then says why)."""
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if array is None:
        return None
    return Image.fromarray(cv2.cvtColor(array, cv2.COLOR_BGR2RGB))


_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright, as stored; 2..8: flips and rotations)."""
    try:
        return int(image.getexif().get(0x0112, 1))  # 0x0112: Orientation
    except Exception:  # noqa: BLE001 - a broken EXIF block never costs the image
        return 1


def _sixteen_bit(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grey -> 8-bit grey, keeping the top byte; a transparent grey
    value (PNG tRNS) becomes alpha."""
    values = np.asarray(image).astype(np.int64)
    grey = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    key = image.info.get("transparency")
    if isinstance(key, int):
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        return _on_white(grey.convert("RGB"), alpha)
    return grey.convert("RGB")


def _on_white(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    page = Image.new("RGB", rgb.size, WHITE)
    page.paste(rgb, mask=alpha)
    return page


def to_rgb(image: Image.Image) -> Image.Image:
    """The mode normalisation every path shares (module docstring): an RGB image, upright."""
    turn = _ORIENTATION.get(orientation(image))
    mode = image.mode
    if mode.startswith("I"):
        out = _sixteen_bit(image)
    elif mode == "F":
        raise ValueError("floating-point pixels (mode F) have no defined 8-bit range")
    elif mode == "RGB":
        out = image
    elif image.has_transparency_data:
        rgba = image.convert("RGBA")
        out = _on_white(rgba.convert("RGB"), rgba.getchannel("A"))
    else:
        out = image.convert("RGB")
    if turn is not None:
        out = out.transpose(turn)
    return out
