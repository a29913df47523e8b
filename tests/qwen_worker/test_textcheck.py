"""Text-fidelity QA: the expected text of a prompt, the scoring rules (exact values), and the real OCR
(RapidOCR, models from its wheel) on images drawn with a real CJK font: right > near miss > wrong."""

import io

import numpy as np
import pytest

from text_images import FONT, NO_FONT, draw_text, png_bytes
from qwen_worker.errors import UserError
from qwen_worker.textcheck import (
    TextCheck, check_image, expected_texts, explicit_strings, normalize, quoted_strings, score_text, string_score,
)
from qwen_worker.textcheck.ocr import UnreadableImageError, load_image, read_text
from qwen_worker.textcheck.score import best_window_distance, missing_strings, overall_score

needs_font = pytest.mark.skipif(not FONT.is_file(), reason=NO_FONT)


# ------------------------------------------------------------------------------ expected text
@pytest.mark.parametrize("prompt, expected", [
    ('A poster with the title "故宫 · The Forbidden City" and a red gate', ["故宫 · The Forbidden City"]),
    ("海报标题为“西湖十景”，副标题为“断桥残雪”", ["西湖十景", "断桥残雪"]),
    ("招牌写着「夜市」和『小吃』", ["夜市", "小吃"]),
    ("a sign that says 'Open Daily' next to a door", ["Open Daily"]),
    ("don't forget Bob's sign: 'Cafe' and the Smiths' 'Bakery'", ["Cafe", "Bakery"]),
    ("it’s Anna’s ‘Tea House’", ["Tea House"]),
    ("标题为'故宫'的海报", ["故宫"]),
    ("“他说‘你好’” then ‘Hello’", ["他说‘你好’", "Hello"]),
    ('"Sale" and “Sale” and " Sale "', ["Sale"]),
    ('an empty "" and an unmatched “ quote', []),
    ("no quotes at all, isn't it", []),
    ("", []),
    (None, []),
    ('\ue000"marked by the template"\ue001 text', ["marked by the template"]),
])  # fmt: skip
def test_quoted_strings_of_a_prompt(prompt, expected):
    assert quoted_strings(prompt) == expected


def test_an_explicit_text_overrides_the_prompt():
    prompt = 'a poster "West Lake"'
    assert expected_texts(prompt) == ["West Lake"]
    assert expected_texts(prompt, "西湖") == ["西湖"]
    assert expected_texts(prompt, ["西湖", " West Lake ", "西湖", None]) == ["西湖", "West Lake"]
    assert expected_texts(prompt, np.array(["A", "B"], dtype=object)) == ["A", "B"]
    assert expected_texts(prompt, []) == []  # explicitly nothing: the row is not checked
    assert expected_texts(prompt, None) == ["West Lake"]
    assert expected_texts(prompt, float("nan")) == ["West Lake"]  # pandas' missing value


def test_an_explicit_text_of_another_type_is_refused():
    with pytest.raises(ValueError, match="`text` must be a string or a list of strings, got int: 5"):
        explicit_strings(5)
    with pytest.raises(ValueError, match="got an item of type int: 3"):
        explicit_strings(["a", 3])


# ------------------------------------------------------------------------------ scoring rules
@pytest.mark.parametrize("text, normal", [
    ("ＡＢＣ１２３", "abc123"),  # full width -> half width
    ("West  Lake\n", "westlake"),  # case and whitespace
    ("西湖 · 十景！", "西湖十景"),  # punctuation dropped, CJK kept
    ("¥38 / $5", "¥38$5"),  # currency symbols kept, the slash is punctuation
    ("Don't STOP", "dontstop"),
    ("Straße", "strasse"),
    ("①②", "12"),
    ("...", ""),
])  # fmt: skip
def test_normalize(text, normal):
    assert normalize(text) == normal


def test_best_window_distance_is_semi_global():
    assert best_window_distance("abc", "xxabcxx") == 0  # the other text costs nothing
    assert best_window_distance("abc", "xxabxx") == 1  # one character missing
    assert best_window_distance("abc", "xxaxcxx") == 1  # one substituted
    assert best_window_distance("abc", "xxaZbcxx") == 1  # one extra inside the window
    assert best_window_distance("abc", "") == 3
    assert best_window_distance("", "abc") == 0
    assert best_window_distance("西湖十景", "今天西湖十最好") == 1


def test_string_scores_exactly():
    assert string_score("西湖十景", "欢迎来到 西湖十景 景区") == 1.0
    assert string_score("西湖十景", "西湖十最") == 0.75  # one of four wrong
    assert string_score("West Lake", "WESTLAKE") == 1.0  # case and spaces do not count
    assert string_score("West Lake", "west lane") == 0.875  # one of eight
    assert string_score("故宫", "西湖十景") == 0.0
    assert string_score("故宫", "") == 0.0
    assert string_score("断桥残雪", "断桥\n残雪") == 1.0  # wrapped over two OCR lines
    assert string_score("!!!", "anything") == 1.0  # nothing checkable


def test_overall_is_weighted_by_characters_and_missing_below_the_threshold():
    expected = ["西湖十景", "Lake", "!!"]
    scores = [0.75, 0.0, 1.0]
    assert overall_score(expected, scores) == 0.375  # (4 * 0.75 + 4 * 0 + 0 * 1) / 8
    assert overall_score(["!!"], [1.0]) is None
    assert overall_score([], []) is None
    assert missing_strings(expected, scores) == ["Lake"]
    assert missing_strings(expected, scores, below=0.8) == ["西湖十景", "Lake"]


def test_score_text_and_to_dict():
    check = score_text("西湖十最 West Lake", ["西湖十景", "West Lake", "故宫"])
    assert check == TextCheck(expected=["西湖十景", "West Lake", "故宫"], scores=[0.75, 1.0, 0.0], score=11 / 14,
                              missing=["故宫"], read="西湖十最 West Lake")
    assert check.to_dict() == {
        "score": 0.7857, "expected": ["西湖十景", "West Lake", "故宫"], "scores": [0.75, 1.0, 0.0],
        "missing": ["故宫"], "read": "西湖十最 West Lake", "ocr_seconds": 0.0,
    }
    assert check.checked


# ------------------------------------------------------------------------------ image input
def test_bytes_that_are_not_an_image_are_refused():
    with pytest.raises(UnreadableImageError, match="^not a readable image: cannot identify image file"):
        load_image(b"%PDF-1.4 not an image")
    truncated = png_bytes(draw_text([], 64, 64))[:60]
    with pytest.raises(UnreadableImageError, match="^not a readable image"):
        load_image(truncated)
    with pytest.raises(UnreadableImageError, match="^not an image: str"):
        load_image("a path is not an image")
    assert issubclass(UnreadableImageError, UserError)


def test_transparency_is_flattened_onto_white():
    from PIL import Image

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    image = load_image(buffer.getvalue())
    assert (image.mode, image.getpixel((1, 1))) == ("RGB", (255, 255, 255))


def test_nothing_checkable_runs_no_ocr():
    check = check_image(png_bytes(draw_text([], 64, 64)), ["“”", "..."])
    assert (check.score, check.read, check.ocr_seconds, check.checked) == (None, "", 0.0, False)
    with pytest.raises(UnreadableImageError, match="^not a readable image"):
        check_image(b"nope", [])


def test_a_bad_thread_count_is_one_clear_error(monkeypatch):
    from qwen_worker.textcheck.ocr import _make_engine

    monkeypatch.setenv("QWEN_BATCH_OCR_THREADS", "many")
    with pytest.raises(UserError, match="QWEN_BATCH_OCR_THREADS must be a whole number of threads, got: 'many'"):
        _make_engine(None)
    with pytest.raises(UserError, match="OCR threads must be at least 1, got: 0"):
        _make_engine(0)


# ------------------------------------------------------------------------------ real OCR
# (expected, near miss: one character changed, wrong: other text of the same script)
CASES = {
    "zh": (["欢迎光临西湖"], ["欢迎光临东湖"], ["故宫博物院"]),
    "en": (["Night Market"], ["Night Marker"], ["Great Wall"]),
    "mixed": (["西湖 West Lake 夜市"], ["西湖 Best Lake 夜市"], ["长城 Great Wall"]),
}
DISTRACTOR = "Open 9:00-22:00"  # other text in the image must not lower the score


@pytest.fixture(scope="module")
def ocr_scores():
    """{(language, variant): TextCheck}, each image read once."""
    if not FONT.is_file():
        pytest.skip(NO_FONT)
    checks = {}
    for language, (expected, near, wrong) in CASES.items():
        for variant, drawn in (("right", expected), ("near", near), ("wrong", wrong), ("none", [])):
            lines = drawn + [DISTRACTOR] if drawn else []
            checks[language, variant] = check_image(png_bytes(draw_text(lines)), expected)
    return checks


@needs_font
@pytest.mark.parametrize("language", sorted(CASES))
def test_real_ocr_orders_right_near_miss_wrong_and_none(ocr_scores, language):
    right, near, wrong, none = (ocr_scores[language, v] for v in ("right", "near", "wrong", "none"))
    expected = CASES[language][0][0]
    assert right.score >= 0.95, right
    assert right.missing == []
    assert right.score > near.score > wrong.score >= none.score, (right, near, wrong, none)
    # a near miss loses about one character, and is not missing
    one_character = 1 - 1 / len(normalize(expected))
    assert abs(near.score - one_character) <= 1 / len(normalize(expected)) + 1e-9, near
    assert near.missing == []
    assert wrong.missing == [expected] and wrong.score < 0.5, wrong
    assert (none.score, none.missing, none.read) == (0.0, [expected], "")
    assert right.ocr_seconds > 0 and right.lines, right


@needs_font
def test_read_text_returns_lines_with_confidence_and_boxes():
    reading = read_text(draw_text(["西湖十景", "West Lake"], 640, 320))
    assert [line.text.replace(" ", "") for line in reading.lines] == ["西湖十景", "WestLake"]
    assert all(0.5 < line.confidence <= 1.0 for line in reading.lines)
    first, second = reading.lines[0].box, reading.lines[1].box
    assert len(first) == 4 and first[0][1] < second[0][1]  # top to bottom
    assert (reading.width, reading.height) == (640, 320)
    assert reading.text.replace(" ", "") == "西湖十景WestLake"
