"""A real multi-node Ray cluster on one machine (`ray start` processes, each node with its own
environment), SeaweedFS as S3, the tiny model, and `qwen-batch submit --address <gcs>`: one node
without S3 credentials, a node lost mid-job, a node whose credentials expire mid-job."""

import io
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from helpers import tiny_rows
from ray_cluster import RayCluster, without_credentials


@pytest.fixture(scope="module")
def s3_node_env(s3_server):
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
               AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, HF_HUB_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # qwen-batch on every node
    env.pop("AWS_PROFILE", None)
    return env


@pytest.fixture(scope="module")
def cluster(s3_node_env):
    """head (no worker capacity) + a healthy node + a node without S3 credentials."""
    cluster = RayCluster(env=s3_node_env).start()
    try:
        cluster.add_node("good-1", num_cpus=1)
        cluster.add_node("nocreds", num_cpus=1, env=without_credentials(s3_node_env))
        yield cluster
    finally:
        cluster.shutdown()


def submit(cluster, env, manifest, output, *args):
    command = [sys.executable, "-m", "jobs", "submit", manifest, "--output", output, "--model", "tiny",
               "--address", cluster.gcs_address, "--no-progress", *args]
    return subprocess.Popen(command, env={**env, "AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stored_images(s3_server, uri):
    bucket, prefix = uri[5:].split("/", 1)
    client = s3_server.client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/images/"):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def results_and_job(s3_server, uri):
    bucket, prefix = uri[5:].split("/", 1)
    client = s3_server.client()
    results = pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=f"{prefix}/results.parquet")["Body"].read()))
    job = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/job.json")["Body"].read())
    return results, job


def wait_for_images(s3_server, uri, count, process, timeout=180):
    deadline = time.monotonic() + timeout
    while len(stored_images(s3_server, uri)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no images in time"
        time.sleep(0.2)


@pytest.fixture
def driver_env(cluster, s3_node_env, s3_bucket, s3_server):
    """A user's shell on another machine: S3 settings, and the cluster's token (no RAY_AUTH_MODE)."""
    env = {**s3_node_env, "AWS_ENDPOINT_URL": s3_server.endpoint, "RAY_AUTH_TOKEN": cluster.token}
    env.pop("RAY_AUTH_MODE", None)
    return env


def test_a_node_without_s3_credentials_gets_no_work_and_no_row_fails(cluster, driver_env, s3_server, s3_bucket,
                                                                       write_manifest):
    rows = tiny_rows(24)
    process = submit(cluster, driver_env, write_manifest(rows), s3_bucket, "--workers", "2", "--shard-size", "2")
    _out, err = process.communicate(timeout=300)

    assert process.returncode == 0, err
    [line] = [line for line in err.splitlines() if "is not ready" in line]
    assert "gets no work: no S3 credentials on node" in line and f"for {s3_bucket}" in line
    assert "Traceback" not in err
    results, job = results_and_job(s3_server, s3_bucket)
    assert results.column("status").to_pylist() == ["done"] * 24
    assert len(set(results.column("worker").to_pylist())) == 1  # all on the healthy node's worker
    assert sorted(stored_images(s3_server, s3_bucket)) == sorted(f"out/images/{r['id']}.png" for r in rows)
    [not_ready] = [w for w in job["options"]["workers"] if w["state"] == "not ready"]
    assert "no S3 credentials on node" in not_ready["problem"] and not_ready["node_ip"]


def test_a_node_lost_mid_job_loses_no_row_and_stores_each_image_once(cluster, driver_env, s3_server, s3_bucket,
                                                                      write_manifest):
    cluster.add_node("good-2", num_cpus=1)
    rows = tiny_rows(40, size=128)
    process = submit(cluster, driver_env, write_manifest(rows), s3_bucket, "--workers", "3", "--shard-size", "4",
                     "--batch-size", "1")
    wait_for_images(s3_server, s3_bucket, 5, process)
    cluster.kill_node("good-2")
    _out, err = process.communicate(timeout=300)

    assert process.returncode == 0, err
    results, _job = results_and_job(s3_server, s3_bucket)
    assert results.column("status").to_pylist() == ["done"] * 40
    keys = stored_images(s3_server, s3_bucket)
    assert len(keys) == len(set(keys)) == 40


def test_a_worker_whose_credentials_expire_mid_job_is_quarantined(cluster, driver_env, s3_server, s3_bucket,
                                                                  write_manifest, tmp_path):
    revoked, calls = tmp_path / "revoked", tmp_path / "calls"
    process_script = tmp_path / "credentials.py"
    process_script.write_text(
        "import datetime, json, os, sys\n"
        f"if os.path.exists({str(revoked)!r}):\n"
        "    sys.exit('credentials revoked')\n"
        f"open({str(calls)!r}, 'a').write('.')\n"
        "expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)\n"  # always refreshed
        f"print(json.dumps({{'Version': 1, 'AccessKeyId': {s3_server.access_key!r}, "
        f"'SecretAccessKey': {s3_server.secret_key!r}, 'Expiration': expires.isoformat()}}))\n")
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {process_script}\n")
    node_env = {**without_credentials(driver_env), "AWS_CONFIG_FILE": str(config)}
    cluster.add_node("expiring", num_cpus=1, env=node_env)
    try:
        rows = tiny_rows(80, size=48)
        process = submit(cluster, driver_env, write_manifest(rows), s3_bucket, "--workers", "3", "--shard-size", "2",
                         "--batch-size", "1")
        wait_for_images(s3_server, s3_bucket, 2, process)
        deadline = time.monotonic() + 120
        while not calls.exists() or len(calls.read_text()) < 12:  # that node's worker is ready and has stored
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        revoked.touch()  # the session or role behind that node's credentials ends
        _out, err = process.communicate(timeout=300)
    finally:
        cluster.stop_node("expiring")

    assert process.returncode == 0, err
    quarantined = [line for line in err.splitlines() if "is quarantined for the rest of the job" in line]
    assert len(quarantined) == 1 and "3 worker errors in a row" in quarantined[0], err
    assert "credentials could not be fetched" in quarantined[0]
    results, job = results_and_job(s3_server, s3_bucket)
    assert results.column("status").to_pylist() == ["done"] * 80  # a credential error never fails a row
    assert "quarantined" in {w["state"] for w in job["options"]["workers"]}
    keys = stored_images(s3_server, s3_bucket)
    assert len(keys) == len(set(keys)) == 80


def qwen_batch(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jobs", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_jobs_api_path_works_against_ray_start_with_token_auth(cluster, driver_env, s3_server, s3_bucket,
                                                                  write_manifest, tmp_path):
    """The README's cluster commands, as written, against a `ray start --head` cluster (token auth
    on, the token in RAY_AUTH_TOKEN), with a --templates dir that only this machine has."""
    templates = tmp_path / "my-templates"
    templates.mkdir()
    (templates / "sale-banner.yaml").write_text(
        "name: sale-banner\ndescription: A sale banner.\nlanguage: en\naspect_ratio: '1:1'\nnegative_prompt: ' '\n"
        "params:\n  text:\n    description: Banner text.\n    required: true\n    example: SALE\n"
        "prompt: 'A shop banner with the text {{ text | quoted }}'\n")
    rows = [{"id": f"banner-{n}", "template": "sale-banner", "params": json.dumps({"text": f"-{n}0%"}),
             "width": 32, "height": 32, "steps": 2} for n in range(4)] + tiny_rows(4)
    manifest = write_manifest(rows)
    address = cluster.dashboard

    submitted = qwen_batch(driver_env, "submit", manifest, "--output", s3_bucket, "--model", "tiny", "--address",
                           address, "--templates", str(templates), "--forward-env", "AWS_ENDPOINT_URL", "--wait",
                           "--workers", "2")  # one per node: one of them lacks S3 credentials

    assert submitted.returncode == 0, submitted.stderr
    assert "8/8 rows stored, 0 failed, 0 pending" in submitted.stderr
    assert "INFO" not in submitted.stderr
    job_id = submitted.stderr.split("submitted job ")[1].split()[0]
    status = qwen_batch(driver_env, "status", job_id, "--address", address)
    assert status.returncode == 0 and "8/8 done" in status.stdout and "Ray job: SUCCEEDED" in status.stdout
    listed = qwen_batch(driver_env, "jobs", "--address", address)
    assert job_id in listed.stdout and s3_bucket in listed.stdout
    logs = qwen_batch(driver_env, "logs", job_id, "--address", address)
    assert f"job {job_id}: 8/8 rows stored" in logs.stdout
    results, _job = results_and_job(s3_server, s3_bucket)
    prompts = dict(zip(results.column("id").to_pylist(), results.column("prompt").to_pylist()))
    assert prompts["banner-2"].startswith('A shop banner with the text "-20%"')  # the shipped template


def test_a_missing_or_wrong_ray_token_is_one_line_saying_what_to_set(cluster, driver_env, tmp_path):
    env = {k: v for k, v in driver_env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    for extra, wording in (({}, "no token was found here"), ({"RAY_AUTH_TOKEN": "0" * 64}, "refused the authentication token")):
        listed = qwen_batch({**env, **extra}, "jobs", "--address", cluster.dashboard, timeout=60)
        assert listed.returncode == 1, listed.stderr
        assert listed.stderr.startswith(f"error: the Ray cluster at {cluster.dashboard} ")
        assert wording in listed.stderr and "RAY_AUTH_TOKEN" in listed.stderr
        assert len(listed.stderr.strip().splitlines()) == 1 and "Traceback" not in listed.stderr


def test_a_local_output_dir_is_refused_for_a_cluster_on_other_machines_before_anything_is_written(
        cluster, driver_env, write_manifest, tmp_path):
    """A port-forwarded `localhost:8265` whose nodes are elsewhere: here every node is on this
    machine, so the check is shown on a cluster whose node addresses are not ours."""
    from jobs.cluster_jobs import check_output_reachable
    from qwen_worker.errors import UserError

    output = tmp_path / "out"
    with pytest.raises(UserError, match=r"has nodes on other machines \(10\.0\.3\.7\).* --shared-fs"):
        check_output_reachable(str(output), ["10.0.3.7", "127.0.0.1"], shared_fs=False, address="http://localhost:8265")
    check_output_reachable(str(output), ["10.0.3.7"], shared_fs=True, address="http://localhost:8265")
    check_output_reachable(str(output), cluster.node_ips(), shared_fs=False, address=cluster.dashboard)
    assert not output.exists()
