"""Exactly-once rests on provenance, not identical bytes; one driver per output; conflicts retried.

The tiny pipeline is batch-dependent the way the real one is: prompts of other lengths in the
same micro-batch pad the text embeddings, so a row rendered in another batch gets other bytes.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from helpers import ledger_rows

from jobs.submit_api import submit_job
from qwen_worker.encode import read_provenance

PROMPTS = ["a red poster", "a bilingual travel guide page for Hong Kong with a large title and a caption",
           "menu", "an official notice with a red header, a title and three paragraphs of body text"]


def varied_rows(count, size=32, steps=2):
    return [{"id": f"row-{n:03d}", "prompt": PROMPTS[n % len(PROMPTS)] + f" #{n}", "width": size, "height": size,
             "steps": steps} for n in range(count)]


def run(manifest, output, **options):
    options.setdefault("shard_size", 4)
    return submit_job(manifest, str(output), model="tiny", show_progress=False, echo=lambda _: None, **options)


def images(output):
    root = Path(output) / "images"
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}




def test_a_row_rendered_again_in_another_batch_keeps_the_stored_copy_with_its_provenance(
        ray_session, write_manifest, tmp_path):
    manifest = write_manifest(varied_rows(8))
    run(manifest, tmp_path / "alone", batch_size=1)
    run(manifest, tmp_path / "batched", batch_size=4)
    alone, batched = images(tmp_path / "alone"), images(tmp_path / "batched")
    differ = {name[:-4] for name in alone if alone[name] != batched[name]}
    assert differ  # other batch, other bytes: the case at hand
    # a copy of each row stored by a worker whose result never reached the driver (no ledger, no job.json)
    target = tmp_path / "target"
    shutil.copytree(tmp_path / "alone" / "images", target / "images")

    outcome = run(manifest, target, batch_size=4)

    assert (outcome.done, outcome.failed, outcome.rendered) == (8, 0, 8 - len(differ))
    assert images(target) == alone  # the first copy stays, byte for byte
    assert {r["status"] for r in ledger_rows(target)} == {"done"}
    assert {r["id"] for r in ledger_rows(target) if not r["rendered"]} == differ  # kept by their provenance
    for record in ledger_rows(target):
        assert record["sha256"] == [hashlib.sha256(alone[Path(k).name]).hexdigest() for k in record["keys"]]


def test_an_image_of_another_prompt_at_the_key_is_still_a_conflict(ray_session, write_manifest, tmp_path):
    rows = varied_rows(3)
    run(write_manifest(rows, name="first.parquet"), tmp_path / "first")
    rows[1]["prompt"] = "another prompt entirely"
    target = tmp_path / "target"
    shutil.copytree(tmp_path / "first" / "images", target / "images")
    outcome = run(write_manifest(rows, name="second.parquet"), target)
    assert (outcome.done, outcome.failed, outcome.failed_ids) == (0, 3, ["row-000", "row-001", "row-002"])
    assert {r["error_kind"] for r in ledger_rows(target)} == {"row"}  # other manifest sha256: not this job's images


def test_s3_answering_409_once_per_key_still_stores_every_row_once(
        ray_session, s3_server, s3_bucket, fault_proxy, write_manifest, monkeypatch):
    from qwen_worker.stores.s3 import S3Store

    proxy = fault_proxy(conflict_once="/images/")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)

    outcome = run(write_manifest(varied_rows(12)), s3_bucket, batch_size=4)

    assert (outcome.done, outcome.failed) == (12, 0)
    assert proxy.injected["conflict409"] == 12
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    stored = sorted(S3Store(s3_bucket).list_keys("images"))
    assert stored == [f"images/row-{n:03d}.png" for n in range(12)]


def test_a_worker_killed_mid_batch_with_batch_dependent_pixels_fails_no_row(ray_session, write_manifest, tmp_path):
    import ray

    rows = varied_rows(32, size=96)
    output = tmp_path / "out"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run(
        write_manifest(rows), output, shard_size=8, batch_size=4, workers=2)))
    thread.start()
    deadline = time.monotonic() + 120
    while not (output / "images").exists() or len(list((output / "images").iterdir())) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job_id = ledger_job_id(output)
    actor = ray.get_actor(f"qwen-worker-{job_id}-0")
    os.kill(ray.get(actor.ping.remote())["pid"], signal.SIGKILL)
    stored_at_kill = len(list((output / "images").iterdir()))
    thread.join(timeout=300)

    assert stored_at_kill < 32  # the kill came mid-job
    result = outcome["result"]
    assert (result.done, result.failed) == (32, 0)
    assert sorted(images(output)) == sorted(f"{r['id']}.png" for r in rows)  # each image once
    for name, data in images(output).items():
        assert read_provenance(data)["id"] == name[:-4]


def ledger_job_id(output):
    import json

    return json.loads((Path(output) / "job.json").read_text())["job_id"]


def test_two_drivers_of_one_job_render_it_once(ray_session, write_manifest, tmp_path):
    manifest = write_manifest(varied_rows(16, size=64))
    output = tmp_path / "out"
    command = [sys.executable, "-m", "jobs", "submit", manifest, "--output", str(output), "--model", "tiny",
               "--shard-size", "4", "--batch-size", "1", "--no-progress", "--workers", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    drivers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    results = [driver.communicate(timeout=300) for driver in drivers]

    codes = sorted(driver.returncode for driver in drivers)
    assert codes == [0, 4], results
    loser = results[[d.returncode for d in drivers].index(4)][1]
    assert "is already being run in" in loser and "not starting a second one" in loser
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser
    assert len(images(output)) == 16
    records = ledger_rows(output)
    assert len(records) == 16 and all(r["rendered"] for r in records)  # no row rendered twice
    assert not (output / "_lease.json").exists()
