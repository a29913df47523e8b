"""Image encoding: deterministic bytes for a given image (no timestamps, fixed settings)."""

from __future__ import annotations

import io

FORMATS = {
    # format: (file extension, content type, PIL save options)
    "png": (".png", "image/png", {"format": "PNG", "compress_level": 6}),
    "webp": (".webp", "image/webp", {"format": "WEBP", "quality": 95, "method": 4}),
    "jpeg": (".jpg", "image/jpeg", {"format": "JPEG", "quality": 95, "subsampling": 0}),
}


def extension(fmt: str) -> str:
    return FORMATS[fmt][0]


def content_type(fmt: str) -> str:
    return FORMATS[fmt][1]


def encode_image(image, fmt: str) -> bytes:
    """Encode a PIL image to `fmt` (png|webp|jpeg)."""
    _ext, _type, options = FORMATS[fmt]
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, **options)
    return buffer.getvalue()
