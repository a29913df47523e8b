"""Cluster mode on the session's real Ray instance: the Ray Jobs API, lost workers, poison rows,
exported metrics."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from helpers import ledger_rows, tiny_rows
from jobs.submit_api import submit_job


def qwen_batch(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jobs", *args], capture_output=True, text=True, timeout=timeout)


def ray_job_status(dashboard, submission_id):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard).get_job_status(submission_id)


def test_submit_through_the_jobs_api_waits_and_is_idempotent(ray_dashboard, write_manifest, tmp_path):
    manifest = write_manifest(tiny_rows(6))
    output = str(tmp_path / "out")

    first = qwen_batch("submit", manifest, "--output", output, "--model", "tiny", "--address", ray_dashboard)
    second = qwen_batch("submit", manifest, "--output", output, "--model", "tiny", "--address", ray_dashboard)

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    job_id = first.stderr.split("submitted job ")[1].split()[0]
    assert f"as Ray job {job_id}" in first.stderr
    assert f"job {job_id} is already running on {ray_dashboard} as Ray job {job_id}" in second.stderr
    waited = qwen_batch("submit", manifest, "--output", output, "--model", "tiny", "--address", ray_dashboard, "--wait")
    # either still the first run (followed to its end) or, if it had ended, a resume with nothing left
    assert waited.returncode == 0, waited.stderr
    assert "6/6 rows stored, 0 failed, 0 pending" in waited.stderr
    assert len(list(Path(output, "images").iterdir())) == 6
    status = qwen_batch("status", job_id, "--address", ray_dashboard)
    assert status.returncode == 0 and "6/6 done, 0 failed, 0 pending" in status.stdout and "Ray job: SUCCEEDED" in status.stdout
    listed = qwen_batch("jobs", "--address", ray_dashboard)
    assert job_id in listed.stdout and output in listed.stdout
    logs = qwen_batch("logs", job_id, "--address", ray_dashboard)
    assert f"job {job_id}: 6/6 rows stored" in logs.stdout


def test_cancel_then_resume_renders_no_finished_row_again(ray_dashboard, write_manifest, tmp_path):
    manifest = write_manifest(tiny_rows(40, size=128))
    output = tmp_path / "out"
    # one worker (a cluster's default is now up to one per shard): no straggler copy, so "rendered now" is exact
    submitted = qwen_batch("submit", manifest, "--output", str(output), "--model", "tiny", "--batch-size", "1",
                           "--shard-size", "4", "--address", ray_dashboard, "--workers", "1")
    job_id = submitted.stderr.split("submitted job ")[1].split()[0]
    deadline = time.monotonic() + 120
    while len(list(output.glob("images/*.png"))) < 5:
        assert time.monotonic() < deadline, "no images in time"
        time.sleep(0.2)

    cancelled = qwen_batch("cancel", job_id, "--address", ray_dashboard)

    assert cancelled.returncode == 0 and "stop requested" in cancelled.stdout
    while not ray_job_status(ray_dashboard, job_id).is_terminal():
        time.sleep(0.2)
    assert ray_job_status(ray_dashboard, job_id).value == "STOPPED"
    stored_before = len(list(output.glob("images/*.png")))
    assert stored_before < 40
    resumed = qwen_batch("submit", manifest, "--output", str(output), "--model", "tiny", "--batch-size", "1",
                         "--shard-size", "4", "--address", ray_dashboard, "--workers", "1", "--wait")
    assert resumed.returncode == 0, resumed.stderr
    assert f"as Ray job {job_id}-2" in resumed.stderr
    records = ledger_rows(output)
    assert len(records) == 40 and {r["status"] for r in records} == {"done"}
    assert len(list(output.glob("images/*.png"))) == 40
    logs = qwen_batch("logs", f"{job_id}-2", "--address", ray_dashboard).stdout
    rendered_now = int(logs.split("rows stored (")[1].split(" rendered now")[0])
    assert rendered_now == 40 - stored_before  # finished rows were not rendered again


def test_a_worker_killed_mid_shard_loses_only_its_shard(ray_session, write_manifest, tmp_path):
    import ray

    manifest = write_manifest(tiny_rows(24, size=128))
    output = tmp_path / "out"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=submit_job(
        manifest, str(output), model="tiny", shard_size=6, batch_size=1, show_progress=False, echo=lambda _: None)))
    thread.start()
    deadline = time.monotonic() + 120
    while len(list(output.glob("images/*.png"))) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    job_id = next(Path(output).glob("job.json")).read_text().split('"job_id": "')[1].split('"')[0]
    actor = ray.get_actor(f"qwen-worker-{job_id}-0")
    os.kill(ray.get(actor.ping.remote())["pid"], signal.SIGKILL)
    thread.join(timeout=300)

    result = outcome["result"]
    assert (result.done, result.failed) == (24, 0)
    records = ledger_rows(output)
    assert sorted(r["id"] for r in records) == sorted(f"row-{n:03d}" for n in range(24))
    assert max(r["attempts"] for r in records) == 2  # the lost shard's unfinished rows ran again
    assert len(list(output.glob("images/*.png"))) == 24


def test_a_poison_row_is_marked_failed_after_max_attempts_and_the_rest_complete(ray_session, write_manifest, tmp_path):
    output = tmp_path / "out"
    (output / "images" / "row-002.png").mkdir(parents=True)  # every write of this row fails
    outcome = submit_job(write_manifest(tiny_rows(5)), str(output), model="tiny", shard_size=5, max_attempts=3,
                         show_progress=False, echo=lambda _: None)

    assert (outcome.done, outcome.failed, outcome.failed_ids, outcome.exit_code) == (4, 1, ["row-002"], 3)
    [poison] = [r for r in ledger_rows(output) if r["status"] == "failed"]
    assert poison["attempts"] == 3
    assert poison["error"].startswith("gave up after 3 attempts: IsADirectoryError")


def test_metrics_are_exported_to_prometheus(ray_session, ray_metrics_port, write_manifest, tmp_path):
    import urllib.request

    from qwen_worker.metrics import METRIC_NAMES

    outcome = submit_job(write_manifest(tiny_rows(4)), str(tmp_path / "out"), model="tiny", show_progress=False,
                         echo=lambda _: None)
    wanted = {"qwen_batch_rows_rendered", "qwen_batch_render_seconds", "qwen_batch_upload_seconds", "qwen_batch_rows_in_flight"}
    assert wanted <= set(METRIC_NAMES)
    deadline = time.monotonic() + 60
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=5).read().decode()
        # the session's cluster also holds earlier jobs' series: wait for this job's
        ours = [line for line in text.splitlines() if f'job_id="{outcome.job_id}"' in line]
        found = {name for name in wanted if any(line.startswith(f"ray_{name}") for line in ours)}
        if found == wanted or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert found == wanted


def test_a_straggler_shard_is_also_given_to_an_idle_worker_and_stored_once(ray_session, write_manifest, tmp_path):
    slow = {"id": "slow-000", "prompt": "a very large poster", "width": 512, "height": 512, "steps": 6}
    rows = [slow, *tiny_rows(9)]  # shard 0: the slow row alone; shards 1-3: quick rows
    manifest = write_manifest(rows)
    outcome = submit_job(manifest, str(tmp_path / "out"), model="tiny", workers=2, shard_size=3, batch_size=1,
                         show_progress=False, echo=lambda _: None)
    assert (outcome.done, outcome.failed) == (10, 0)
    assert outcome.speculative >= 1
    records = ledger_rows(tmp_path / "out")
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows)
    assert len(list((tmp_path / "out" / "images").iterdir())) == 10
