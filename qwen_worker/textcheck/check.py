"""One image against the text it should show: `check_image` (OCR, then `score_text`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_worker.textcheck.score import MISSING_BELOW, missing_strings, normalize, overall_score, string_score


@dataclass(frozen=True)
class TextCheck:
    """The text-fidelity of one image.

    expected: the strings it should show; scores: one per expected string (1 - CER of its best
    match in the read text, see qwen_worker.textcheck.score); score: their character-weighted mean,
    None when nothing was checked (no expected string with a letter, digit or symbol in it);
    missing: the expected strings scoring below the threshold; read: what the OCR read (lines
    joined with a space); ocr_seconds: how long the OCR took (0 when it did not run)."""

    expected: list[str]
    scores: list[float]
    score: float | None
    missing: list[str]
    read: str
    ocr_seconds: float = 0.0
    lines: list = field(default_factory=list, repr=False)  # the OcrLine list, for who wants boxes

    @property
    def checked(self) -> bool:
        return self.score is not None

    def to_dict(self, *, lines: bool = False) -> dict:
        """A JSON-able dict (scores rounded to 4 places); with `lines`, every OCR line and its box."""
        record = {
            "score": None if self.score is None else round(self.score, 4),
            "expected": list(self.expected),
            "scores": [round(s, 4) for s in self.scores],
            "missing": list(self.missing),
            "read": self.read,
            "ocr_seconds": round(self.ocr_seconds, 3),
        }
        if lines:
            record["lines"] = [line.to_dict() for line in self.lines]
        return record


def score_text(read: str, expected: list[str], *, missing_below: float = MISSING_BELOW, ocr_seconds: float = 0.0,
               lines: list | None = None) -> TextCheck:
    """Score OCR text `read` against `expected` (no OCR here)."""
    expected = list(expected)
    scores = [string_score(s, read) for s in expected]
    return TextCheck(
        expected=expected,
        scores=scores,
        score=overall_score(expected, scores),
        missing=missing_strings(expected, scores, below=missing_below),
        read=read,
        ocr_seconds=ocr_seconds,
        lines=list(lines or []),
    )


def check_image(image, expected: list[str], *, missing_below: float = MISSING_BELOW) -> TextCheck:
    """OCR `image` (PNG/JPEG/WebP bytes, a PIL image or an RGB array) and score it against
    `expected`. With nothing checkable expected (no strings, or only punctuation) the OCR does not
    run and the result's score is None. UnreadableImageError when `image` is not an image."""
    from qwen_worker.textcheck.ocr import load_image, read_text

    expected = list(expected)
    if not any(normalize(s) for s in expected):
        load_image(image)  # still refuse what is not an image
        return score_text("", expected, missing_below=missing_below)
    reading = read_text(image)
    return score_text(reading.text, expected, missing_below=missing_below, ocr_seconds=reading.seconds,
                      lines=reading.lines)
