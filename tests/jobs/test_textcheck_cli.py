"""`qwen-batch text-check`: real OCR on image files, on a job output built by hand (local and real S3),
--json, the expected text from an image's embedded prompt, and one-line errors for bad paths."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from text_images import FONT, NO_FONT, draw_text, png_bytes
from jobs.cli import main as cli_main
from qwen_worker.encode import encode_image

pytestmark = pytest.mark.skipif(not FONT.is_file(), reason=NO_FONT)

RIGHT = ["西湖十景", "West Lake"]
NEAR = ["西湖十影", "West Lake"]  # one character of 12 changed


def run(args, capsys, code=0):
    with pytest.raises(SystemExit, match=f"^{code}$"):
        cli_main(["text-check", *args])
    return capsys.readouterr()


def one_line_error(err: str, *needles: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def images(tmp_path):
    paths = {}
    for name, lines in (("right", RIGHT), ("near", NEAR), ("blank", [])):
        paths[name] = tmp_path / f"{name}.png"
        paths[name].write_bytes(png_bytes(draw_text(lines)))
    return paths


def test_files_one_line_each_in_order(images, capsys):
    out = run([str(images["right"]), str(images["near"]), str(images["blank"]), "--expect", "西湖十景",
               "--expect", "West Lake"], capsys).out
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert lines[0] == f"1.000 {images['right']} read: '西湖十景 West Lake' missing: []"
    assert lines[1] == f"0.917 {images['near']} read: '西湖十影 West Lake' missing: []"
    assert lines[2] == f"0.000 {images['blank']} read: '' missing: ['西湖十景', 'West Lake']"


def test_json(images, capsys):
    out = run([str(images["right"]), str(images["blank"]), "--expect", "West Lake", "--json"], capsys).out
    records = json.loads(out)
    assert [(r["path"], r["score"], r["scores"], r["missing"]) for r in records] == [
        (str(images["right"]), 1.0, [1.0], []),
        (str(images["blank"]), 0.0, [0.0], ["West Lake"]),
    ]
    assert records[0]["expected"] == ["West Lake"] and records[0]["ocr_seconds"] > 0
    assert records[0]["read"].replace(" ", "") == "西湖十景WestLake"


def test_expected_text_from_the_image_s_embedded_prompt(tmp_path, capsys):
    path = tmp_path / "ours.png"
    path.write_bytes(encode_image(draw_text(["西湖十影"]), "png", {"generator": "qwen-batch", "prompt": '海报标题为“西湖十景”'}))
    assert run([str(path)], capsys).out == f"0.750 {path} read: '西湖十影' missing: []\n"


def write_output(root, store_put):
    """A job output by hand: job.json, results.parquet and the images of its done rows."""
    rows = [
        {"id": "a", "status": "done", "keys": ["images/a.png"], "prompt": 'poster "西湖十景" and "West Lake"', "text": None},
        {"id": "b", "status": "done", "keys": ["images/b-0.png", "images/b-1.png"], "prompt": "no quotes",
         "text": ["Night Market"]},
        {"id": "c", "status": "failed", "keys": ["images/c.png"], "prompt": '"never rendered"', "text": None},
        {"id": "d", "status": "done", "keys": ["images/d.png"], "prompt": "a landscape, nothing written", "text": None},
    ]  # fmt: skip
    drawn = {"images/a.png": RIGHT, "images/b-0.png": ["Night Market"], "images/b-1.png": ["Night Marker"],
             "images/d.png": []}
    for key, lines in drawn.items():
        store_put(key, png_bytes(draw_text(lines)))
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("status", pa.string()), ("keys", pa.list_(pa.string())), ("prompt", pa.string()),
        ("text", pa.list_(pa.string())),
    ]))  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store_put("results.parquet", buffer.getvalue())
    store_put("job.json", b'{"job_id": "by-hand"}')


def test_a_local_output_checks_each_done_row_against_its_own_text(tmp_path, capsys):
    out_dir = tmp_path / "out"

    def put(key, data):
        (out_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / key).write_bytes(data)

    write_output(out_dir, put)
    result = run([str(out_dir), "--json"], capsys)
    records = json.loads(result.out)
    assert [(r["id"], r["path"], r["expected"], r["score"]) for r in records] == [
        ("a", f"{out_dir}/images/a.png", ["西湖十景", "West Lake"], 1.0),
        ("b", f"{out_dir}/images/b-0.png", ["Night Market"], 1.0),
        ("b", f"{out_dir}/images/b-1.png", ["Night Market"], pytest.approx(10 / 11, abs=1e-4)),
    ]
    assert result.err == "1 image(s) of rows expecting no text were not checked\n"
    # --expect overrides every row's own text
    # (a.png shares a few Latin letters with it: a low score, and the string missing)
    lines = run([str(out_dir), "--expect", "Night Market"], capsys).out.splitlines()
    assert [line.split(" ")[1] for line in lines] == [f"{out_dir}/images/{name}.png" for name in ("a", "b-0", "b-1", "d")]
    assert [float(line.split(" ")[0]) < 0.5 for line in lines] == [True, False, False, True]
    assert [line.split(" ")[0] for line in lines[1:]] == ["1.000", "0.909", "0.000"]
    assert lines[0].endswith("missing: ['Night Market']")


def test_s3_objects_and_an_s3_output(s3_bucket, capsys):
    from qwen_worker.stores import open_store

    store = open_store(s3_bucket)
    write_output(None, lambda key, data: store.put(key, data))
    store.put("loose/near.png", png_bytes(draw_text(NEAR)))
    out = run([f"{s3_bucket}/loose/near.png", s3_bucket, "--expect", "西湖十景"], capsys).out.splitlines()
    assert out[0] == f"0.750 {s3_bucket}/loose/near.png read: '西湖十影 West Lake' missing: []"
    assert [line.split(" ")[:2] for line in out[1:]] == [
        ["1.000", f"{s3_bucket}/images/a.png"], ["0.000", f"{s3_bucket}/images/b-0.png"],
        ["0.000", f"{s3_bucket}/images/b-1.png"], ["0.000", f"{s3_bucket}/images/d.png"],
    ]  # Chinese expected text shares no character with the English images
    err = run([f"{s3_bucket}/loose/absent.png", "--expect", "x"], capsys, code=1).err
    one_line_error(err, f"{s3_bucket}/loose/absent.png: no such object")


def test_bad_paths_are_one_line_errors_before_any_ocr(images, tmp_path, capsys):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(images["right"].read_bytes()[:200])
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    cases = [
        ([str(tmp_path / "absent.png")], f"{tmp_path / 'absent.png'}: no such file or directory"),
        ([str(text_file)], f"{text_file}: not a readable image: cannot identify image file"),
        ([str(truncated)], f"{truncated}: not a readable image"),
        ([str(plain_dir)], f"{plain_dir}: a directory without results.parquet"),
        (["http://example.com/a.png"], "unsupported path 'http://example.com/a.png'"),
    ]
    for paths, message in cases:
        # the good image comes first: nothing is printed for it, the bad path fails before any OCR
        result = run([str(images["right"]), *paths, "--expect", "West Lake"], capsys, code=1)
        assert result.out == ""
        one_line_error(result.err, message)
    result = run([str(images["right"])], capsys, code=1)  # no --expect and no embedded prompt
    one_line_error(result.err, f"{images['right']}: no expected text (it carries no qwen-batch prompt): pass --expect TEXT")
    result = run(["--expect", "x"], capsys, code=2)
    one_line_error(result.err, "Missing argument 'PATH...'")


def test_an_unreadable_image_of_an_output_is_a_one_line_error(tmp_path, capsys):
    out_dir = tmp_path / "out"

    def put(key, data):
        (out_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / key).write_bytes(data)

    write_output(out_dir, put)
    (out_dir / "images" / "a.png").write_bytes(b"garbage")
    one_line_error(run([str(out_dir)], capsys, code=1).err, f"{out_dir}/images/a.png: not a readable image")
    (out_dir / "images" / "a.png").unlink()
    one_line_error(run([str(out_dir)], capsys, code=1).err,
                   f"{out_dir}/images/a.png: the row is done but its image is not there")
    (out_dir / "results.parquet").write_bytes(b"not parquet")
    one_line_error(run([str(out_dir)], capsys, code=1).err, f"{out_dir}/results.parquet: not a readable Parquet file")
