"""Prompt templates (jobs.templates) and manifest tools (jobs.manifest_tools)."""

from __future__ import annotations

import json
import re
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from jobs.manifest_tools import (
    MANIFEST_COLUMNS,
    ManifestInputError,
    convert_to_manifest,
    sample_manifest,
    write_manifest,
)
from jobs.templates import TemplateError, builtin_templates_dir, load_library, parse_params
from qwen_worker.errors import UserError
from qwen_worker.presets import ASPECT_RATIOS

LIBRARY = load_library()
BUILTIN_NAMES = LIBRARY.names()
QUOTED_PARAM = re.compile(r"\{\{\s*(\w+)\s*\|\s*quoted(?:\(\s*[\"'](\w+)[\"']\s*\))?\s*\}\}")
QUOTES = {None: ('"', '"'), "en": ('"', '"'), "zh": ("\u201c", "\u201d")}


def quoted_params(template) -> list[tuple[str, str]]:
    """(param, style) for every `{{ param | quoted(...) }}` in the template source."""
    return [(m.group(1), m.group(2)) for m in QUOTED_PARAM.finditer(template.prompt)]


def write_template(directory, file_stem, **overrides):
    data = {
        "name": file_stem,
        "description": "A test template.",
        "language": "en",
        "aspect_ratio": "16:9",
        "negative_prompt": " ",
        "params": {
            "title": {"description": "Title.", "required": True, "example": "Hello"},
            "subtitle": {"description": "Subtitle.", "required": False, "default": "", "example": "World"},
        },
        "prompt": "A card with the title {{ title | quoted }}{% if subtitle %} and {{ subtitle | quoted }}{% endif %}.",
    }
    data.update(overrides)
    path = directory / f"{file_stem}.yaml"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")  # JSON is YAML
    return path


# ---------------------------------------------------------------------------------------------
# the shipped templates


def test_the_editing_scenarios_ship_as_templates_that_say_what_their_input_images_are():
    editing = {name: LIBRARY.get(name).inputs for name in BUILTIN_NAMES if LIBRARY.get(name).inputs}
    assert {"edit-replace-object", "edit-remove-object", "edit-restyle", "edit-pose", "edit-sign-text",
            "edit-product-background", "edit-compose-product-scene"} <= set(editing)
    assert editing["edit-compose-product-scene"] == ("the product photo", "the scene")  # a multi-image one
    assert "quoted" in LIBRARY.get("edit-sign-text").prompt  # new text drawn verbatim


def test_at_least_twelve_scenarios_ship_including_the_core_ones():
    assert len(BUILTIN_NAMES) >= 12
    for name in ("travel-guide-bilingual", "luxury-product-ad", "product-poster", "government-notice",
                 "restaurant-menu", "event-poster", "presentation-slide", "book-cover", "shop-sign",
                 "infographic", "social-media-banner", "spring-festival-couplet", "movie-poster"):  # fmt: skip
        assert name in LIBRARY, name


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_every_shipped_template_renders_its_examples_with_the_text_quoted_verbatim(name):
    template = LIBRARY.get(name)
    assert template.language in ("en", "zh", "auto")
    assert template.aspect_ratio in ASPECT_RATIOS
    quoted = quoted_params(template)
    assert quoted or template.inputs, f"{name} draws no quoted text"  # editing templates may only change a picture
    variants = max(len(p.examples) for p in template.params.values())
    for variant in range(variants):
        params = template.sample_params(variant)
        prompt = template.render(params)
        assert "{{" not in prompt and "{%" not in prompt and "\ue000" not in prompt
        assert "  " not in prompt and prompt == prompt.strip()
        for param, style in quoted:
            value = str(params[param])
            if value:
                opening, closing = QUOTES[style]
                assert f"{opening}{value}{closing}" in prompt, (name, param, value, prompt)


def test_bilingual_title_reaches_the_prompt_inside_quotes_unchanged():
    template = LIBRARY.get("travel-guide-bilingual")
    params = {**template.sample_params(), "title": "故宫 · The Forbidden City", "info": "门票 Tickets ¥60 & <free> for kids"}
    prompt = template.render(params)
    assert "\u201c故宫 · The Forbidden City\u201d" in prompt
    assert "\u201c门票 Tickets ¥60 & <free> for kids\u201d" in prompt  # no HTML escaping
    assert "&amp;" not in prompt and "&lt;" not in prompt
    # YAML folds the template's lines with spaces; Chinese sentences are joined without them
    assert "。页面上方" in prompt


def test_quoted_text_keeps_every_character_even_template_syntax_and_runs_of_spaces():
    template = LIBRARY.get("movie-poster")
    title = '  THE  "LAST"\nLANTERN {{ 7*7 }} {% raw %}  '
    prompt = template.render({**template.sample_params(), "title": title})
    assert f'"{title}"' in prompt
    assert "49" not in prompt


def test_an_empty_optional_block_leaves_no_double_space():
    template = LIBRARY.get("book-cover")
    prompt = template.render({**template.sample_params(), "subtitle": ""})
    assert "subtitle" not in prompt and "  " not in prompt
    assert "upper third. At the bottom" in prompt


def test_numbers_are_accepted_and_drawn_as_written():
    template = LIBRARY.get("product-poster")
    prompt = template.render({**template.sample_params(), "price": 299})
    assert "\u201c299\u201d" in prompt


def test_sample_params_vary_and_are_deterministic():
    template = LIBRARY.get("spring-festival-couplet")
    first, second = template.sample_params(0), template.sample_params(1)
    assert first != second
    assert template.sample_params(0) == first
    assert set(first) == set(template.params)


# ---------------------------------------------------------------------------------------------
# params errors


def test_missing_required_params_are_named():
    template = LIBRARY.get("travel-guide-bilingual")
    with pytest.raises(TemplateError, match=r"template 'travel-guide-bilingual': missing param\(s\) `title`, `caption`$"):
        template.render({"place": "西湖"})


def test_unknown_params_are_named_with_the_expected_ones():
    template = LIBRARY.get("travel-guide-bilingual")
    params = {**template.sample_params(), "titel": "x"}
    with pytest.raises(
        TemplateError,
        match=re.escape("unknown param(s) `titel` (expected: `title`, `place`, `caption`, `info`)"),
    ):
        template.render(params)


def test_an_empty_required_param_is_refused():
    template = LIBRARY.get("shop-sign")
    with pytest.raises(TemplateError, match="param `shop_name` is required and must not be empty"):
        template.render({**template.sample_params(), "shop_name": "  "})


@pytest.mark.parametrize("value", [["a"], {"a": 1}, True, float("nan")])
def test_param_values_must_be_strings_or_numbers(value):
    template = LIBRARY.get("shop-sign")
    with pytest.raises(TemplateError, match="param `tagline` must be a string or a number, got: "):
        template.render({**template.sample_params(), "tagline": value})


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"title"', "42", None, "NaN"])
def test_params_must_be_a_json_object(raw):
    with pytest.raises(TemplateError, match=r"^params must be a JSON object, got: "):
        parse_params(raw)


def test_parse_params_accepts_a_dict_or_a_json_object_string():
    assert parse_params('{"title": "故宫"}') == {"title": "故宫"}
    assert parse_params({"a": 1}) == {"a": 1}


def test_render_takes_params_as_a_json_string_too():
    template = LIBRARY.get("book-cover")
    prompt = template.render(json.dumps(template.sample_params(), ensure_ascii=False))
    assert '"三体 The Three-Body Problem"' in prompt


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(UserError, match=r"^unknown template 'nope' \(known: award-certificate, book-cover, "):
        LIBRARY.get("nope")


# ---------------------------------------------------------------------------------------------
# user directories and bad files


def test_a_user_directory_overrides_a_builtin_and_adds_templates(tmp_path):
    write_template(tmp_path, "book-cover", prompt="MY COVER {{ title | quoted }} {{ subtitle }}")
    write_template(tmp_path, "team-badge")
    library = load_library([tmp_path])
    assert library.get("book-cover").render({"title": "X"}) == 'MY COVER "X"'
    assert library.get("book-cover").source == str(tmp_path / "book-cover.yaml")
    assert library.get("team-badge").render({"title": "Hi"}) == 'A card with the title "Hi".'
    assert set(BUILTIN_NAMES) < set(library.names())
    assert "MY COVER" not in load_library().get("book-cover").prompt  # built-ins untouched


def test_missing_user_directory_is_an_error(tmp_path):
    with pytest.raises(TemplateError, match="template directory not found: .*nowhere"):
        load_library([tmp_path / "nowhere"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompt": "A {{ title | quoted }"}, r"Jinja2 syntax error in `prompt` line 1: "),
        ({"prompt": "A {{ title | quoted }} {{ colour }} {{ subtitle }}"}, r"`prompt` uses undeclared param\(s\) `colour`"),
        ({"prompt": "A {{ title | quoted }}"}, r"param\(s\) `subtitle` declared but never used in `prompt`"),
        ({"aspect_ratio": 184}, r"`aspect_ratio` must be one of 1:1 .* got: 184 \(quote it in YAML"),
        ({"language": "fr"}, r"`language` must be one of en, zh, auto, got: 'fr'"),
        ({"name": "other"}, r"`name` must match the file name 'card', got: 'other'"),
        ({"colour": "red"}, r"unknown field\(s\) `colour`"),
        ({"params": {"title": {"description": "T", "required": False, "example": "x"}}, "prompt": "{{ title }}"},
         r"param `title`: an optional param needs a `default`"),
        ({"params": {"title": {"description": "T", "required": True, "example": ["x"]}}, "prompt": "{{ title }}"},
         r"param `title` must be a string or a number, got: list"),
    ],
)
def test_a_bad_template_file_is_reported_with_its_path(tmp_path, overrides, message):
    path = write_template(tmp_path, "card", **overrides)
    with pytest.raises(TemplateError, match=rf"^bad template file {re.escape(str(path))}: {message}"):
        load_library([tmp_path], builtin=False)


def test_missing_fields_and_yaml_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\ndescription: x\n", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"a\.yaml: missing field\(s\) `aspect_ratio`, `language`"):
        load_library([tmp_path], builtin=False)
    (tmp_path / "a.yaml").write_text("name: [a\n", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"bad template file .*a\.yaml: YAML error line \d+: "):
        load_library([tmp_path], builtin=False)


def test_builtin_templates_are_the_repository_templates_directory():
    directory = builtin_templates_dir()
    assert directory.name == "templates" and (directory.parent / "jobs").is_dir()
    assert sorted(p.stem for p in directory.glob("*.yaml")) == BUILTIN_NAMES


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_templates_render_and_list(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["templates", "render", "shop-sign", "--params",
                                 json.dumps({"shop_name": "老王面馆", "street": "老街"}, ensure_ascii=False)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "\u201c老王面馆\u201d" in result.output
    write_template(tmp_path, "team-badge")
    result = runner.invoke(cli, ["templates", "list", "--templates", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names == sorted(BUILTIN_NAMES + ["team-badge"])


def test_cli_templates_show_prints_params_and_a_sample():
    result = CliRunner().invoke(cli, ["templates", "show", "product-poster"])
    assert result.exit_code == 0, result.output
    assert "price (required)" in result.output and "\u201c¥39.9\u201d" in result.output


# ---------------------------------------------------------------------------------------------
# manifest tools


def test_csv_to_parquet_round_trip_keeps_columns_types_and_values(tmp_path):
    source = tmp_path / "rows.csv"
    source.write_text(
        "id,prompt,width,height,steps,true_cfg_scale,seed,language,campaign\n"
        'poster-1,"A shop sign reading ""老王面馆""",1024,768,30,4.5,7,zh,spring\n'
        "poster-2,A red lantern,,,,,,,\n",
        encoding="utf-8-sig",
    )
    out = tmp_path / "m.parquet"
    convert_to_manifest(source, out, input_format="csv")
    table = pq.read_table(out)
    assert table.column_names == list(MANIFEST_COLUMNS) + ["campaign"]
    assert [table.schema.field(n).type for n in MANIFEST_COLUMNS] == list(MANIFEST_COLUMNS.values())
    assert table.schema.field("width").type == pa.int64() and table.schema.field("true_cfg_scale").type == pa.float64()
    rows = table.to_pylist()
    assert rows[0] == {
        "id": "poster-1", "prompt": 'A shop sign reading "老王面馆"', "template": None, "params": None,
        "negative_prompt": None, "width": 1024, "height": 768, "aspect_ratio": None, "steps": 30,
        "true_cfg_scale": 4.5, "seed": 7, "language": "zh", "num_images": None, "format": None,
        "output_key": None, "image": None, "images": None, "mask": None, "lora": None, "speed": None,
        "text": None, "campaign": "spring",
    }  # fmt: skip
    assert rows[1]["prompt"] == "A red lantern" and rows[1]["width"] is None and rows[1]["campaign"] is None


def test_csv_with_a_template_packs_the_other_columns_into_params(tmp_path):
    source = tmp_path / "posters.csv"
    source.write_text(
        "id,product_name,product,price,slogan,seed\n"
        'tea-1,云雾绿茶,一罐茶叶,¥39.9,"一口春天的味道, 真香",11\n'
        "juice-1,鲜榨橙汁,一瓶橙汁,¥9.9,活力满满,\n",
        encoding="utf-8",
    )
    out = tmp_path / "posters.parquet"
    convert_to_manifest(source, out, input_format="csv", template="product-poster")
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ["tea-1", "juice-1"]
    assert rows[0]["template"] == "product-poster" and rows[0]["prompt"] is None
    assert json.loads(rows[0]["params"]) == {
        "product_name": "云雾绿茶", "product": "一罐茶叶", "price": "¥39.9", "slogan": "一口春天的味道, 真香",
    }  # fmt: skip
    assert rows[0]["seed"] == 11 and rows[1]["seed"] is None
    assert (rows[0]["aspect_ratio"], rows[0]["language"]) == ("3:4", "zh")  # the template's
    assert LIBRARY.get("product-poster").render(rows[0]["params"]).count("\u201c¥39.9\u201d") == 1


def test_csv_errors_are_all_reported_with_line_and_id(tmp_path):
    source = tmp_path / "bad.csv"
    source.write_text(
        "id,product_name,product,price,slogn,steps\n"
        "a,茶,罐,¥1,好,2.5\n"
        "b,茶,罐,¥1,好,20\n",
        encoding="utf-8",
    )
    with pytest.raises(ManifestInputError, match=r"2 bad row\(s\), nothing written") as info:
        convert_to_manifest(source, tmp_path / "out.parquet", input_format="csv", template="product-poster")
    message = str(info.value)
    assert "line 2 (id 'a'): `steps` must be an integer, got: '2.5'" in message
    assert "line 3 (id 'b'): template 'product-poster': unknown param(s) `slogn`" in message
    assert not (tmp_path / "out.parquet").exists()


def test_template_defaults_fill_only_what_a_row_leaves_open(tmp_path):
    source = tmp_path / "rows.jsonl"
    base = {"shop_name": "老王面馆", "street": "老街"}
    lines = [
        {"id": "sized", "width": 1024, "height": 768, **base},
        {"id": "english", "language": "en", "negative_prompt": "blurry", **base},
    ]
    source.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines), encoding="utf-8")
    out = tmp_path / "o.parquet"
    convert_to_manifest(source, out, input_format="jsonl", template="shop-sign")
    sized, english = pq.read_table(out).to_pylist()
    assert (sized["aspect_ratio"], sized["width"], sized["language"]) == (None, 1024, "zh")
    assert (english["aspect_ratio"], english["language"], english["negative_prompt"]) == ("4:3", "en", "blurry")


def test_a_param_given_twice_is_refused(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"id": "a", "shop_name": "A", "street": "s", "params": {"shop_name": "B"}}), encoding="utf-8")
    with pytest.raises(ManifestInputError, match=r"line 1 \(id 'a'\): param `shop_name` is given both as a column and inside `params`"):
        convert_to_manifest(source, tmp_path / "o.parquet", input_format="jsonl", template="shop-sign")


def test_jsonl_with_a_template(tmp_path):
    source = tmp_path / "rows.jsonl"
    lines = [
        {"id": "c-1", "left_line": "春回大地千山秀", "right_line": "日暖神州万象新", "banner": "万象更新", "num_images": 2},
        {"id": "c-2", "params": {"left_line": "天增岁月人增寿", "right_line": "春满乾坤福满门", "banner": "五福临门"}},
    ]
    source.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n\n", encoding="utf-8")
    out = tmp_path / "c.parquet"
    convert_to_manifest(source, out, input_format="jsonl", template="spring-festival-couplet")
    rows = pq.read_table(out).to_pylist()
    assert json.loads(rows[0]["params"])["banner"] == "万象更新" and rows[0]["num_images"] == 2
    assert json.loads(rows[1]["params"])["banner"] == "五福临门"


def test_unknown_template_in_from_csv_fails_before_reading_rows(tmp_path):
    source = tmp_path / "rows.csv"
    source.write_text("id,title\na,x\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^unknown template 'nope' \(known: "):
        convert_to_manifest(source, tmp_path / "o.parquet", input_format="csv", template="nope")


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_sample_manifest_for_every_template(name):
    table = sample_manifest(name, 5, library=LIBRARY)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"{name}-{i:04d}" for i in range(1, 6)]
    assert len({r["params"] for r in rows}) > 1 and len({r["seed"] for r in rows}) == 5
    assert sample_manifest(name, 5, library=LIBRARY).equals(table)  # deterministic
    template = LIBRARY.get(name)
    for row in rows:
        template.render(row["params"])
        assert row["aspect_ratio"] == template.aspect_ratio


def test_sample_manifest_validates_with_the_job_validator(tmp_path):
    from jobs.manifest import ResolveContext, validate_manifest
    from qwen_worker.presets import get_preset

    out = write_manifest(sample_manifest("travel-guide-bilingual", 4, library=LIBRARY), tmp_path / "s.parquet")
    summary = validate_manifest(str(out), ResolveContext(preset=get_preset("qwen-image-df11")))
    assert summary.rows == 4 and dict(summary.templates) == {"travel-guide-bilingual": 4}
    assert dict(summary.shapes) == {"1104x1472": 4}


def test_cli_manifest_sample_and_from_csv(tmp_path):
    runner = CliRunner()
    out = tmp_path / "menu.parquet"
    result = runner.invoke(cli, ["manifest", "sample", "restaurant-menu", str(out), "--rows", "3"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).column("id").to_pylist() == ["restaurant-menu-0001", "restaurant-menu-0002", "restaurant-menu-0003"]
    source = tmp_path / "in.csv"
    source.write_text(textwrap.dedent("""\
        id,prompt
        a,A lantern
    """), encoding="utf-8")
    result = runner.invoke(cli, ["manifest", "from-csv", str(source), str(tmp_path / "o.parquet")])
    assert result.exit_code == 0, result.output
    assert "wrote 1 row(s)" in result.output


def _tidy_word_by_word(text: str) -> str:
    """The whitespace rule written the obvious way, word by word: `_tidy` (which caches the
    template's own text between quoted values) must agree, or a prompt changes and so does its job."""
    from jobs.templates import _QUOTED_SPLIT, _is_cjk

    pieces = _QUOTED_SPLIT.split(text)
    out, last, pending_space = [], "", False
    for i, piece in enumerate(pieces):
        if i % 2:
            body = piece[1:-1]
            if pending_space and last and body and not (_is_cjk(last) and _is_cjk(body[0])):
                out.append(" ")
            if body:
                out.append(body)
                last = body[-1]
            pending_space = False
            continue
        words = piece.split()
        if not words:
            pending_space = pending_space or bool(piece)
            continue
        space = pending_space or piece[0].isspace()
        for word in words:
            if space and last and not (_is_cjk(last) and _is_cjk(word[0])):
                out.append(" ")
            out.append(word)
            last = word[-1]
            space = True
        pending_space = piece[-1].isspace()
    return "".join(out)


def test_the_whitespace_tidy_matches_the_word_by_word_rule_on_random_text():
    import random

    from jobs.templates import _tidy

    rng = random.Random(7)
    alphabet = ["a", "B", "1", ".", " ", "  ", "\n", "\t", "\u3000", "中", "文", "，", "。", "\u201c", "\u201d",
                "\uff01", "\u2e80", "\u9fff", "\ua000", "é", "\ue000", "\ue001", "\ue000“x y”\ue001",
                "\ue000\ue001", "\ue000 \ue001", "\ue000中\ue001"]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert _tidy(text) == _tidy_word_by_word(text), repr(text)
