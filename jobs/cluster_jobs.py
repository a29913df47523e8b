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

from qwen_worker.errors import JobBusyError, QwenBatchError, UserError

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
METADATA_KEY = "qwen_batch_job"
# The cluster's nodes bring their own settings (HF_HOME, HF_HUB_OFFLINE, AWS_ENDPOINT_URL, ...) and
# credentials (instance roles, Kubernetes Secrets); `--forward-env NAME` sends a setting from here,
# but never one that looks like a secret.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|SESSION|CREDENTIAL|ACCESS_KEY|PRIVATE", re.IGNORECASE)
JOB_ID_PATTERN = re.compile(r"qb-[0-9a-f]{12}(-\d+)?")
SHIPPED_TEMPLATES = "qb-templates-{n}"  # where --templates DIR n lands in the Ray job's working dir


def is_jobs_api_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if not is_jobs_api_address(address):
        raise UserError(f"the Ray Jobs API needs the dashboard address (http://head:8265), got: {address!r}")
    return address


def client_for(address: str | None):
    """A JobSubmissionClient that sends the cluster's auth token the way Ray's own tools find it
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), whatever RAY_AUTH_MODE says."""
    from ray.job_submission import JobSubmissionClient

    from jobs.ray_auth import auth_headers, auth_problem

    address = dashboard_address(address)
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # AuthenticationError, ConnectionError, or a RuntimeError wrapping it
        problem = auth_problem(exc, address)
        if problem is not None:
            raise problem from None
        raise UserError(f"cannot reach the Ray dashboard at {address}: {str(exc).splitlines()[0]}") from None


def forwarded_env(names) -> dict:
    """The `--forward-env` variables' values from here (UserError for a secret or an unset name)."""
    env = {}
    for name in names:
        if SECRET_NAME.search(name):
            raise UserError(f"`--forward-env` does not send secrets, got: {name!r} (credentials come from the "
                            "cluster's own environment: instance or pod roles, Kubernetes Secrets)")
        if name not in os.environ:
            raise UserError(f"`--forward-env` names a variable that is not set here, got: {name!r}")
        env[name] = os.environ[name]
    return env


def local_addresses() -> set[str]:
    """IP addresses of this machine (loopback, every interface, the host name's)."""
    import socket

    found = {"127.0.0.1", "::1"}
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            found.update(a.address.split("%")[0] for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6))
    except Exception:
        pass
    try:
        found.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return found


def dashboard_node_ips(address: str) -> list[str]:
    """IPs of the live nodes of the cluster behind a dashboard address (its state API)."""
    import json
    import urllib.request

    from jobs.ray_auth import auth_headers

    request = urllib.request.Request(f"{address.rstrip('/')}/api/v0/nodes?limit=10000&detail=false", headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            nodes = json.loads(response.read())["data"]["result"]["result"]
    except Exception as exc:
        raise UserError(f"cannot list the nodes of the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    return sorted({n["node_ip"] for n in nodes if n.get("state") == "ALIVE"})


def check_output_reachable(output: str, node_ips, *, shared_fs: bool, address: str) -> None:
    """A local output directory is only usable by a cluster whose nodes are all this machine (a
    port-forwarded `localhost:8265` is not), unless the user says it is a shared filesystem."""
    if output.startswith("s3://") or shared_fs:
        return
    remote = sorted(set(node_ips) - local_addresses())
    if remote:
        shown = ", ".join(remote[:5]) + (" …" if len(remote) > 5 else "")
        raise UserError(
            f"the Ray cluster at {address} has nodes on other machines ({shown}), which cannot write to the local "
            f"directory {output}: use --output s3://bucket/prefix, or pass --shared-fs if {output} is on a "
            "filesystem every node mounts at the same path"
        )


def ship_templates(template_dirs) -> tuple[str | None, list[str]]:
    """A temporary Ray job working dir holding a copy of each --templates DIR (Ray uploads it to the
    cluster), and the paths the cluster-side submit reads them from."""
    if not template_dirs:
        return None, []
    import shutil
    import tempfile

    working_dir = tempfile.mkdtemp(prefix="qwen-batch-job-")
    shipped = []
    for n, directory in enumerate(template_dirs):
        name = SHIPPED_TEMPLATES.format(n=n)
        shutil.copytree(directory, os.path.join(working_dir, name),
                        ignore=lambda _d, names: [x for x in names if not x.endswith((".yaml", ".yml"))
                                                  and not os.path.isdir(os.path.join(_d, x))])
        shipped.append(name)
    return working_dir, shipped


def entrypoint_for(plan, *, workers, batch_size, max_attempts, overwrite, template_dirs, model_dir, offload,
                   device="auto", shared_fs=False, first_worker_timeout_s=None, render: dict | None = None) -> str:
    args = ["qwen-batch", "submit", plan.manifest, "--output", plan.output, "--model", plan.model,
            "--seed", str(plan.seed), "--shard-size", str(plan.shard_size), "--batch-size", str(batch_size or "auto"),
            "--max-attempts", str(max_attempts), "--offload", offload, "--device", device, "--no-progress"]
    if workers:
        args += ["--workers", str(workers)]
    if first_worker_timeout_s is not None:
        args += ["--first-worker-timeout", f"{first_worker_timeout_s:g}"]
    if overwrite:
        args.append("--overwrite")
    if model_dir:
        args += ["--model-dir", model_dir]
    if shared_fs:
        args.append("--shared-fs")
    for directory in template_dirs:
        args += ["--templates", directory]
    args += render_args(**(render or {}))
    return shlex.join(args)


def render_args(lora=(), speed="standard", lightning_lora=None, png_compression=1, check_text=False,
                min_text_score=None, max_rerolls=0, keep_rerolls=False) -> list[str]:
    """The submit options of LoRAs, speed, PNG compression and text checks, for the cluster's submit."""
    args = []
    for spec in lora:
        args += ["--lora", spec]
    if speed != "standard":
        args += ["--speed", speed]
    if lightning_lora:
        args += ["--lightning-lora", lightning_lora]
    args += ["--png-compression", str(png_compression)]
    if check_text:
        args.append("--check-text")
    if min_text_score is not None:
        args += ["--min-text-score", f"{min_text_score:g}"]
    if max_rerolls:
        args += ["--max-rerolls", str(max_rerolls)]
    if keep_rerolls:
        args.append("--keep-rerolls")
    return args


def submit_to_cluster(manifest: str, output: str, *, address: str, model: str = "qwen-image-df11", seed: int = 0,
                      shard_size: int = 32, workers=None, batch_size: int = 4, max_attempts: int = 3,
                      overwrite: bool = False, resume_anyway: bool = False, template_dirs=(), model_dir=None,
                      offload: str = "auto", wait: bool = False, echo=print, device: str = "auto",
                      shared_fs: bool = False, forward_env=(), first_worker_timeout_s: float | None = None,
                      **render) -> int:
    from jobs.pool import parse_workers
    from jobs.submit_api import prepare_job, text_check_options
    from qwen_worker.models.loading import check_device_options

    check_device_options(device, offload)
    text_check_options(render.get("check_text", False), render.get("min_text_score"), render.get("max_rerolls", 0),
                       render.get("keep_rerolls", False))
    workers = parse_workers(workers)
    env = forwarded_env(forward_env)
    client = client_for(address)
    if not output.startswith("s3://") and not shared_fs:
        check_output_reachable(output, dashboard_node_ips(address), shared_fs=shared_fs, address=address)
    prepared = prepare_job(manifest, output, model=model, seed=seed, shard_size=shard_size, overwrite=overwrite,
                           resume_anyway=resume_anyway, template_dirs=tuple(template_dirs),
                           options={"batch_size": batch_size, "max_attempts": max_attempts, "offload": offload},
                           allow_busy=True, model_dir=model_dir,
                           render={k: render[k] for k in ("lora", "speed", "lightning_lora") if k in render})
    plan = prepared.plan
    previous = [j for j in client.list_jobs() if (j.metadata or {}).get(METADATA_KEY) == plan.job_id]
    active = [j for j in previous if not j.status.is_terminal()]
    if prepared.busy and not active:  # a driver outside this cluster's Ray jobs holds the output
        raise JobBusyError(prepared.busy)
    if active:
        submission_id = active[0].submission_id
        echo(f"job {plan.job_id} is already running on {address} as Ray job {submission_id} "
             f"({active[0].status.value}): not submitting it twice")
    else:
        submission_id = plan.job_id if not previous else f"{plan.job_id}-{len(previous) + 1}"
        working_dir, shipped = ship_templates(template_dirs)
        entrypoint = entrypoint_for(plan, workers=workers, batch_size=batch_size, max_attempts=max_attempts,
                                    overwrite=overwrite, template_dirs=shipped, model_dir=model_dir,
                                    offload=offload, device=device, shared_fs=shared_fs,
                                    first_worker_timeout_s=first_worker_timeout_s, render=render)
        runtime_env = {**({"env_vars": env} if env else {}), **({"working_dir": working_dir} if working_dir else {})}
        import logging

        for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)  # no INFO lines about uploading the working dir
        try:
            _submit_when_agent_ready(
                client,
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env or None,
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
        finally:
            if working_dir:
                import shutil

                shutil.rmtree(working_dir, ignore_errors=True)
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
            if live.get("job_id") == plan.job_id:  # the driver's own counts, rows/s and ETA
                bar.show_remote(done=live["done"], failed=live["failed"], rows_per_s=live.get("rows_per_s"),
                                eta_s=live.get("eta_s"))
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
