import click


@click.command()
@click.argument("dest")
@click.option(
    "--link",
    type=click.Choice(["relative", "presigned"]),
    default="relative",
    show_default=True,
    help="How images are linked: relative to report.html (it sits beside them), or presigned URLs (s3:// only; "
         "they carry credential material and expire).",
)
@click.option(
    "--expires",
    type=int,
    default=7 * 24 * 3600,
    show_default=True,
    help="Seconds presigned image links stay valid (at most 604800, 7 days).",
)
@click.option(
    "--max-cards",
    type=int,
    default=None,
    help="Show at most this many rows as cards (failed rows first); totals always count every row.",
)
def report(dest, link, expires, max_cards):
    """Write DEST/report.html: a self-contained gallery of the job's rows (from job.json + results.parquet)."""
    from jobs.report import DEFAULT_MAX_CARDS, write_report
    from qwen_worker.stores import open_store

    store = open_store(dest)
    cards = DEFAULT_MAX_CARDS if max_cards is None else max_cards
    key = write_report(store, link=link, expires=expires, max_cards=cards)
    location = f"{store.uri.rstrip('/')}/{key}"
    click.echo(f"wrote {location}")
    presign = getattr(store, "presigned_url", None)
    if presign is not None and link == "presigned":
        click.echo(f"open it at {presign(key, expires=expires)}")
    return 0
