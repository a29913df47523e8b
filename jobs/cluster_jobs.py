"""Cluster mode through the Ray Jobs API: submit a job whose entrypoint is `qwen-batch submit`
running on the cluster, follow it, list, cancel and read logs.

The job is validated and its output claimed here first (so mistakes fail fast, on this machine),
then the cluster runs the same runner against the same output: a resume of the same job id.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from urllib.parse import urlsplit

from qwen_worker.errors import QwenBatchError, UserError

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
METADATA_KEY = "qwen_batch_job"
# Non-secret settings the cluster-side driver needs; credentials come from the cluster's own
# environment (instance roles, Kubernetes Secrets), never from here.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "HF_HOME")
JOB_ID_PATTERN = re.compile(r"qb-[0-9a-f]{12}(-\d+)?")


def is_jobs_api_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if not is_jobs_api_address(address):
        raise UserError(f"the Ray Jobs API needs the dashboard address (http://head:8265), got: {address!r}")
    return address


def client_for(address: str | None):
    """A JobSubmissionClient (token auth through Ray's own RAY_AUTH_TOKEN variables)."""
    from ray.job_submission import JobSubmissionClient

    address = dashboard_address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or a RuntimeError wrapping it
        raise UserError(f"cannot reach the Ray dashboard at {address}: {str(exc).splitlines()[0]}") from None


def _is_local(address: str) -> bool:
    return urlsplit(address).hostname in ("127.0.0.1", "localhost", "::1")


def entrypoint_for(plan, *, workers, batch_size, max_attempts, overwrite, template_dirs, model_dir, offload,
                   device="auto") -> str:
    args = ["qwen-batch", "submit", plan.manifest, "--output", plan.output, "--model", plan.model,
            "--seed", str(plan.seed), "--shard-size", str(plan.shard_size), "--batch-size", str(batch_size or "auto"),
            "--max-attempts", str(max_attempts), "--offload", offload, "--device", device, "--no-progress"]
    if workers:
        args += ["--workers", str(workers)]
    if overwrite:
        args.append("--overwrite")
    if model_dir:
        args += ["--model-dir", model_dir]
    for directory in template_dirs:
        args += ["--templates", directory]
    return shlex.join(args)


def submit_to_cluster(manifest: str, output: str, *, address: str, model: str = "qwen-image-df11", seed: int = 0,
                      shard_size: int = 32, workers=None, batch_size: int = 4, max_attempts: int = 3,
                      overwrite: bool = False, resume_anyway: bool = False, template_dirs=(), model_dir=None,
                      offload: str = "auto", wait: bool = False, echo=print, device: str = "auto") -> int:
    from jobs.submit_api import prepare_job
    from qwen_worker.loading import check_device_options

    check_device_options(device, offload)
    client = client_for(address)
    if not output.startswith("s3://") and not _is_local(address):
        raise UserError(
            f"the cluster at {address} cannot write to the local directory {output}: use --output s3://bucket/prefix"
        )
    prepared = prepare_job(manifest, output, model=model, seed=seed, shard_size=shard_size, overwrite=overwrite,
                           resume_anyway=resume_anyway, template_dirs=tuple(template_dirs),
                           options={"batch_size": batch_size, "max_attempts": max_attempts, "offload": offload})
    plan = prepared.plan
    previous = [j for j in client.list_jobs() if (j.metadata or {}).get(METADATA_KEY) == plan.job_id]
    active = [j for j in previous if not j.status.is_terminal()]
    if active:
        submission_id = active[0].submission_id
        echo(f"job {plan.job_id} is already running on {address} as Ray job {submission_id} "
             f"({active[0].status.value}): not submitting it twice")
    else:
        submission_id = plan.job_id if not previous else f"{plan.job_id}-{len(previous) + 1}"
        entrypoint = entrypoint_for(plan, workers=workers, batch_size=batch_size, max_attempts=max_attempts,
                                    overwrite=overwrite, template_dirs=template_dirs, model_dir=model_dir,
                                    offload=offload, device=device)
        env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        try:
            _submit_when_agent_ready(
                client,
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env={"env_vars": env} if env else None,
                metadata={METADATA_KEY: plan.job_id, "manifest": plan.manifest_source, "output": plan.output,
                          "model": plan.model},
            )
        except Exception as exc:
            if "already exists" in str(exc):  # another submit won the race for this id
                echo(f"job {plan.job_id} was just submitted by someone else as Ray job {submission_id}: not submitting it twice")
            else:
                raise QwenBatchError(f"the cluster refused the job: {str(exc).splitlines()[0]}") from None
        else:
            echo(f"submitted job {plan.job_id} ({plan.rows} rows) to {address} as Ray job {submission_id}")
    echo(f"follow it: qwen-batch logs {submission_id} --follow --address {address}   |   "
         f"qwen-batch status {plan.output}")
    if not wait:
        return 0
    return follow(client, submission_id, prepared.store, plan, echo)


def _submit_when_agent_ready(client, *, wait_s: float = 90.0, **job) -> None:
    """submit_job, waiting while the head's job agent is still starting (a fresh cluster answers
    'No available agent to submit job' for a while)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.submit_job(**job)
            return
        except Exception as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow(client, submission_id: str, store, plan, echo, *, poll_s: float = 2.0) -> int:
    """Show the job's progress (from the output's _progress.json) until it ends; return the exit
    code local mode would have returned."""
    import json

    from jobs.progress import PROGRESS_KEY, ProgressBar
    from jobs.status import job_status

    bar = ProgressBar(plan.rows, enabled=True)
    while True:
        status = client.get_job_status(submission_id)
        try:
            live = json.loads(store.get(PROGRESS_KEY))
            if live.get("job_id") == plan.job_id:
                bar.update(done=live["done"] - bar.done, failed=live["failed"] - bar.failed)
        except (KeyError, ValueError):
            pass
        if status.is_terminal():
            break
        time.sleep(poll_s)
    bar.close()
    report = job_status(plan.output)
    echo(f"Ray job {submission_id}: {status.value}; {report['done']}/{report['total']} rows stored, "
         f"{report['failed']} failed, {report['pending']} pending")
    if report["pending"] == 0:
        return 0 if report["failed"] == 0 else 3
    if status.value == "FAILED":
        tail = client.get_job_logs(submission_id).strip().splitlines()[-10:]
        echo("last log lines:\n  " + "\n  ".join(tail))
    return 4


def cluster_job_output(submission_id: str, address: str | None) -> tuple[str, str]:
    """(output URI, Ray job status) of a qwen-batch job on the cluster."""
    client = client_for(address)
    try:
        info = client.get_job_info(submission_id)
    except Exception:
        raise UserError(f"no job {submission_id!r} on the Ray cluster at {dashboard_address(address)}") from None
    output = (info.metadata or {}).get("output")
    if not output:
        raise UserError(f"Ray job {submission_id!r} is not a qwen-batch job")
    return output, info.status.value
