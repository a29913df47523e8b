import os

import click

from jobs.cli.options import BatchSize, WorkerCount, model_option, render_options, templates_option


@click.command()
@click.argument("manifest")
@click.option("--output", "-o", required=True, help="Destination: a local directory or s3://bucket/prefix.")
@model_option
@click.option("--workers", type=WorkerCount(),
              help="N: exactly N workers; MIN-MAX: up to MAX, rendering starts once MIN are ready; auto (the default on "
                   "a cluster): up to 64, as many as the job's shards can use. On a cluster the workers Ray cannot place "
                   "yet wait for the autoscaler to add nodes. Without a cluster: one per GPU (1 CPU worker without GPUs).")
@click.option("--first-worker-timeout", default=1800.0, show_default=True, type=click.FloatRange(min=1), metavar="SECONDS",
              help="End the job (exit 4) when no worker is ready after this long (e.g. the autoscaler adds no GPU node).")
@click.option("--shard-size", default=32, show_default=True, type=click.IntRange(min=1), help="Rows per shard (unit of work handed to a worker).")
@click.option("--batch-size", default="auto", show_default=True, type=BatchSize(),
              help="Images of one shape per pipeline call; auto: what each worker's GPU memory fits (4 on CPU).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Job seed: rows without a `seed` get one derived from (job seed, id).")
@click.option("--max-attempts", default=3, show_default=True, type=click.IntRange(1, 20), help="Attempts per row before it is marked failed.")
@click.option("--overwrite", is_flag=True, help="Replace images already stored at the same keys.")
@click.option("--resume-anyway", is_flag=True, help="Continue into an output that holds another job, keeping its stored images.")
@click.option("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS; none: local single-node mode).")
@click.option("--model-dir", default=None, help="Local directory with the model files (air-gapped clusters).")
@click.option("--offload", default="auto", show_default=True, help="CPU offload plan: auto|none|model|blocks:N.")
@click.option("--device", default="auto", show_default=True, help="auto|cuda|cpu: cpu renders a real model on CPU workers (very slow).")
@click.option("--wait", is_flag=True, help="With a Ray Jobs address (http://head:8265): follow the job until it ends.")
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
@click.option("--shared-fs", is_flag=True,
              help="A local --output is on a filesystem every cluster node mounts at the same path.")
@click.option("--forward-env", multiple=True, metavar="NAME",
              help="With a Ray Jobs address: send this (non-secret) environment variable to the job; "
                   "by default the cluster's own settings apply. Repeatable.")
@templates_option
@render_options
@click.option("--png-compression", type=click.IntRange(0, 9), default=1, show_default=True,
              help="zlib level of PNG images: 1 is fast; 6-9 write ~10 % smaller files, several times slower.")
@click.option("--check-text", is_flag=True,
              help="Read back each image's text (OCR) and score it against the row's `text` or its prompt's quoted strings.")
@click.option("--min-text-score", type=click.FloatRange(0, 1), default=None,
              help="With --check-text: render an image again (next seed) when its text scores below this.")
@click.option("--max-rerolls", type=click.IntRange(0, 10), default=0, show_default=True,
              help="With --min-text-score: at most this many re-renders per image; the best one is stored.")
@click.option("--keep-rerolls", is_flag=True, help="Keep the images that lost to a re-roll under rerolls/ in the output.")
def submit(manifest, output, model, workers, first_worker_timeout, shard_size, batch_size, seed, max_attempts, overwrite,
           resume_anyway, address, model_dir, offload, device, wait, no_progress, shared_fs, forward_env, template_dirs,
           lora, speed, lightning_lora, png_compression, check_text, min_text_score, max_rerolls, keep_rerolls):
    """Render every row of MANIFEST into --output, each image exactly once.

    Without --address or RAY_ADDRESS it runs in the foreground on a local Ray instance. With a
    cluster's GCS or client address (host:6379, ray://head:10001, auto) it drives the job from here;
    with its dashboard address (http://head:8265) it submits a Ray job that runs on the cluster.
    Running the same command again resumes: rows already stored are not rendered again.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    render = dict(lora=tuple(lora), speed=speed, lightning_lora=lightning_lora, png_compression=png_compression,
                  check_text=check_text, min_text_score=min_text_score, max_rerolls=max_rerolls, keep_rerolls=keep_rerolls)
    echo = lambda text: click.echo(text, err=True)  # noqa: E731
    from jobs.cluster_jobs import is_jobs_api_address

    if forward_env and not is_jobs_api_address(address):
        raise click.UsageError("--forward-env only applies with a Ray Jobs address (--address http://head:8265)")
    if is_jobs_api_address(address):
        from jobs.cluster_jobs import submit_to_cluster

        return submit_to_cluster(
            manifest, output, address=address, model=model, seed=seed, shard_size=shard_size, workers=workers,
            batch_size=batch_size, max_attempts=max_attempts, overwrite=overwrite, resume_anyway=resume_anyway,
            template_dirs=template_dirs, model_dir=model_dir, offload=offload, device=device, wait=wait, echo=echo,
            shared_fs=shared_fs, forward_env=forward_env, first_worker_timeout_s=first_worker_timeout, **render,
        )
    from jobs.submit_api import submit_job

    outcome = submit_job(
        manifest, output, model=model, seed=seed, shard_size=shard_size, workers=workers, batch_size=batch_size,
        max_attempts=max_attempts, overwrite=overwrite, resume_anyway=resume_anyway,
        address=address, show_progress=not no_progress,
        template_dirs=template_dirs, model_dir=model_dir, offload=offload, device=device, echo=echo,
        shared_fs=shared_fs, first_worker_timeout_s=first_worker_timeout, **render,
    )
    click.echo(
        f"job {outcome.job_id}: {outcome.done}/{outcome.total} rows stored "
        f"({outcome.rendered} rendered now, {outcome.skipped} already done), {outcome.failed} failed"
    )
    click.echo(f"images: {outcome.output.rstrip('/')}/images/   gallery: {outcome.output.rstrip('/')}/report.html")
    if outcome.not_ready or outcome.quarantined:
        click.echo(f"{len(outcome.not_ready)} worker(s) were not ready and {len(outcome.quarantined)} quarantined "
                   f"(see above; job.json lists them)", err=True)
    if outcome.failed:
        shown = ", ".join(outcome.failed_ids[:10]) + (" …" if len(outcome.failed_ids) > 10 else "")
        click.echo(
            f"{outcome.failed} row(s) failed ({shown}); errors are in {outcome.output.rstrip('/')}/results.parquet "
            f"— see `qwen-batch status {outcome.output} --failed`; run the same submit again to retry them",
            err=True,
        )
    return outcome.exit_code
