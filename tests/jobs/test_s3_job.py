"""Jobs writing to a real S3-compatible server (SeaweedFS), through real faults and real crashes."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import tiny_rows
from jobs.status import job_status
from jobs.submit_api import submit_job
from qwen_worker.stores.s3 import S3Store


def run(manifest, output, **options):
    options.setdefault("shard_size", 4)
    return submit_job(manifest, str(output), model="tiny", show_progress=False, echo=lambda _: None, **options)


def s3_images(uri):
    store = S3Store(uri)
    return {key: store.get(key) for key in sorted(store.list_keys("images"))}


def local_images(output):
    root = Path(output)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "images").rglob("*")) if p.is_file()}


def cli(*args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "jobs", *args], env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )


def test_job_to_s3_has_the_same_bytes_as_to_a_local_dir(ray_session, s3_bucket, write_manifest, tmp_path):
    manifest = write_manifest(tiny_rows(6, extra_note="x"))
    run(manifest, tmp_path / "local")
    outcome = run(manifest, s3_bucket)

    assert (outcome.done, outcome.failed) == (6, 0)
    assert s3_images(s3_bucket) == local_images(tmp_path / "local")
    store = S3Store(s3_bucket)
    manifest_bytes = Path(manifest).read_bytes()
    assert store.get(f"manifests/{hashlib.sha256(manifest_bytes).hexdigest()}.parquet") == manifest_bytes
    results = pq.read_table(io.BytesIO(store.get("results.parquet")))
    assert results.column("status").to_pylist() == ["done"] * 6
    assert results.column("extra_note").to_pylist() == ["x"] * 6
    status = job_status(s3_bucket)
    assert (status["total"], status["done"], status["failed"], status["pending"]) == (6, 6, 0, 0)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for key in ["job.json", "results.parquet", *store.list_keys("_ledger")]:
        assert secret not in store.get(key)


def test_faults_on_every_request_still_store_each_row_exactly_once(
    ray_session, s3_server, s3_bucket, fault_proxy, write_manifest, tmp_path, monkeypatch
):
    manifest = write_manifest(tiny_rows(24))
    run(manifest, tmp_path / "clean")
    proxy = fault_proxy(seed=11, slowdown=0.10, reset=0.03, drop=0.05)
    proxy.queue("drop", "slowdown", "reset")  # each kind at least once, whatever the request order
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)

    outcome = run(manifest, s3_bucket)

    assert (outcome.done, outcome.failed) == (24, 0)
    assert sum(proxy.injected.values()) >= 8 and {"slowdown", "drop", "reset"} <= set(proxy.injected)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # check the server itself
    assert s3_images(s3_bucket) == local_images(tmp_path / "clean")  # no duplicate, none missing
    status = job_status(s3_bucket)
    assert (status["done"], status["pending"]) == (24, 0)


def wait_for_images(uri, at_least, process, timeout=120):
    store = S3Store(uri, max_attempts=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if len(list(store.list_keys("images"))) >= at_least:
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError("the job stored no images in time")


SLOW_ROWS = dict(size=128)  # ~0.1 s a row on the tiny model: slow enough to kill mid-job


def test_driver_killed_mid_job_resumes_without_rerendering_stored_rows(ray_session, s3_bucket, write_manifest):
    rows = tiny_rows(40, **SLOW_ROWS)
    manifest = write_manifest(rows)
    process = cli("submit", manifest, "--output", s3_bucket, "--model", "tiny", "--shard-size", "4",
                  "--batch-size", "1", "--no-progress", env={"RAY_ADDRESS": ray_session})
    wait_for_images(s3_bucket, 6, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(1.0)  # its actors die with it
    stored_before = set(s3_images(s3_bucket))
    assert 6 <= len(stored_before) < 40

    outcome = run(manifest, s3_bucket)

    assert (outcome.done, outcome.failed) == (40, 0)
    assert outcome.rendered == 40 - len(stored_before)  # 0 finished rows rendered again
    assert set(s3_images(s3_bucket)) == {f"images/{r['id']}.png" for r in rows}


def test_s3_server_killed_and_restarted_mid_job_then_resume_completes(ray_session, s3_server, s3_bucket, write_manifest):
    rows = tiny_rows(40, **SLOW_ROWS)
    manifest = write_manifest(rows)
    process = cli("submit", manifest, "--output", s3_bucket, "--model", "tiny", "--shard-size", "4",
                  "--batch-size", "1", "--no-progress", env={"RAY_ADDRESS": ray_session})
    wait_for_images(s3_bucket, 4, process)
    s3_server.kill()
    time.sleep(1.5)
    s3_server.restart()
    _out, err = process.communicate(timeout=300)
    assert process.returncode in (0, 3, 4), err  # done, or stopped in a resumable state
    assert "Traceback" not in err
    stored_before = set(s3_images(s3_bucket))

    outcome = run(manifest, s3_bucket)

    assert (outcome.done, outcome.failed) == (40, 0)
    assert outcome.rendered == 40 - len(stored_before)
    assert set(s3_images(s3_bucket)) == {f"images/{r['id']}.png" for r in rows}


@pytest.mark.parametrize(
    "case, env, output, message",
    [
        ("wrong secret", {"AWS_SECRET_ACCESS_KEY": "not-the-secret-123"}, "s3://{bucket}/out",
         r"^error: cannot use s3://{bucket}/out .*SignatureDoesNotMatch.*AWS_SECRET_ACCESS_KEY"),
        ("missing bucket", {}, "s3://no-such-bucket-qb/out", r"^error: cannot use s3://no-such-bucket-qb/out .*NoSuchBucket"),
        ("unreachable", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "s3://{bucket}/out",
         r"^error: cannot use s3://{bucket}/out .*cannot reach the S3 endpoint"),
    ],
)
def test_storage_user_errors_are_one_clear_line_without_secrets(s3_bucket, write_manifest, case, env, output, message):
    import re

    bucket = s3_bucket.split("/")[2]
    process = cli("submit", write_manifest(tiny_rows(2)), "--output", output.format(bucket=bucket), "--model", "tiny",
                  env=env)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    assert re.match(message.format(bucket=bucket), err.strip()), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], "not-the-secret-123"):
        assert secret not in err


def test_an_s3_manifest_is_pinned_to_the_version_the_job_started_with(ray_session, s3_bucket, write_manifest):
    from jobs.runner import RunOptions, run_job
    from jobs.submit_api import prepare_job
    from qwen_worker.errors import UserError

    store = S3Store(s3_bucket.rsplit("/", 1)[0] + "/in")
    store.put("manifest.parquet", Path(write_manifest(tiny_rows(3), name="v1.parquet")).read_bytes())
    manifest = f"{store.uri}/manifest.parquet"
    prepared = prepare_job(manifest, s3_bucket, model="tiny", shard_size=2)
    assert prepared.plan.manifest_version == store.etag("manifest.parquet")
    store.put("manifest.parquet", Path(write_manifest(tiny_rows(5, prefix="v2"), name="v2.parquet")).read_bytes())

    with pytest.raises(UserError, match=r"manifest\.parquet changed while this job was reading it \(ETag no longer"):
        run_job(prepared.plan, prepared.store, RunOptions(show_progress=False))
    assert s3_images(s3_bucket) == {}  # nothing of the other version was rendered
