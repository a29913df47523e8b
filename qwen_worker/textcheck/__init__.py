"""Text-fidelity QA: read back the text drawn in an image and score it against what the row asked for.

    expected_texts(prompt, text=None) -> list[str]        the strings a row expects (expected.py)
    check_image(image, expected) -> TextCheck              OCR + score one image (check.py)
    score_text(read, expected) -> TextCheck                score OCR text without OCR (check.py)
    read_text(image) -> OcrReading                         the OCR alone (ocr.py)
    normalize / string_score                               the scoring rules (score.py)

Nothing heavy is imported here: the OCR engine (rapidocr, onnxruntime, OpenCV) loads on first use.
"""

from qwen_worker.textcheck.check import TextCheck, check_image, score_text
from qwen_worker.textcheck.expected import expected_texts, explicit_strings, quoted_strings
from qwen_worker.textcheck.score import MISSING_BELOW, normalize, string_score

__all__ = [
    "MISSING_BELOW", "TextCheck", "check_image", "expected_texts", "explicit_strings", "normalize",
    "quoted_strings", "score_text", "string_score",
]
