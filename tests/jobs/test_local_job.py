"""Whole jobs on the real tiny pipeline and a real local Ray instance (shared by the session)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import forget_ledger_rows, ledger_rows, tiny_rows
from jobs.ledger import STATE_COLUMNS, read_ledger
from jobs.status import job_status
from jobs.submit_api import submit_job
from qwen_worker.errors import UserError
from qwen_worker.stores import LocalStore


def run(manifest, output, **options):
    options.setdefault("shard_size", 4)
    return submit_job(manifest, str(output), model="tiny", show_progress=False, echo=lambda _: None, **options)


def image_bytes(output):
    root = Path(output) / "images"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_full_job_stores_every_image_once_with_ledger_and_results(ray_session, write_manifest, tmp_path):
    rows = tiny_rows(10, campaign="spring")
    rows[3].update(num_images=2)
    rows[7].update(format="jpeg", output_key="ads/special")
    manifest = write_manifest(rows)
    output = tmp_path / "out"

    outcome = run(manifest, output)

    assert (outcome.total, outcome.done, outcome.failed, outcome.rendered, outcome.exit_code) == (10, 10, 0, 10, 0)
    images = image_bytes(output)
    expected = {f"row-{n:03d}.png" for n in range(10) if n not in (3, 7)} | {"row-003-0.png", "row-003-1.png", "ads/special.jpg"}
    assert set(images) == expected
    ledger = ledger_rows(output)
    assert sorted(r["row_index"] for r in ledger) == list(range(10))
    [segment] = Path(output, "_ledger").iterdir()  # the 3 shard files, compacted into one segment
    assert segment.name.startswith("segment-")
    for record in ledger:  # the ledger's sha256 is the stored object's
        for key, digest in zip(record["keys"], record["sha256"]):
            assert hashlib.sha256((Path(output) / key).read_bytes()).hexdigest() == digest
    results = pq.read_table(Path(output) / "results.parquet")
    assert results.column("id").to_pylist() == [r["id"] for r in rows]
    assert set(results.column("status").to_pylist()) == {"done"}
    assert results.column("campaign").to_pylist() == ["spring"] * 10  # unknown column passed through
    assert results.column("prompt").to_pylist()[1].endswith(", 超清，4K，电影级构图.")
    job = json.loads((Path(output) / "job.json").read_text())
    assert (job["job_id"], job["rows"], job["model"], job["shard_size"]) == (outcome.job_id, 10, "tiny", 4)
    [worker] = job["options"]["workers"]  # each worker's state, node, load time and offload plan (none for tiny)
    assert worker["name"] == f"qwen-worker-{outcome.job_id}-0" and worker["offload_plan"] is None
    assert worker["state"] in ("idle", "busy") and worker["node_ip"]
    manifest_sha256 = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
    assert (Path(output) / "manifests" / f"{manifest_sha256}.parquet").read_bytes() == Path(manifest).read_bytes()


def test_same_bytes_with_one_or_two_workers_and_across_runs(ray_session, write_manifest, tmp_path):
    manifest = write_manifest(tiny_rows(8))
    run(manifest, tmp_path / "one", workers=1, batch_size=3)
    run(manifest, tmp_path / "two", workers=2, batch_size=3)
    one, two = image_bytes(tmp_path / "one"), image_bytes(tmp_path / "two")
    assert len(one) == 8 and one == two
    other_seed = tmp_path / "seed1"
    run(manifest, other_seed, workers=1, batch_size=3, seed=1)
    assert image_bytes(other_seed).keys() == one.keys()
    assert all(image_bytes(other_seed)[k] != one[k] for k in one)  # derived seeds follow the job seed


def test_resume_renders_only_missing_rows(ray_session, write_manifest, tmp_path):
    manifest = write_manifest(tiny_rows(10))
    output = tmp_path / "out"
    run(manifest, output)
    before = image_bytes(output)
    # a crash after rows 4-7 were stored but before their shard's ledger, with rows 5, 6 not yet stored:
    forget_ledger_rows(output, range(4, 8))
    for n in (5, 6):
        (output / "images" / f"row-{n:03d}.png").unlink()

    outcome = run(manifest, output)

    assert (outcome.done, outcome.skipped, outcome.rendered, outcome.failed) == (10, 6, 2, 0)
    assert image_bytes(output) == before
    rendered = {r["id"]: r["rendered"] for r in ledger_rows(output) if 4 <= r["row_index"] < 8}
    assert rendered == {"row-004": False, "row-005": True, "row-006": True, "row-007": False}
    again = run(manifest, output)  # nothing left: no worker is even started
    assert (again.done, again.skipped, again.rendered) == (10, 10, 0)


def test_a_resume_with_every_row_done_leaves_results_and_report_as_they_are(ray_session, write_manifest, tmp_path):
    manifest = write_manifest(tiny_rows(6))
    output = tmp_path / "out"
    run(manifest, output)
    store = LocalStore(output)
    job_id = json.loads((output / "job.json").read_text())["job_id"]
    state, full = read_ledger(store, job_id, columns=STATE_COLUMNS), read_ledger(store, job_id)
    assert state.table.column_names == ["job_id", "row_index", "status", "input_digest"]  # what a resume reads first
    assert (state.done_mask(6) == full.done_mask(6)).all() and state.done_mask(6).all()
    assert state.input_digests(np.arange(6)) == full.input_digests(np.arange(6))
    merged = ("results.parquet", "report.html")
    written = {name: (output / name).stat().st_mtime_ns for name in merged}

    again = run(manifest, output)  # nothing settled since they were written: nothing to merge again

    assert (again.done, again.skipped, again.rendered) == (6, 6, 0)
    assert {name: (output / name).stat().st_mtime_ns for name in merged} == written
    (output / "report.html").unlink()  # one of them gone: both are written again
    run(manifest, output)
    assert (output / "report.html").is_file()
    written = {name: (output / name).stat().st_mtime_ns for name in merged}
    forget_ledger_rows(output, [2])  # a run that settles a row again merges again
    third = run(manifest, output)
    assert (third.done, third.skipped, third.rendered) == (6, 5, 0)
    assert all((output / name).stat().st_mtime_ns != written[name] for name in merged)
    assert pq.read_table(output / "results.parquet").column("status").to_pylist() == ["done"] * 6


def test_conflicting_object_fails_its_row_only_then_overwrite_replaces_it(ray_session, write_manifest, tmp_path):
    manifest = write_manifest(tiny_rows(5))
    output = tmp_path / "out"
    (output / "images").mkdir(parents=True)
    (output / "images" / "row-002.png").write_bytes(b"someone else's file")

    outcome = run(manifest, output)

    assert (outcome.done, outcome.failed, outcome.failed_ids, outcome.exit_code) == (4, 1, ["row-002"], 3)
    assert (output / "images" / "row-002.png").read_bytes() == b"someone else's file"
    status = job_status(str(output))
    assert (status["total"], status["done"], status["failed"], status["pending"]) == (5, 4, 1, 0)
    [failed] = status["failed_rows"]
    assert failed["id"] == "row-002"
    assert failed["error"].startswith("object exists with different content at ")
    assert failed["error"].endswith("pass --overwrite to replace it")

    replaced = run(manifest, output, overwrite=True)
    assert (replaced.done, replaced.failed, replaced.rendered) == (5, 0, 1)
    assert (output / "images" / "row-002.png").read_bytes().startswith(b"\x89PNG")


def test_a_different_manifest_into_the_same_output_is_refused(ray_session, write_manifest, tmp_path):
    output = tmp_path / "out"
    run(write_manifest(tiny_rows(2), name="a.parquet"), output)
    other = write_manifest(tiny_rows(3, prefix="other"), name="b.parquet")
    with pytest.raises(UserError, match=r"already holds job qb-[0-9a-f]{12} .*pass --resume-anyway"):
        run(other, output)
    assert sorted(image_bytes(output)) == ["row-000.png", "row-001.png"]  # nothing touched
    outcome = run(other, output, resume_anyway=True)
    assert (outcome.done, outcome.rendered) == (3, 3)
    assert json.loads((output / "job.json").read_text())["replaces"] is not None


def test_a_template_edited_between_a_run_and_its_resume_is_another_job_not_a_mix(ray_session, write_manifest, tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    badge = {"name": "team-badge", "description": "A badge.", "language": "en", "aspect_ratio": "1:1",
             "negative_prompt": " ", "params": {"title": {"description": "Title.", "required": True, "example": "Hi"}},
             "prompt": "A badge with the title {{ title | quoted }}."}
    (templates / "team-badge.yaml").write_text(json.dumps(badge), encoding="utf-8")
    rows = [{"id": f"b{n}", "template": "team-badge", "params": json.dumps({"title": f"T{n}"}), "width": 32,
             "height": 32, "steps": 2} for n in range(4)]
    manifest, output = write_manifest(rows), tmp_path / "out"
    first = run(manifest, output, template_dirs=(str(templates),))
    assert (first.done, first.failed) == (4, 0)
    assert json.loads((output / "job.json").read_text())["templates"] == {
        "team-badge": hashlib.sha256((templates / "team-badge.yaml").read_bytes()).hexdigest()}

    badge["prompt"] = "A round badge reading {{ title | quoted }}."
    (templates / "team-badge.yaml").write_text(json.dumps(badge), encoding="utf-8")
    with pytest.raises(UserError, match=r"rendered with another version of template\(s\) team-badge .*would mix prompts"):
        run(manifest, output, template_dirs=(str(templates),))
    assert json.loads((output / "job.json").read_text())["job_id"] == first.job_id  # nothing was replaced
