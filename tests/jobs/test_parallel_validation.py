"""Validation on several processes (jobs.manifest.parallel) finds exactly what one process finds,
survives a helper that dies, and reports a user error a helper meets as one line."""

import json
import os
import pickle
import random
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import ManifestError, ManifestFileError, ResolveContext, validate_manifest
from jobs.manifest.parallel import check_manifest
from jobs.manifest.read import open_parquet
from qwen_worker.presets import get_preset

TINY = ResolveContext(preset=get_preset("tiny"))
ROWS = 3000


@pytest.fixture
def caller_waits_for_a_helper(monkeypatch):
    """The caller checks 3,000 rows before a helper has started (~0.3 s): after its first batch it
    waits until a helper has claimed one, so that the helpers' outcomes are really merged."""
    import time

    from jobs.manifest import parallel

    real_claimer = parallel._claimer

    def claimer(claims, total):
        claim = real_claimer(claims, total)
        first = []

        def waiting_claim():
            if first:
                deadline = time.monotonic() + 60
                while len(os.listdir(claims)) < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
            first.append(True)
            return claim()

        return waiting_claim

    monkeypatch.setattr(parallel, "_claimer", claimer)


def messy_manifest(path: Path, *, bad: bool = True) -> str:
    """ROWS rows in row groups of 700: plain and template rows, and (with `bad`) about 40 % broken
    rows of every kind plus collisions between rows far apart (different batches, processes)."""
    rng = random.Random(5)
    rows = []
    for n in range(ROWS):
        row = {"id": f"r{n}", "prompt": f"a poster number {n}", "template": None, "params": None,
               "width": rng.choice([None, 64, 128]), "steps": rng.choice([None, 2, 4]), "output_key": None}
        if row["width"]:
            row["height"] = 64
        if n % 10 == 3:  # a template row with its own params
            row.update(prompt=None, template="product-poster", params=json.dumps(
                {"product_name": f"茶 {n}", "product": "a tea caddy", "price": f"¥{n}", "slogan": "春天"}))
        if bad and rng.random() < 0.4:
            kind = rng.randrange(6)
            if kind == 0:
                row["steps"] = 0
            elif kind == 1:
                row["id"] = "../" + row["id"]
            elif kind == 2:
                row.update(prompt=None, template="product-poster", params='{"product_name": 1}')
            elif kind == 3:
                row.update(width=65, height=64)
            elif kind == 4:
                row["output_key"] = "shared/one"  # all of these collide with the first
            else:
                row["output_key"] = f"Case/K{n % 7}" if n % 2 else f"case/k{n % 7}"
        rows.append(row)
    if bad:
        for n in (5, 40, 600, 650):  # rows with no other error
            rows[n] = {"id": f"r{n}", "prompt": "plain"}
        rows[600]["id"] = rows[5]["id"] = "twice"  # batches 0 and 2: shown among the first 1,000 errors
        rows[40]["output_key"], rows[650]["output_key"] = "shop/x.png", "shop/x.png/y"
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("template", pa.string()), ("params", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("steps", pa.int64()), ("output_key", pa.string())]))
    pq.write_table(table, path, row_group_size=700)
    return str(path)


def outcome(path: str, **options):
    try:
        summary = validate_manifest(path, ResolveContext(preset=get_preset("tiny")), batch_rows=256, **options)
        counters = (summary.shapes, summary.languages, summary.templates, summary.formats)
        return {"summary": json.dumps(summary.to_dict()), "order": [list(c.items()) for c in counters],
                "templates": summary.templates_used}
    except ManifestError as error:
        return {"errors": error.errors, "total": error.total}


@pytest.mark.parametrize("shown", [1000, 30])
def test_several_processes_find_exactly_what_one_process_finds(tmp_path, monkeypatch, caller_waits_for_a_helper,
                                                                shown):
    import jobs.manifest

    monkeypatch.setattr(jobs.manifest, "MAX_ERRORS_KEPT", shown)  # 30: each process stops keeping messages early
    path = messy_manifest(tmp_path / "m.parquet")
    alone = outcome(path, processes=1)
    assert alone["total"] > 1000 and len(alone["errors"]) == shown  # the first ones are shown
    if shown == 1000:
        for rule in ("must be unique", "must not repeat an image key", "must not differ only in letter case",
                     "needs a folder", "`params`", "must be a multiple of 16"):
            assert any(rule in line for line in alone["errors"]), rule
    assert outcome(path, processes=3) == alone


def test_a_valid_manifest_gets_the_same_summary_on_several_processes(tmp_path, caller_waits_for_a_helper):
    path = messy_manifest(tmp_path / "m.parquet", bad=False)
    alone = outcome(path, processes=1)
    assert json.loads(alone["summary"])["rows"] == ROWS and alone["templates"]
    assert outcome(path, processes=2) == alone


def test_helpers_really_check_batches_and_small_manifests_stay_on_one_process(tmp_path, caller_waits_for_a_helper):
    path = messy_manifest(tmp_path / "m.parquet")
    parquet_file = open_parquet(path)
    outcomes = check_manifest(parquet_file, path, TINY, version=None, processes=2, batch_rows=256, max_errors=1000)
    assert [o.number for o in outcomes] == list(range(len(outcomes))) and len(outcomes) == 13  # 4 row groups of 3 batches, 1 of 1
    assert len({o.checked_by for o in outcomes}) == 2
    outcomes = check_manifest(parquet_file, path, TINY, version=None, processes=None, batch_rows=256, max_errors=1000)
    assert {o.checked_by for o in outcomes} == {os.getpid()}  # 3,000 rows: not worth a helper


def test_batches_a_helper_claimed_before_it_died_are_checked_by_the_caller(tmp_path, monkeypatch, caplog,
                                                                           caller_waits_for_a_helper):
    path = messy_manifest(tmp_path / "m.parquet")
    alone = outcome(path, processes=1)
    dying = tmp_path / "dying-python"  # claims three batches, then dies without answering
    dying.write_text(f"#!{sys.executable}\n"
                     "import json, os, pickle, sys\n"
                     "job = pickle.loads(sys.stdin.buffer.read())\n"
                     "claimed = []\n"
                     "for number in range(len(job['batches'])):\n"
                     "    try:\n"
                     "        os.close(os.open(os.path.join(job['claims'], str(number)), os.O_CREAT | os.O_EXCL))\n"
                     "    except FileExistsError:\n"
                     "        continue\n"
                     "    claimed.append(number)\n"
                     "    if len(claimed) == 3:\n"
                     "        break\n"
                     f"open({str(tmp_path / 'claimed.json')!r}, 'w').write(json.dumps(claimed))\n"
                     "sys.exit(1)\n")
    dying.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(dying))
    assert outcome(path, processes=2) == alone
    assert len(json.loads((tmp_path / "claimed.json").read_text())) == 3
    assert "a validation helper stopped early (exit 1); its batches were checked here" in caplog.text


def corrupt_manifest(tmp_path, group: int) -> Path:
    from test_bad_manifests import corrupt_data_page_of_group

    path = tmp_path / "m.parquet"
    messy_manifest(path, bad=False)
    corrupt_data_page_of_group(path, group)
    return path


def test_a_corrupt_row_group_is_one_line_whichever_process_reads_it(tmp_path, monkeypatch):
    path = corrupt_manifest(tmp_path, 3)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ManifestFileError) as caught:
        validate_manifest(str(path), ResolveContext(preset=get_preset("tiny")), batch_rows=256, processes=2)
    assert str(caught.value).startswith(f"manifest {path} is corrupt: row group 3 (rows 2100-2799) cannot be read: ")
    assert "\n" not in str(caught.value)
    assert not list(tmp_path.glob("qwen-batch-validate-*"))  # claims cleaned up


def helper_job(path: Path, claims: Path, caller: int) -> bytes:
    from jobs.manifest.parallel import _portable_context, plan_batches

    claims.mkdir()
    return pickle.dumps({"source": str(path), "version": None, "context": _portable_context(TINY), "claims": str(claims),
                         "batches": plan_batches(open_parquet(str(path)).metadata, 256), "caller": caller,
                         "batch_rows": 256, "max_errors": 1000})


def test_the_user_error_a_helper_meets_is_raised_by_the_caller_as_it_is(tmp_path):
    from jobs.manifest.parallel import _Helper

    path = corrupt_manifest(tmp_path, 0)  # the helper claims batch 0 first
    helper = _Helper.start(helper_job(path, tmp_path / "claims", os.getpid()))
    try:
        with pytest.raises(ManifestFileError, match=r"is corrupt: row group 0 \(rows 0-699\) cannot be read: "):
            helper.finish()
    finally:
        helper.stop()


def test_a_helper_whose_caller_is_gone_stops_and_cleans_up(tmp_path, caplog):
    from jobs.manifest.parallel import _Helper

    path = messy_manifest(tmp_path / "m.parquet")
    helper = _Helper.start(helper_job(Path(path), tmp_path / "claims", caller=-1))  # not its parent: gone
    helper.finish()
    helper.stop()
    assert helper.process.returncode == 0 and not (tmp_path / "claims").exists()
    assert "stopped early" in caplog.text


@pytest.mark.parametrize("interpreter", ["missing", "exits at once"])
def test_a_helper_that_cannot_start_leaves_all_the_work_to_the_caller(tmp_path, monkeypatch, interpreter):
    path = messy_manifest(tmp_path / "m.parquet")
    alone = outcome(path, processes=1)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python") if interpreter == "missing" else "/bin/false")
    assert outcome(path, processes=2) == alone
