"""Any manifest, any writer: a clear error naming row, field, rule and value (or one line about the
file), exit 1, nothing written; or a correct job. Never a traceback."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.manifest import ManifestError, ResolveContext, validate_manifest
from qwen_worker.presets import get_preset

TINY = ResolveContext(preset=get_preset("tiny"))


def write(tmp_path, table, name="m.parquet", **options):
    path = tmp_path / name
    pq.write_table(table, path, **options)
    return str(path)


def errors_of(path, context=TINY):
    with pytest.raises(ManifestError) as caught:
        validate_manifest(path, context)
    return caught.value.errors


def cli(capsys, *args):
    """`qwen-batch ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def not_utf8(values):
    """A `string` column whose bytes are not UTF-8 where a value is bytes (Parquet allows it)."""
    import numpy as np

    data = b"".join(v if isinstance(v, bytes) else v.encode() for v in values)
    offsets = np.cumsum([0] + [len(v if isinstance(v, bytes) else v.encode()) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])


def test_invalid_utf8_in_a_text_column_is_a_row_error(tmp_path, capsys):
    table = pa.table({"id": ["a", "b"], "prompt": not_utf8(["fine", b"caf\xe9 au lait"])})
    path = write(tmp_path, table)
    assert errors_of(path) == ["row 1 (id 'b'): `prompt` must be UTF-8 text, got: b'caf\\xe9 au lait'"]
    code, _out, err = cli(capsys, "validate", path, "--model", "tiny")
    assert code == 1 and "Traceback" not in err and "must be UTF-8 text" in err


def test_a_column_named_twice_is_one_file_level_error(tmp_path):
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["y"])], names=["id", "prompt", "prompt"])
    assert errors_of(write(tmp_path, table)) == ["manifest: column `prompt` appears 2 times (a column name must be unique)"]


def test_map_typed_params_render_and_a_key_given_twice_is_a_row_error(tmp_path):
    params = pa.array([[("product_name", "茶"), ("product", "a tin"), ("price", "¥9"), ("slogan", "春")],
                       [("product_name", "茶"), ("product_name", "tea"), ("product", "a tin"), ("price", "¥9"),
                        ("slogan", "春")]], type=pa.map_(pa.string(), pa.string()))
    table = pa.table({"id": ["a", "b"], "template": ["product-poster"] * 2, "params": params})
    [error] = errors_of(write(tmp_path, table))
    assert error.startswith("row 1 (id 'b'): `params`: params has the key 'product_name' twice, got: ")
    summary = validate_manifest(write(tmp_path, table.slice(0, 1), name="ok.parquet"), TINY)
    assert summary.templates == {"product-poster": 1}


def test_a_params_struct_with_a_field_named_twice_is_a_file_level_error(tmp_path):
    struct = pa.StructArray.from_arrays([pa.array(["x"]), pa.array(["y"])], names=["title", "title"])
    table = pa.table({"id": ["a"], "template": ["product-poster"], "params": struct})
    [error] = errors_of(write(tmp_path, table))
    assert error.startswith("manifest: column `params` has the field `title` twice, got type: struct<")


def test_a_template_filter_that_raises_is_a_row_error(tmp_path, capsys):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "price-tag.yaml").write_text(
        "name: price-tag\ndescription: A price tag.\nlanguage: en\naspect_ratio: '1:1'\nnegative_prompt: ' '\n"
        "params:\n  price:\n    description: The price.\n    required: true\n    example: 12\n"
        "prompt: 'A price tag reading {{ (price | round(2)) | quoted }}'\n")
    table = pa.table({"id": ["ok", "bad"], "template": ["price-tag"] * 2,
                      "params": [json.dumps({"price": 12.5}), json.dumps({"price": "twelve"})]})
    path = write(tmp_path, table)
    errors = errors_of(path, ResolveContext(preset=get_preset("tiny"), template_dirs=(str(templates),)))
    assert len(errors) == 1 and errors[0].startswith("row 1 (id 'bad'): `params`: template 'price-tag' ")
    assert "cannot render these params: TypeError" in errors[0] and errors[0].endswith("""got: '{"price": "twelve"}'""")
    code, _out, err = cli(capsys, "validate", path, "--model", "tiny", "--templates", str(templates))
    assert code == 1 and "Traceback" not in err


def test_deeply_nested_params_json_is_a_row_error(tmp_path):
    nested = "[" * 100_000 + "]" * 100_000
    table = pa.table({"id": ["a"], "template": ["product-poster"], "params": [nested]})
    [error] = errors_of(write(tmp_path, table))
    assert error.startswith("row 0 (id 'a'): `params`: params must be a JSON object nested less deeply, got: '[[[")


def test_a_very_long_id_is_a_row_error(tmp_path, capsys):
    table = pa.table({"id": ["x" * 5000, "b"], "prompt": ["a", "b"]})
    path = write(tmp_path, table)
    [error] = errors_of(path)
    # an id too long to be valid is cut to 128 characters where it names the row, and to 80 as the value
    assert error.startswith("row 0 (id '" + "x" * 125 + "...'): `id` must be 1-128 letters")
    assert error.endswith("got: '" + "x" * 77 + "...'")
    code, _out, err = cli(capsys, "validate", path, "--model", "tiny")
    assert code == 1 and "unexpected" not in err


def test_an_output_key_with_a_c1_control_character_is_refused(tmp_path):
    table = pa.table({"id": ["a"], "prompt": ["x"], "output_key": ["ads\u0085x"]})
    assert errors_of(write(tmp_path, table)) == [
        "row 0 (id 'a'): `output_key` must be a safe relative key (control character), got: 'ads\\x85x'"]


@pytest.mark.parametrize("kind", ["dictionary", "large_string", "string_view", "binary"])
def test_text_the_way_users_tools_write_it_is_accepted(tmp_path, kind):
    ids, prompts = pa.array(["a", "b"]), pa.array(["香港 travel guide", "menu"])
    convert = {"dictionary": lambda a: a.dictionary_encode(), "large_string": lambda a: a.cast(pa.large_string()),
               "string_view": lambda a: a.cast(pa.string_view()), "binary": lambda a: a.cast(pa.binary())}[kind]
    table = pa.table({"id": convert(ids), "prompt": convert(prompts), "format": convert(pa.array(["png", "webp"]))})
    summary = validate_manifest(write(tmp_path, table), TINY)
    assert (summary.rows, summary.formats, summary.languages) == (2, {"png": 1, "webp": 1}, {"zh": 1, "en": 1})


def test_a_binary_column_that_is_not_utf8_is_a_clear_row_error(tmp_path):
    table = pa.table({"id": ["a", "b"], "prompt": pa.array([b"ok", b"\xff\xfe"], pa.binary())})
    assert errors_of(write(tmp_path, table)) == ["row 1 (id 'b'): `prompt` must be UTF-8 text, got: b'\\xff\\xfe'"]


def corrupt_data_page(path: Path) -> None:
    """Overwrite the middle of the first row group's second column chunk (not the footer)."""
    corrupt_data_page_of_group(path, 0)


def corrupt_data_page_of_group(path: Path, group: int) -> None:
    metadata = pq.ParquetFile(path).metadata
    column = metadata.row_group(group).column(1)
    start = column.data_page_offset
    data = bytearray(path.read_bytes())
    for position in range(start + 20, start + column.total_compressed_size - 4):
        data[position] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_corrupt_data_page_is_one_line_naming_the_row_group(tmp_path, capsys):
    rows = 2000
    table = pa.table({"id": [f"r{n}" for n in range(rows)], "prompt": [f"prompt number {n} " * 4 for n in range(rows)]})
    path = Path(write(tmp_path, table, compression="snappy", row_group_size=1000))
    corrupt_data_page(path)
    code, _out, err = cli(capsys, "validate", str(path), "--model", "tiny")
    assert code == 1, err
    assert err.startswith(f"error: manifest {path} is corrupt: row group 0 (rows 0-999) cannot be read: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_pass_through_columns_python_cannot_convert_go_through_untouched(ray_session, tmp_path):
    from jobs.submit_api import submit_job

    far = pa.array([2**62, -(2**62)], pa.timestamp("ns"))  # years far beyond what Python's datetime holds
    table = pa.table({"id": ["a", "b"], "prompt": ["x", "y"], "width": [32, 32], "height": [32, 32], "steps": [2, 2],
                      "when": far, "local": pa.array([0, 1], pa.timestamp("s", tz="Not/AZone")),
                      "day": pa.array([2**31 - 1, -(2**31)], pa.date32())})
    path = write(tmp_path, table)
    outcome = submit_job(path, str(tmp_path / "out"), model="tiny", show_progress=False, echo=lambda _: None)
    assert (outcome.done, outcome.failed) == (2, 0)
    results = pq.read_table(tmp_path / "out" / "results.parquet")
    assert results.column("when").cast(pa.int64()).to_pylist() == [2**62, -(2**62)]
    assert results.schema.field("local").type == pq.read_schema(path).field("local").type  # same Arrow type
    assert results.schema.field("local").type.tz == "Not/AZone"
    assert results.column("day").cast(pa.int32()).to_pylist() == [2**31 - 1, -(2**31)]


def test_columns_named_like_result_columns_are_kept_apart_and_the_job_finishes(ray_session, tmp_path):
    from jobs.submit_api import submit_job

    names = ["status", "error", "sha256", "keys", "worker", "attempts", "rendered", "render_s", "upload_s"]
    table = pa.table({"id": ["a", "b"], "prompt": ["x", "y"], "width": [32, 32], "height": [32, 32], "steps": [2, 2],
                      **{name: [f"{name}-a", f"{name}-b"] for name in names}})
    path = write(tmp_path, table)
    summary = validate_manifest(path, TINY)
    assert summary.extra_columns == names
    for _ in range(2):  # the first run and a re-run both write their results
        outcome = submit_job(path, str(tmp_path / "out"), model="tiny", show_progress=False, echo=lambda _: None)
        assert (outcome.done, outcome.failed) == (2, 0)
        results = pq.read_table(tmp_path / "out" / "results.parquet")
        assert results.column("status").to_pylist() == ["done", "done"]
        for name in names:
            assert results.column(f"manifest.{name}").to_pylist() == [f"{name}-a", f"{name}-b"]


def test_keys_colliding_on_real_file_systems_are_refused_naming_both_rows(tmp_path):
    table = pa.table({"id": ["a", "b", "c", "d", "e"], "prompt": ["x"] * 5,
                      "output_key": ["ads/Poster", "ads/poster", "shop/x.png", "shop/x.png/y", "other"]})
    errors = errors_of(write(tmp_path, table))
    assert errors == [
        "row 1 (id 'b'): `output_key` must not differ only in letter case from 'images/ads/Poster.png' of row 0 "
        "(id 'a'): case-insensitive file systems and S3 gateways store them as one file, got: 'images/ads/poster.png'",
        "row 3 (id 'd'): `output_key` must not put a file where row 2 (id 'c') needs a folder or the reverse: row 2 "
        "writes 'images/shop/x.png' and row 3 writes 'images/shop/x.png/y.png' inside it, got: 'images/shop/x.png/y.png'",
    ]


def test_the_duplicate_check_is_linear_and_names_the_first_row(tmp_path):
    rows = 5000
    table = pa.table({"id": [f"r{n}" for n in range(rows)], "prompt": ["x"] * rows, "output_key": ["same"] * rows})
    with pytest.raises(ManifestError) as caught:
        validate_manifest(write(tmp_path, table), TINY)
    assert caught.value.total == rows - 1
    assert caught.value.errors[0] == ("row 1 (id 'r1'): `output_key` must not repeat an image key of row 0 (id 'r0'), "
                                      "got: 'images/same.png'")
    assert len(caught.value.errors) == 1000


@pytest.mark.parametrize("case", ["text", "truncated", "empty", "no rows", "directory", "unreadable", "missing"])
def test_a_file_that_is_not_a_readable_manifest_is_one_line_for_every_command(tmp_path, capsys, case):
    path = tmp_path / "m.parquet"
    good = pa.table({"id": ["a"], "prompt": ["x"]})
    if case == "text":
        path.write_text("id,prompt\na,x\n")
    elif case == "truncated":
        pq.write_table(good, path)
        path.write_bytes(path.read_bytes()[:-20])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "no rows":
        pq.write_table(good.slice(0, 0), path)
    elif case == "directory":
        path.mkdir()
    elif case == "unreadable":
        pq.write_table(good, path)
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: make it a dangling link instead
            path.unlink()
            path.symlink_to(tmp_path / "gone")
    output = tmp_path / "out"
    for command in (["validate", str(path), "--model", "tiny"],
                    ["submit", str(path), "--output", str(output), "--model", "tiny"]):
        code, _out, err = cli(capsys, *command)
        assert code == 1, (command, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not output.exists()  # nothing written


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
@pytest.mark.parametrize("case", ["binary", "empty", "header only", "directory", "missing"])
def test_manifest_from_csv_and_jsonl_bad_inputs_are_one_line(tmp_path, capsys, suffix, case):
    path = tmp_path / f"in.{suffix}"
    if case == "binary":
        path.write_bytes(b"PAR1\x00\xff\xfe\x15" * 10)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "header only":
        path.write_text("id,prompt\n" if suffix == "csv" else "\n")
    elif case == "directory":
        path.mkdir()
    code, _out, err = cli(capsys, "manifest", f"from-{suffix}", str(path), str(tmp_path / "out.parquet"))
    assert code in (1, 2), err  # 2: the command line names a directory where a file goes
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("case", ["not yaml", "directory", "binary"])
def test_templates_and_schedule_files_that_cannot_be_read_are_one_line(tmp_path, capsys, case):
    path = tmp_path / "file.yaml"
    if case == "not yaml":
        path.write_text("name: [unclosed\n")
    elif case == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe\x00binary")
    code, _out, err = cli(capsys, "schedule", "next", str(path))
    assert code in (1, 2) and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    directory = tmp_path / "templates"
    directory.mkdir()
    if case != "directory":
        (directory / "x.yaml").write_bytes(path.read_bytes())
    else:
        (directory / "x.yaml").mkdir()
    code, _out, err = cli(capsys, "templates", "render", "x", "--templates", str(directory), "--params", "{}")
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_an_unexpected_exception_is_one_line_with_the_trace_in_a_file(tmp_path):
    """A bug must not show a traceback either: one line, exit 4, the trace written to a file."""
    script = ("import sys, jobs.cli.validate_cmd as v\n"
              "def boom(*a, **k): raise RuntimeError('a bug\\nwith two lines')\n"
              "v.validate.callback = boom\n"
              "from jobs.cli import main\n"
              "main(['validate', 'x.parquet'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 4
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: unexpected RuntimeError: a bug with two lines (full trace in ")
    trace = Path(line.split("full trace in ")[1].split(";")[0])
    assert trace.is_file() and "Traceback" in trace.read_text() and str(tmp_path) in str(trace)


def random_bad_table(rng: random.Random):
    """One generated manifest: a few rows, each with a few fields set to hostile values."""
    hostile = {
        "id": ["", "../x", "a" * 200, "a" * 5000, None, "ok", "a/b", "\u0085", "é", 5],
        "prompt": ["", "   ", None, "x" * 10_000, "香港", "\x00", "ok"],
        "template": ["product-poster", "nope", "", None],
        "params": ["{", "[]", "null", '{"product_name": 1}', "[" * 5000, "{}", None, '{"x": NaN}'],
        "width": [0, -16, 15, 2**40, None, 32, 2048, 4096],
        "height": [0, 33, None, 32, 2**31],
        "aspect_ratio": ["1:1", "5:4", "", None],
        "steps": [0, -1, 201, None, 2, 2**62],
        "true_cfg_scale": [float("nan"), float("inf"), -1.0, 0.5, 4.0, None],
        "seed": [-1, 2**63 - 1, None, 7],
        "language": ["fr", "", "auto", None, "ZH"],
        "num_images": [0, 9, -1, None, 2],
        "format": ["gif", "", "PNG", None, "jpeg"],
        "output_key": ["/abs", "a/../b", "a\\b", "", "x/", "C:x", "ok/key", None, "a" * 600, "k.jpg"],
    }
    names = rng.sample(sorted(hostile), rng.randint(1, len(hostile)))
    if rng.random() < 0.8 and "id" not in names:
        names.append("id")
    rows = rng.randint(0, 6)
    columns = {}
    for name in names:
        values = [rng.choice(hostile[name]) for _ in range(rows)]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array([None if v is None else str(v) for v in values])
    if rng.random() < 0.2 and columns:
        name = rng.choice(list(columns))
        columns[name] = pa.array([rng.random() for _ in range(rows)])  # the wrong type
    return pa.table(columns) if columns else pa.table({"x": pa.array([], pa.int64())})


def test_hundreds_of_generated_bad_manifests_never_give_a_traceback(tmp_path, capsys):
    rng = random.Random(20261201)
    codes = {}
    for number in range(300):
        path = write(tmp_path, random_bad_table(rng), name=f"m{number}.parquet")
        code, _out, err = cli(capsys, "validate", path, "--model", "tiny")
        assert "Traceback" not in err and "unexpected" not in err, (path, err)
        assert code in (0, 1), (path, err)
        for line in err.strip().splitlines()[1:]:
            assert line.startswith(("row ", "manifest", "… and")), (path, line)
        codes[code] = codes.get(code, 0) + 1
    assert codes.get(1, 0) > 250  # they really are bad
