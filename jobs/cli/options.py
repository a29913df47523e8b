"""Options shared by several commands."""

import click

model_option = click.option(
    "--model",
    default="qwen-image-df11",
    show_default=True,
    help="Model preset: qwen-image-df11 (24 GB GPUs), qwen-image (BF16, 48 GB+), tiny (CPU, offline, for tests).",
)
templates_option = click.option(
    "--templates",
    "template_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Extra directory of prompt templates (repeatable); overrides built-ins of the same name.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
