"""Manifest validation: every bad input gets one exact message naming row, id, field, rule, value."""

import pyarrow as pa
import pytest

from helpers import tiny_rows
from jobs.manifest import ManifestError, ResolveContext, derive_seed, validate_manifest
from qwen_worker.presets import get_preset

REAL = ResolveContext(preset=get_preset("qwen-image-df11"))
TINY = ResolveContext(preset=get_preset("tiny"))


def errors_of(path, context=REAL):
    with pytest.raises(ManifestError) as caught:
        validate_manifest(path, context)
    return caught.value.errors


def one_bad_row(write_manifest, **fields):
    row = {"id": "hk-guide-03", "prompt": "a page", "width": 1024, "height": 1024}
    row.update(fields)
    rows = [{"id": "ok-1", "prompt": "fine"}, row]
    return errors_of(write_manifest(rows))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"width": 1000}, "row 1 (id 'hk-guide-03'): `width` must be a multiple of 16, got: 1000"),
        ({"height": 4096}, "row 1 (id 'hk-guide-03'): `height` must be between 256 and 2048 for model 'qwen-image-df11', got: 4096"),
        ({"width": 128}, "row 1 (id 'hk-guide-03'): `width` must be between 256 and 2048 for model 'qwen-image-df11', got: 128"),
        ({"steps": 0}, "row 1 (id 'hk-guide-03'): `steps` must be between 1 and 200, got: 0"),
        ({"steps": 201}, "row 1 (id 'hk-guide-03'): `steps` must be between 1 and 200, got: 201"),
        ({"true_cfg_scale": 0.5}, "row 1 (id 'hk-guide-03'): `true_cfg_scale` must be between 1 and 50, got: 0.5"),
        ({"num_images": 0}, "row 1 (id 'hk-guide-03'): `num_images` must be between 1 and 8, got: 0"),
        ({"num_images": 9}, "row 1 (id 'hk-guide-03'): `num_images` must be between 1 and 8, got: 9"),
        ({"prompt": "   "}, "row 1 (id 'hk-guide-03'): `prompt` must not be empty, got: '   '"),
        ({"language": "fr"}, "row 1 (id 'hk-guide-03'): `language` must be one of en, zh, auto, got: 'fr'"),
        ({"format": "gif"}, "row 1 (id 'hk-guide-03'): `format` must be one of png, webp, jpeg, got: 'gif'"),
        ({"seed": -1}, "row 1 (id 'hk-guide-03'): `seed` must be between 0 and 2^63-9, got: -1"),
        ({"output_key": "/etc/passwd"}, "row 1 (id 'hk-guide-03'): `output_key` must be a safe relative key (absolute), got: '/etc/passwd'"),
        ({"output_key": "a/../../b"}, "row 1 (id 'hk-guide-03'): `output_key` must be a safe relative key ('.' or '..' segment), got: 'a/../../b'"),
        ({"output_key": "a\\b"}, "row 1 (id 'hk-guide-03'): `output_key` must be a safe relative key (backslash), got: 'a\\\\b'"),
        ({"output_key": "a\nb"}, "row 1 (id 'hk-guide-03'): `output_key` must be a safe relative key (control character), got: 'a\\nb'"),
        ({"output_key": "ads/x.jpg"}, "row 1 (id 'hk-guide-03'): `output_key` extension must match `format` png (.png), got: 'ads/x.jpg'"),
        ({"id": "../evil"}, "row 1 (id '../evil'): `id` must be 1-128 letters, digits, '.', '_' or '-' and start with a letter or digit, got: '../evil'"),
        ({"width": None}, "row 1 (id 'hk-guide-03'): `width` is required when `height` is given, got: None"),
        ({"width": None, "height": None, "aspect_ratio": "5:4"}, "row 1 (id 'hk-guide-03'): `aspect_ratio` must be one of 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3, got: '5:4'"),
        ({"aspect_ratio": "16:9"}, "row 1 (id 'hk-guide-03'): `aspect_ratio` cannot be combined with `width`/`height`, got: '16:9'"),
        ({"prompt": None}, "row 1 (id 'hk-guide-03'): `prompt` is required (or `template` + `params`), got: None"),
        ({"template": "travel-guide"}, "row 1 (id 'hk-guide-03'): `template` cannot be combined with `prompt`, got: 'travel-guide'"),
    ],
)
def test_bad_row_gets_exact_message(write_manifest, fields, message):
    assert one_bad_row(write_manifest, **fields) == [message]


def test_every_error_is_reported_at_once_in_row_order(write_manifest):
    rows = [
        {"id": "a", "prompt": "x", "width": 1000, "height": 1000},
        {"id": "b", "prompt": "x", "steps": 0},
        {"id": "a", "prompt": "y"},
    ]
    assert errors_of(write_manifest(rows)) == [
        "row 0 (id 'a'): `width` must be a multiple of 16, got: 1000",
        "row 0 (id 'a'): `height` must be a multiple of 16, got: 1000",
        "row 1 (id 'b'): `steps` must be between 1 and 200, got: 0",
        "row 2 (id 'a'): `id` must be unique (row 0 has it too), got: 'a'",
    ]


def test_two_rows_writing_the_same_image_key_is_an_error(write_manifest):
    rows = [
        {"id": "a", "prompt": "x", "num_images": 2},  # images/a-0.png, images/a-1.png
        {"id": "a-1", "prompt": "y"},  # images/a-1.png
    ]
    assert errors_of(write_manifest(rows)) == [
        "row 1 (id 'a-1'): `output_key` must not repeat an image key of row 0 (id 'a'), got: 'images/a-1.png'"
    ]


def test_wrong_column_type_is_reported_before_rows(write_manifest):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.string()), ("height", pa.int64())])
    path = write_manifest([{"id": "a", "prompt": "x", "width": "1024", "height": 1024}], schema=schema)
    assert errors_of(path) == ["manifest: column `width` must be integer, got type: string"]


def test_missing_id_column(write_manifest):
    assert errors_of(write_manifest([{"prompt": "x"}])) == ["manifest: column `id` is required, got columns: prompt"]


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_text("id,prompt\n")
    with pytest.raises(Exception, match=r"cannot read manifest .*m.parquet as Parquet"):
        validate_manifest(str(path), REAL)


def test_error_list_is_bounded_but_counts_everything(write_manifest, monkeypatch):
    import jobs.manifest

    monkeypatch.setattr(jobs.manifest, "MAX_ERRORS_KEPT", 5)
    rows = [{"id": f"r{n}", "prompt": "x", "steps": 0} for n in range(12)]
    with pytest.raises(ManifestError, match=r"12 error\(s\) in manifest") as caught:
        validate_manifest(write_manifest(rows), REAL)
    assert len(caught.value.errors) == 5
    assert str(caught.value).endswith("… and 7 more")


def test_summary_counts_shapes_languages_and_passes_unknown_columns(write_manifest):
    rows = [
        {"id": "a", "prompt": "香港 Hong Kong 指南", "aspect_ratio": "16:9", "campaign": "x"},
        {"id": "b", "prompt": "perfume ad", "campaign": "y", "num_images": 3},
        {"id": "c", "prompt": "menu", "width": 512, "height": 768, "language": "zh", "campaign": None},
    ]
    summary = validate_manifest(write_manifest(rows), REAL)
    assert summary.to_dict() == {
        "rows": 3,
        "images": 5,
        "shapes": {"1664x928": 1, "1328x1328": 1, "512x768": 1},
        "languages": {"zh": 2, "en": 1},
        "templates": {},
        "formats": {"png": 3},
        "extra_columns": ["campaign"],
    }


def test_tiny_model_accepts_small_sizes_that_the_real_model_refuses(write_manifest):
    path = write_manifest(tiny_rows(2, size=32))
    assert validate_manifest(path, TINY).rows == 2
    assert len(errors_of(path, REAL)) == 4


def test_derived_seed_depends_on_job_seed_and_id_only():
    assert derive_seed(0, "a") == derive_seed(0, "a")
    assert len({derive_seed(0, "a"), derive_seed(1, "a"), derive_seed(0, "b")}) == 3
    assert 0 <= derive_seed(7, "x") < 2**62


def test_large_manifest_streams_across_row_groups(write_manifest):
    rows = [{"id": f"r{n}", "prompt": "x"} for n in range(3000)]
    rows[2500]["steps"] = 999
    rows[2999]["id"] = "r5"
    path = write_manifest(rows, row_group_size=700)
    assert errors_of(path) == [
        "row 2500 (id 'r2500'): `steps` must be between 1 and 200, got: 999",
        "row 2999 (id 'r5'): `id` must be unique (row 5 has it too), got: 'r5'",
    ]


def test_template_rows_resolve_and_bad_ones_name_the_field(write_manifest):
    import json

    params = {"product_name": "云雾绿茶", "product": "a tea caddy", "price": "¥39.9", "slogan": "一口春天的味道"}
    rows = [
        {"id": "a", "template": "product-poster", "params": json.dumps(params, ensure_ascii=False)},
        {"id": "b", "template": "nope", "params": "{}"},
        {"id": "c", "template": "product-poster", "params": json.dumps({"product_name": "x"})},
        {"id": "d", "template": "product-poster", "params": "not json"},
    ]
    errors = errors_of(write_manifest(rows))
    assert errors[0].startswith("row 1 (id 'b'): `template`: unknown template 'nope' (known: award-certificate, ")
    assert errors[0].endswith(", got: 'nope'")
    assert errors[1:] == [
        "row 2 (id 'c'): `params`: template 'product-poster': missing param(s) `product`, `price`, `slogan`, "
        "got: '{\"product_name\": \"x\"}'",
        "row 3 (id 'd'): `params`: params must be a JSON object, got: 'not json'",
    ]
    summary = validate_manifest(write_manifest(rows[:1], name="ok.parquet"), REAL)
    assert (summary.templates, summary.shapes) == ({"product-poster": 1}, {"1104x1472": 1})  # template's 3:4


def test_text_to_draw_reaches_the_prompt_verbatim_in_quotes(write_manifest):
    import json

    from jobs.manifest import iter_resolved, open_parquet, render_rows

    params = {"product_name": "云雾绿茶 Cloud Tea", "product": "a tea caddy", "price": "¥39.9", "slogan": "“春”天"}
    path = write_manifest([{"id": "a", "template": "product-poster", "params": json.dumps(params, ensure_ascii=False)}])
    [resolved] = list(iter_resolved(open_parquet(path), path, REAL))
    [row] = render_rows(resolved, [0])
    assert "“云雾绿茶 Cloud Tea”" in row.prompt and "“¥39.9”" in row.prompt
    assert row.prompt.endswith(", 超清，4K，电影级构图.")
    assert row.negative_prompt.startswith("模糊")


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1 << 18])
def test_a_string_hashes_the_same_wherever_it_sits(monkeypatch, chunk_bytes):
    """Keys are hashed in chunks of whole strings; a string's hash must not depend on its chunk,
    its position, its neighbours or its length (ids of any length are hashed, never refused)."""
    from jobs.manifest import keys

    monkeypatch.setattr(keys, "_CHUNK_BYTES", chunk_bytes)
    strings = ["", "a", "images/x.png", "香港/é/b", "images/x.png", "x" * 5000, "b/c/d", "a"]
    together = keys.string_hashes(pa.array(strings).slice(0))
    alone = [int(keys.string_hashes(pa.array([s]))[0]) for s in strings]
    assert together.tolist() == alone
    assert alone[2] == alone[4] and len(set(alone)) == len(set(strings))
    full, folders, owner = keys.hashes_and_folders(pa.array(["images/a/b.png", "images/a", "x"]).slice(0))
    assert owner.tolist() == [0]  # 'images/' is skipped: only 'images/a' is a folder of a key
    assert folders[0] == full[1]
