"""How well an image's OCR text holds the strings it should show.

Normalisation (both sides, before comparing), `normalize`:
  1. NFKC: full-width Latin and digits become half-width (ＡＢＣ１ -> ABC1), compatibility forms
     fold (ﬁ -> fi, ① -> 1, the ideographic space -> a space);
  2. casefold (Straße -> strasse; CJK unchanged);
  3. drop every whitespace character: OCR loses or invents spaces (PP-OCR joins 西湖 West Lake
     into 西湖WestLake) and Chinese uses none;
  4. drop punctuation (Unicode categories P*: . , : ; ! ? ' " - / % & # @ · 、 。 《 》 “ ” …): OCR
     often drops, doubles or swaps it (／ for /, a missed middle dot, a period read as a comma), and
     a wrong punctuation mark is rarely what makes a rendered text wrong. Symbols (S*: ¥ $ € + = < >
     © ™) and every letter and digit are kept, so ¥38 against $38 still counts as a wrong character.

Per-string score: 1 - CER of the best-matching window of the OCR text, where CER is the edit
distance (insertions, deletions, substitutions, each 1) between the normalised string and some
contiguous part of the normalised OCR text, over the string's normalised length. The window is
free (semi-global alignment), so a string drawn among other text is not penalised for the other
text, and the lines the OCR returns are joined without a separator, so a string wrapped over two
lines still matches. The score is in [0, 1]: 1 the string is there exactly, 0.75 one character of
four wrong, 0 none of it.

Overall score: the mean of the per-string scores weighted by their normalised lengths (a long
string counts more than a short one; 1 - the CER over all expected characters).

Missing: strings scoring below `MISSING_BELOW` (0.5: over half of its characters absent or
wrong, i.e. the text is not there or unrecognisable; a near miss lowers the score but is not
missing).

A string that normalises to nothing (only punctuation or spaces) cannot be checked: it scores 1
with weight 0 and is never missing.
"""

from __future__ import annotations

import unicodedata

MISSING_BELOW = 0.5


def normalize(text: str) -> str:
    """NFKC, casefold, no whitespace, no punctuation (see the module doc)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in folded if not c.isspace() and not unicodedata.category(c).startswith("P"))


def best_window_distance(needle: str, haystack: str) -> int:
    """The least edit distance between `needle` and any contiguous substring of `haystack`
    (the empty one included, so at most len(needle)). Semi-global alignment, O(len·len) time,
    O(len(haystack)) memory."""
    if not needle:
        return 0
    # row[j]: distance between the needle's prefix so far and the best substring ending at j
    previous = [0] * (len(haystack) + 1)  # empty prefix: the empty substring, free anywhere
    for i, n in enumerate(needle, start=1):
        current = [i] + [0] * len(haystack)
        for j, h in enumerate(haystack, start=1):
            current[j] = min(
                previous[j - 1] + (n != h),  # match / substitute
                previous[j] + 1,  # the needle's char is missing from the text
                current[j - 1] + 1,  # an extra char in the text inside the window
            )
        previous = current
    return min(previous)


def string_score(expected: str, ocr_text: str) -> float:
    """1 - CER of `expected` against its best window in `ocr_text`, both normalised; 1.0 when
    `expected` normalises to nothing."""
    needle = normalize(expected)
    if not needle:
        return 1.0
    distance = best_window_distance(needle, normalize(ocr_text))
    return max(0.0, 1.0 - distance / len(needle))


def overall_score(expected: list[str], scores: list[float]) -> float | None:
    """Per-string scores weighted by normalised length; None when nothing can be checked."""
    weights = [len(normalize(s)) for s in expected]
    total = sum(weights)
    if total == 0:
        return None
    return sum(w * s for w, s in zip(weights, scores)) / total


def missing_strings(expected: list[str], scores: list[float], *, below: float = MISSING_BELOW) -> list[str]:
    """The expected strings whose score is below `below`."""
    return [s for s, score in zip(expected, scores) if score < below]
