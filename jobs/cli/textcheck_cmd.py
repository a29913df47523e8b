import click


@click.command("text-check")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--expect", "expect", multiple=True, metavar="TEXT",
              help="A string every image should show (repeatable). Without it: each output row's `text` or its "
                   "prompt's quoted strings, or an image's embedded prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (one object per image) instead of lines.")
def text_check(paths, expect, as_json):
    """OCR existing images and score the text they show (1 - character error rate; 1 = exact).

    PATH is an image file, an s3://bucket/key image, or a job's output (a directory or s3:// prefix
    holding results.parquet: every done row's images, against that row's expected text).
    One line per image: SCORE PATH read: '...' missing: [...].
    """
    import json

    from jobs.textcheck import iter_checks, resolve_targets

    targets = resolve_targets(list(paths), list(expect))
    records = []
    for target, check in iter_checks(targets):
        if as_json:
            record = {"path": target.label}
            if target.id is not None:
                record["id"] = target.id
            record.update(check.to_dict())
            records.append(record)
        else:
            score = "-" if check.score is None else f"{check.score:.3f}"
            click.echo(f"{score} {target.label} read: {check.read!r} missing: {check.missing!r}")
    if as_json:
        click.echo(json.dumps(records, ensure_ascii=False, indent=2))
    if targets.skipped:
        click.echo(f"{targets.skipped} image(s) of rows expecting no text were not checked", err=True)
    return 0
