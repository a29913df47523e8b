"""The text a row expects to see drawn: the quoted strings of its prompt, or an explicit `text`.

Quotes recognised (outermost pair wins; what is inside is taken verbatim, then stripped):

    “…”  "…"  「…」  『…』  ‘…’  '…'

The templates' `quoted` filter gives "…" (style en) and “…” (style zh), so a templated prompt's
drawn text is found without knowing the template.

Single quotes double as apostrophes (don't, Bob's, the Smiths' house, ’90s), so a ' or ’ opens a
quote only when no Latin letter or digit stands right before it and some non-space follows it,
and closes one only when no Latin letter or digit follows it. CJK characters do not count as
letters here: 标题为'故宫'的海报 quotes 故宫. An elision at the start of a word ('90s, rock 'n' roll)
still reads as an opening quote: quote such text with "…" or give the row an explicit `text`.

An explicit `text` (a string, or a list of strings) overrides the prompt; an explicit empty one
(`""`, `[]`) means "expects no text". None (a missing or null `text` column) means "not given".
Strings are stripped, empty ones dropped, duplicates dropped with the first one's place kept.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Iterable

# opening quote -> closing quote
_PAIRS = {
    "\u201c": "\u201d",  # “ ”
    '"': '"',
    "\u300c": "\u300d",  # 「 」
    "\u300e": "\u300f",  # 『 』
    "\u2018": "\u2019",  # ‘ ’
    "'": "'",
}
_APOSTROPHES = {"'", "\u2019"}  # also used inside and at the end of words
# the private-use markers the templates' `quoted` filter wraps around its output while rendering
_TEMPLATE_MARKERS = str.maketrans("", "", "\ue000\ue001")


def _latin_word_char(c: str) -> bool:
    """A letter or digit of an alphabetic script (not a wide CJK character)."""
    return c.isalnum() and unicodedata.east_asian_width(c) not in ("W", "F")


def _may_open(text: str, i: int) -> bool:
    c = text[i]
    if c not in _APOSTROPHES and c != "\u2018":
        return True
    before = text[i - 1] if i > 0 else ""
    after = text[i + 1] if i + 1 < len(text) else ""
    return not (before and _latin_word_char(before)) and bool(after) and not after.isspace()


def _may_close(text: str, j: int) -> bool:
    if text[j] not in _APOSTROPHES:
        return True
    after = text[j + 1] if j + 1 < len(text) else ""
    return not (after and _latin_word_char(after))


def quoted_strings(prompt: str | None) -> list[str]:
    """The strings inside quotes in `prompt`, in order, de-duplicated (see the module doc)."""
    if not prompt:
        return []
    text = prompt.translate(_TEMPLATE_MARKERS)
    found: list[str] = []
    i = 0
    while i < len(text):
        closing = _PAIRS.get(text[i])
        if closing is None or not _may_open(text, i):
            i += 1
            continue
        j = text.find(closing, i + 1)
        while j != -1 and not _may_close(text, j):
            j = text.find(closing, j + 1)
        if j == -1:  # an unmatched opener: not a quote
            i += 1
            continue
        found.append(text[i + 1 : j])
        i = j + 1
    return _clean(found)


def explicit_strings(text: Any) -> list[str] | None:
    """An explicit `text` value as a list of strings; None when it is not given (None / NaN).

    Accepts a string, or a list / tuple / numpy array / pyarrow list of strings (None items are
    skipped). Raises ValueError naming the type for anything else."""
    if text is None:
        return None
    if isinstance(text, float) and text != text:  # NaN: pandas' missing value
        return None
    if isinstance(text, str):
        return _clean([text])
    if hasattr(text, "tolist") and not isinstance(text, (list, tuple)):  # numpy array
        text = text.tolist()
    if hasattr(text, "as_py"):  # a pyarrow scalar
        return explicit_strings(text.as_py())
    if isinstance(text, (list, tuple)):
        items = [item for item in text if item is not None]
        bad = [item for item in items if not isinstance(item, str)]
        if bad:
            raise ValueError(f"`text` must be a string or a list of strings, got an item of type {type(bad[0]).__name__}: {bad[0]!r}")
        return _clean(items)
    raise ValueError(f"`text` must be a string or a list of strings, got {type(text).__name__}: {text!r}")


def expected_texts(prompt: str | None, text: Any = None) -> list[str]:
    """What a row expects drawn: its explicit `text` when given, else its prompt's quoted strings.
    An empty list means the row is not checked."""
    explicit = explicit_strings(text)
    return explicit if explicit is not None else quoted_strings(prompt)


def _clean(strings: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for s in strings:
        s = s.translate(_TEMPLATE_MARKERS).strip()
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out
