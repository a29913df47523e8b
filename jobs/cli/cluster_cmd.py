"""Commands for jobs on a Ray cluster (Ray Jobs API): logs, cancel, jobs."""

import click

address_option = click.option(
    "--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)."
)


@click.command()
@click.argument("job_id")
@address_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
def logs(job_id, address, follow):
    """Print the logs of the Ray job JOB_ID (the id `submit` printed)."""
    from jobs.cluster_jobs import client_for

    client = client_for(address)
    if not follow:
        click.echo(client.get_job_logs(job_id), nl=False)
        return 0
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            click.echo(lines, nl=False)

    asyncio.run(tail())
    return 0


@click.command()
@click.argument("job_id")
@address_option
def cancel(job_id, address):
    """Stop the Ray job JOB_ID. Stored rows stay; submitting the same job again resumes it."""
    from jobs.cluster_jobs import client_for

    client = client_for(address)
    stopped = client.stop_job(job_id)
    click.echo(f"{job_id}: {'stop requested' if stopped else 'already finished'}; "
               "stored rows stay, submit the same manifest and output again to resume")
    return 0


@click.command(name="jobs")
@address_option
def jobs_list(address):
    """List the qwen-batch jobs the Ray cluster knows, newest first."""
    from jobs.cluster_jobs import METADATA_KEY, client_for

    client = client_for(address)
    found = [j for j in client.list_jobs() if METADATA_KEY in (j.metadata or {})]
    found.sort(key=lambda j: j.start_time or 0, reverse=True)
    if not found:
        click.echo("no qwen-batch jobs on this cluster")
    for job in found:
        meta = job.metadata
        click.echo(f"{job.submission_id:<22} {job.status.value:<10} {meta.get('model', ''):<16} {meta.get('output', '')}")
    return 0
