"""`qwen-batch manifest from-csv|from-jsonl|sample`: make Parquet manifests."""

from __future__ import annotations

import click

from jobs.cli.options import templates_option

TEMPLATE_OPTION = click.option(
    "--template",
    "template",
    default=None,
    metavar="NAME",
    help="Every column that is not a manifest column becomes a param of this template.",
)


@click.group("manifest")
def manifest():
    """Make Parquet manifests from CSV / JSON Lines, or a sample one per template."""


def _convert(in_path, out_path, input_format, template, template_dirs):
    from jobs.manifest_tools import convert_to_manifest

    table = convert_to_manifest(
        in_path, out_path, input_format=input_format, template=template, template_dirs=template_dirs
    )
    click.echo(f"wrote {table.num_rows} row(s) to {out_path}")
    return 0


@manifest.command("from-csv")
@click.argument("in_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="OUT.parquet", type=click.Path(dir_okay=False))
@TEMPLATE_OPTION
@templates_option
def from_csv(in_path, out_path, template, template_dirs):
    """Convert a CSV file (header line, UTF-8) into a Parquet manifest."""
    return _convert(in_path, out_path, "csv", template, template_dirs)


@manifest.command("from-jsonl")
@click.argument("in_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="OUT.parquet", type=click.Path(dir_okay=False))
@TEMPLATE_OPTION
@templates_option
def from_jsonl(in_path, out_path, template, template_dirs):
    """Convert a JSON Lines file (one object per line) into a Parquet manifest."""
    return _convert(in_path, out_path, "jsonl", template, template_dirs)


@manifest.command("sample")
@click.argument("scenario")
@click.argument("out_path", metavar="OUT.parquet", type=click.Path(dir_okay=False))
@click.option("--rows", type=int, default=8, show_default=True, help="Number of rows.")
@templates_option
def sample(scenario, out_path, rows, template_dirs):
    """Write an example manifest for the template SCENARIO (see `qwen-batch templates list`)."""
    from jobs.manifest_tools import sample_manifest, write_manifest
    from jobs.templates import load_library

    table = sample_manifest(scenario, rows, library=load_library(template_dirs))
    write_manifest(table, out_path)
    click.echo(f"wrote {table.num_rows} row(s) to {out_path}")
    return 0
