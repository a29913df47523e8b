"""Submitting a job from Python: validate, claim the output, run, merge results.

The CLI's `submit` and the scheduler both call `submit_job`; tests call `prepare_job` + `run_job`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from jobs.ledger import read_ledger
from jobs.manifest import ResolveContext, validate_manifest
from jobs.plan import JOB_RECORD_KEY, JobPlan, claim_job, file_sha256, make_job_id, manifest_copy_key, now_utc, versions
from jobs.report import write_report
from jobs.results import mark_results_current, results_current, write_results
from jobs.runner import JobOutcome, RunOptions, run_job
from qwen_worker.errors import JobBusyError, UserError
from qwen_worker.presets import get_preset
from qwen_worker.stores import Store, open_store

DEFAULT_SHARD_SIZE = 32


@dataclass
class PreparedJob:
    plan: JobPlan
    store: Store
    resumed: bool
    lease: object = None  # the DriverLease held on the output (hold_lease=True), released by the caller
    busy: str | None = None  # allow_busy: another driver runs this job now (what the lease says)


def output_key_uri(output: str, key: str) -> str:
    return f"{output.rstrip('/')}/{key}"


def prepare_job(
    manifest: str,
    output: str,
    *,
    model: str,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    resume_anyway: bool = False,
    template_dirs: tuple[str, ...] = (),
    options: dict | None = None,
    hold_lease: bool = False,
    allow_busy: bool = False,
    render: dict | None = None,
    model_dir: str | None = None,
) -> PreparedJob:
    """Validate the manifest (before anything is written or loaded), take the output's driver
    lease, then claim the output: a new job writes job.json and a copy of a local manifest; the
    same job again is a resume. With `hold_lease` the lease is kept (in PreparedJob.lease) for the
    run; otherwise it is released once the output is claimed. With `allow_busy`, a live driver of
    this same job is no error: the job as it stands is returned with `busy` saying who runs it.
    `render`: job-wide render options, part of the job's identity (`lora`: specs added to every
    row, `speed`, `lightning_lora`), see jobs.plan.render_options."""
    from jobs.lease import DriverLease
    from jobs.plan import render_options

    preset = get_preset(model)
    render = render_options(**(render or {}))
    context = ResolveContext(preset=preset, job_seed=seed, template_dirs=template_dirs,
                             job_loras=tuple(render.get("lora", ())), speed=render.get("speed", "standard"),
                             lightning_lora=render.get("lightning_lora"), model_dir=model_dir)
    summary = validate_manifest(manifest, context)
    store = open_store(output, overwrite=overwrite)
    store.check_writable()
    manifest_sha256 = file_sha256(manifest)
    in_place = manifest.startswith("s3://")
    job_id = make_job_id(manifest_sha256, model, seed, store.uri, summary.templates_used, render)
    try:
        lease = DriverLease(store, job_id, purpose="run" if hold_lease else "claim").acquire()
    except JobBusyError as busy:
        if not (allow_busy and busy.job_id == job_id):
            raise
        return PreparedJob(JobPlan.from_json(store.get(JOB_RECORD_KEY)), store, True, busy=str(busy))
    try:
        prepared = _claim(store, manifest, manifest_sha256, in_place, job_id, model, seed, summary.rows, shard_size,
                          options, overwrite=overwrite, resume_anyway=resume_anyway, templates=summary.templates_used,
                          render=render, input_base=context.base)
    except BaseException:
        lease.release()
        raise
    if hold_lease:
        prepared.lease = lease
    else:
        lease.release()
    return prepared


def _claim(store, manifest, manifest_sha256, in_place, job_id, model, seed, rows, shard_size, options, *,
           overwrite, resume_anyway, templates, render=None, input_base=None) -> PreparedJob:
    manifest_version = None
    if in_place:  # an s3:// manifest is read in place, pinned to this version for the whole job
        from jobs.s3_files import s3_object_version

        manifest_version = s3_object_version(manifest)
    plan = JobPlan(
        job_id=job_id,
        manifest=manifest if in_place else output_key_uri(store.uri, manifest_copy_key(manifest_sha256)),
        manifest_source=manifest,
        manifest_sha256=manifest_sha256,
        output=store.uri,
        model=model,
        seed=seed,
        rows=rows,
        shard_size=shard_size,
        options=dict(options or {}),
        versions=versions(),
        created=now_utc(),
        manifest_version=manifest_version,
        templates=dict(templates),
        render=dict(render or {}),
        input_base=input_base or "",
    )
    claimed = claim_job(store, plan, resume_anyway=resume_anyway, overwrite=overwrite)
    resumed = claimed is not plan
    if not in_place:  # named by its sha256: written once, never replaced
        copy_key = manifest_copy_key(manifest_sha256)
        if store.stored_sha256(copy_key) != manifest_sha256:
            with open(manifest, "rb") as f:
                store.put_new(copy_key, f.read())
    return PreparedJob(claimed, store, resumed)


def finish_job(prepared: PreparedJob, template_dirs=()) -> None:
    """Merge the ledger into results.parquet and report.html (also after a partial run: unfinished
    rows are 'pending'), unless they already merge the ledger as it is (a resume that settled nothing)."""
    store, plan = prepared.store, prepared.plan
    if results_current(store, plan):
        return
    write_results(store, plan, read_ledger(store, plan.job_id), template_dirs)
    write_report(store)
    mark_results_current(store, plan)


def check_local_gpu(preset, device: str) -> None:
    """In local mode, refuse a GPU model on a machine without CUDA before anything is written."""
    if not preset.needs_cuda or device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"model {preset.name!r} needs a CUDA GPU and this machine has none (run `qwen-batch doctor`; "
            "--device cpu renders it on the CPU, very slowly; --model tiny tries the pipeline)"
        )


def text_check_options(check_text: bool, min_text_score: float | None, max_rerolls: int,
                       keep_rerolls: bool) -> dict | None:
    """What workers get for --check-text (None: off); UserError for options that need it or are out of range."""
    if not check_text:
        if min_text_score is not None or max_rerolls or keep_rerolls:
            raise UserError("--min-text-score, --max-rerolls and --keep-rerolls need --check-text")
        return None
    if min_text_score is not None and not 0.0 <= min_text_score <= 1.0:
        raise UserError(f"`--min-text-score` must be between 0 and 1, got: {min_text_score}")
    if not 0 <= max_rerolls <= 10:
        raise UserError(f"`--max-rerolls` must be between 0 and 10, got: {max_rerolls}")
    if max_rerolls and min_text_score is None:
        raise UserError("--max-rerolls needs --min-text-score (the score below which an image is rendered again)")
    return {"min_score": min_text_score, "max_rerolls": max_rerolls, "keep_rerolls": keep_rerolls}


def submit_job(
    manifest: str,
    output: str,
    *,
    model: str = "qwen-image-df11",
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | str | None = None,
    batch_size: int = 4,
    max_attempts: int = 3,
    overwrite: bool = False,
    resume_anyway: bool = False,
    address: str | None = None,
    show_progress: bool = True,
    template_dirs: tuple[str, ...] = (),
    model_dir: str | None = None,
    offload: str = "auto",
    device: str = "auto",
    job_id: str | None = None,
    shared_fs: bool = False,
    first_worker_timeout_s: float = 1800.0,
    lora: tuple[str, ...] = (),
    speed: str = "standard",
    lightning_lora: str | None = None,
    png_compression: int = 1,
    check_text: bool = False,
    min_text_score: float | None = None,
    max_rerolls: int = 0,
    keep_rerolls: bool = False,
    affinity: bool = True,
    echo=None,
) -> JobOutcome:
    """Run a whole job in the foreground and return its outcome. With a cluster `address` (its GCS,
    host:6379 or ray://…) the driver runs here and the workers on the cluster; a local `output` is
    then refused unless every node is this machine or `shared_fs` says every node mounts it.
    `workers`: N, "MIN-MAX" or "auto" (jobs.pool.parse_workers); `first_worker_timeout_s`: the job
    ends (exit 4) when no worker is ready after that long. `lora`, `speed`, `lightning_lora`: job-wide
    LoRAs and speed preset (jobs.plan.render_options); `png_compression`: zlib level 0-9 of PNG
    images; `check_text` with `min_text_score` / `max_rerolls` / `keep_rerolls`: read back each
    image's text (OCR) and re-roll those below the score (qwen_worker.actor)."""
    echo = echo or (lambda text: print(text, file=sys.stderr))
    from jobs.pool import parse_workers
    from qwen_worker.models.loading import check_device_options

    check_device_options(device, offload)
    workers = parse_workers(workers)
    if address is None:
        check_local_gpu(get_preset(model), device)
    elif not output.startswith("s3://") and not shared_fs:
        import ray

        from jobs.cluster_jobs import check_output_reachable
        from jobs.runner import connect_ray

        connect_ray(address)  # before anything is written
        ips = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
        check_output_reachable(output, ips, shared_fs=shared_fs, address=address)
    text_check = text_check_options(check_text, min_text_score, max_rerolls, keep_rerolls)
    if not 0 <= png_compression <= 9:
        raise UserError(f"`--png-compression` must be between 0 and 9, got: {png_compression}")
    options = {"batch_size": batch_size or "auto", "max_attempts": max_attempts, "offload": offload, "device": device,
               "png_compression": png_compression, "check_text": text_check}
    if job_id:
        options["run_id"] = job_id
    prepared = prepare_job(
        manifest, output, model=model, seed=seed, shard_size=shard_size, overwrite=overwrite,
        resume_anyway=resume_anyway, template_dirs=template_dirs, options=options, hold_lease=True,
        render={"lora": lora, "speed": speed, "lightning_lora": lightning_lora}, model_dir=model_dir,
    )
    plan = prepared.plan
    verb = "resuming" if prepared.resumed else "starting"
    echo(f"{verb} job {plan.job_id}: {plan.rows} rows, model {plan.model}, output {plan.output}")
    run_options = RunOptions(
        workers=workers, batch_size=batch_size, max_attempts=max_attempts, overwrite=overwrite,
        model_dir=model_dir, offload=offload, device=device, show_progress=show_progress, template_dirs=template_dirs,
        new_output=not prepared.resumed, ready_timeout_s=first_worker_timeout_s, echo=echo,
        png_compression=png_compression, text_check=text_check, affinity=affinity,
    )
    try:  # under the output's driver lease: one driver per output at a time
        outcome = run_job(plan, prepared.store, run_options, address=address)
        if prepared.lease.lost:
            raise JobBusyError(f"another driver took over {plan.output} while this one ran (its lease had expired)")
        finish_job(prepared, template_dirs)
    finally:
        prepared.lease.release()
    return outcome
