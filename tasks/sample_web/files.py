"""Bytes of the sample web's files: image encodings, hashes, and a digest of a whole folder."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

JPEG_QUALITY = 90


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def directory_digest(root: str | Path) -> str:
    """sha256 over every file's relative path and bytes under root, in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
