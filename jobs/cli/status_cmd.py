import json

import click

from jobs.cli.options import json_option


@click.command()
@click.argument("dest")
@json_option
@click.option("--failed", "show_failed", is_flag=True, help="List failed rows with their errors.")
@click.option("--address", default=None, help="Ray dashboard address, when DEST is a cluster job id.")
def status(dest, as_json, show_failed, address):
    """Total / done / failed / pending rows of a job, read from its output DEST (no Ray needed),
    or from the output of the cluster job with id DEST."""
    import os

    from jobs.cluster_jobs import JOB_ID_PATTERN, cluster_job_output
    from jobs.status import job_status

    ray_status = None
    if JOB_ID_PATTERN.fullmatch(dest) and not os.path.exists(dest):
        dest, ray_status = cluster_job_output(dest, address)
    report = job_status(dest)
    if ray_status:
        report["ray_job_status"] = ray_status
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    click.echo(
        f"job {report['job_id']} ({report['model']}) in {report['output']}: "
        f"{report['done']}/{report['total']} done, {report['failed']} failed, {report['pending']} pending"
    )
    if ray_status:
        click.echo(f"  Ray job: {ray_status}")
    live = report["live"]
    if live and live["state"] == "running":
        from jobs.progress import format_duration

        eta = format_duration(live["eta_s"]) if live["eta_s"] is not None else "unknown"
        click.echo(
            f"  running: {live['done'] + live['failed']}/{live['total']} rows settled at {live['rows_per_s']:.2f} rows/s, "
            f"ETA {eta} (updated {live['updated']})"
        )
        if live.get("workers"):
            from jobs.pool import pool_line

            click.echo(f"  workers: {pool_line(live['workers'])}")
    if show_failed:
        for row in report["failed_rows"]:
            click.echo(f"  row {row['row_index']} (id {row['id']!r}): {row['error']}")
    return 0
