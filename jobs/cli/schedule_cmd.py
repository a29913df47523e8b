"""`qwen-batch schedule next|run`: submit manifests on a cron schedule (see jobs.schedule)."""

from __future__ import annotations

from datetime import datetime, timezone

import click


@click.group("schedule")
def schedule():
    """Scheduled runs from a YAML schedule file (cron entries, time zones, catch-up)."""


def _parse_after(value):
    if value is None:
        return datetime.now(timezone.utc)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"expected an ISO date-time like 2026-03-08T06:00Z, got: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@schedule.command("next")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--count", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many runs to show.")
@click.option("--after", default=None, metavar="ISO-TIME", help="Start from this time (default: now; no zone = UTC).")
def next_cmd(file, count, after):
    """Show the next runs of the schedule FILE: entry, local time, UTC, manifest, output."""
    from jobs.schedule import load_schedule, next_runs

    plan = load_schedule(file)
    runs = next_runs(plan, _parse_after(after), count)
    rows = [("ENTRY", "LOCAL TIME", "UTC", "MANIFEST", "OUTPUT")]
    for run in runs:
        rows.append(
            (
                run.entry.name,
                f"{run.local_time:%Y-%m-%d %H:%M %Z} ({run.entry.timezone})",
                f"{run.fire_time:%Y-%m-%d %H:%MZ}",
                run.manifest,
                run.output,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


@schedule.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--state",
    required=True,
    metavar="DIR_OR_S3",
    help="Where claims and the last-checked time live (a directory or s3://bucket/prefix), shared by all schedulers of FILE.",
)
@click.option("--once", is_flag=True, help="Submit what is due now, then exit (for an external cron).")
def run_cmd(file, state, once):
    """Submit the runs of the schedule FILE when they are due, each exactly once."""
    import logging

    from jobs.schedule import Scheduler, check_submit_options, load_schedule, submit_planned_run
    from jobs.submit_api import submit_job
    from qwen_worker.stores import open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    plan = load_schedule(file)
    check_submit_options(plan, submit_job)
    state_store = open_store(state)
    state_store.check_writable()  # the same write check as an output, before the first claim
    scheduler = Scheduler(plan, submit_planned_run, state_store)
    if once:
        submitted = scheduler.run_once()
        click.echo(f"submitted {len(submitted)} run(s)" + "".join(f"\n  {r.run_id}" for r in submitted))
        return 0
    click.echo(f"scheduling {len(plan.entries)} entr{'y' if len(plan.entries) == 1 else 'ies'} of {file}; Ctrl-C to stop", err=True)
    scheduler.run_forever()
    return 0
