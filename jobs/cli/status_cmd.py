import json

import click

from jobs.cli.options import json_option


@click.command()
@click.argument("dest")
@json_option
@click.option("--failed", "show_failed", is_flag=True, help="List failed rows with their errors.")
def status(dest, as_json, show_failed):
    """Total / done / failed / pending rows of the job stored in DEST (read from its ledger, no Ray)."""
    from jobs.status import job_status

    report = job_status(dest)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    click.echo(
        f"job {report['job_id']} ({report['model']}) in {report['output']}: "
        f"{report['done']}/{report['total']} done, {report['failed']} failed, {report['pending']} pending"
    )
    if show_failed:
        for row in report["failed_rows"]:
            click.echo(f"  row {row['row_index']} (id {row['id']!r}): {row['error']}")
    return 0
