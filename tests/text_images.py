"""Images with text drawn by Pillow in a real CJK font (Debian's fonts-wqy-microhei, which .ci/run
installs), for the text-fidelity tests and bench/bench_ocr.py."""

from __future__ import annotations

import io
from pathlib import Path

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
NO_FONT = f"the CJK font {FONT} is absent: apt-get install fonts-wqy-microhei (.ci/run does)"


def draw_text(lines: list[str], width: int = 640, height: int = 320, *, font_size: int | None = None,
              background=(250, 246, 236), ink=(24, 24, 48)):
    """A PIL image showing `lines` (top to bottom, left-aligned) on a plain background."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), background)
    if not lines:
        return image
    size = font_size or max(16, min(width, height) // 7)
    font = ImageFont.truetype(str(FONT), size)
    draw = ImageDraw.Draw(image)
    y = max(8, (height - int(size * 1.6) * len(lines)) // 2)
    for line in lines:
        draw.text((max(8, width // 16), y), line, font=font, fill=ink)
        y += int(size * 1.6)
    return image


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
