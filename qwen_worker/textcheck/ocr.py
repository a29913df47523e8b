"""Reading the text in an image: RapidOCR (PP-OCRv6 small detection + recognition, Chinese and
English, ONNX on the CPU through onnxruntime), whose models ship inside its wheel: nothing is
downloaded, ever, so it works on an offline worker.

One engine per process, made on first use (its models load lazily, ~0.5 s) and shared by every
thread: `engine()`. Its onnxruntime thread count is `threads` on first use, else the environment
variable QWEN_BATCH_OCR_THREADS, else onnxruntime's default (every core). On a render worker set
it low, so that OCR runs beside rendering without starving the GPU's feeder threads.

Why RapidOCR 3.10 (measured on this project's drawn test images, see bench/bench_ocr.py): it
read Chinese, English and mixed lines as well as rapidocr_onnxruntime 1.4.4 (PP-OCRv4) at the
same speed (~0.3-0.5 s per megapixel on one shared core pair), and it depends on
opencv-python-headless, where rapidocr_onnxruntime needs the GUI build of OpenCV, which fails to
import on hosts without libGL (slim worker images).
"""

from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from qwen_worker.errors import UserError, WorkerError

THREADS_ENV = "QWEN_BATCH_OCR_THREADS"

_lock = threading.Lock()
_engine = None


class UnreadableImageError(UserError):
    """The bytes or file given are not an image Pillow can decode."""


@dataclass(frozen=True)
class OcrLine:
    """One text line the OCR found: its text, the recogniser's confidence (0-1), and its box (four
    [x, y] corners, clockwise from top-left, in the image's pixels)."""

    text: str
    confidence: float
    box: list[list[float]]

    def to_dict(self) -> dict:
        return {"text": self.text, "confidence": round(self.confidence, 4), "box": self.box}


@dataclass(frozen=True)
class OcrReading:
    """What the OCR read in one image: its lines in reading order (top to bottom, left to right),
    the image's size and the seconds the OCR took."""

    lines: list[OcrLine] = field(default_factory=list)
    width: int = 0
    height: int = 0
    seconds: float = 0.0

    @property
    def text(self) -> str:
        """The lines joined with a space (scoring ignores whitespace, so no line break is lost)."""
        return " ".join(line.text for line in self.lines)


def engine(threads: int | None = None):
    """The process-wide RapidOCR engine, made on first use. `threads` (or $QWEN_BATCH_OCR_THREADS)
    counts only on that first use. WorkerError when the OCR package cannot be loaded here."""
    global _engine
    if _engine is not None:
        return _engine
    with _lock:
        if _engine is None:
            _engine = _make_engine(threads)
    return _engine


def _make_engine(threads: int | None):
    if threads is None and os.environ.get(THREADS_ENV, "").strip():
        try:
            threads = int(os.environ[THREADS_ENV])
        except ValueError:
            raise UserError(f"{THREADS_ENV} must be a whole number of threads, got: {os.environ[THREADS_ENV]!r}") from None
    if threads is not None and threads < 1:
        raise UserError(f"OCR threads must be at least 1, got: {threads}")
    try:
        from rapidocr import RapidOCR
    except ImportError as exc:  # the package, onnxruntime, or a system library OpenCV needs
        raise WorkerError(f"the OCR engine cannot be loaded here: {exc} (pip install 'rapidocr==3.10.0' onnxruntime)") from exc
    params: dict[str, Any] = {"Global.log_level": "error"}
    if threads is not None:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
        params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
    return RapidOCR(params=params)


def load_image(image):
    """`image` (PNG/JPEG/WebP/... bytes, a PIL image, or an H×W×3 RGB uint8 array) as an RGB PIL
    image; transparency is flattened onto white. UnreadableImageError for bytes that are not an
    image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(bytes(image)))
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UnreadableImageError(f"not a readable image: {_first_line(exc)}") from None
    elif not isinstance(image, Image.Image):
        try:
            image = Image.fromarray(image)
        except (TypeError, ValueError, AttributeError) as exc:
            raise UnreadableImageError(f"not an image: {type(image).__name__} ({_first_line(exc)})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def read_text(image) -> OcrReading:
    """Read the text in `image` (bytes, a PIL image or an RGB array; see `load_image`)."""
    import numpy as np

    rgb = load_image(image)
    ocr = engine()
    bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])  # RapidOCR takes OpenCV's channel order
    start = time.perf_counter()
    result = ocr(bgr)
    seconds = time.perf_counter() - start
    lines = []
    if result.txts:
        for text, score, box in zip(result.txts, result.scores, result.boxes):
            corners = [[round(float(x), 1), round(float(y), 1)] for x, y in np.asarray(box).tolist()]
            lines.append(OcrLine(text=str(text), confidence=float(score), box=corners))
    return OcrReading(lines=lines, width=rgb.width, height=rgb.height, seconds=seconds)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
