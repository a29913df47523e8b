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
    type=click.Path(exists=True, file_okay=False, resolve_path=True),
    help="Extra directory of prompt templates (repeatable); overrides built-ins of the same name.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


class WorkerCount(click.ParamType):
    """`--workers`: N, MIN-MAX or auto (jobs.pool.parse_workers), one-line errors."""

    name = "N|MIN-MAX|auto"

    def convert(self, value, param, ctx):
        from jobs.pool import PoolSize, parse_workers
        from qwen_worker.errors import UserError

        if isinstance(value, PoolSize):
            return value
        try:
            return parse_workers(value)
        except UserError as exc:
            self.fail(str(exc).replace("`--workers` ", ""), param, ctx)


class BatchSize(click.ParamType):
    """`auto` (stored as 0: each worker picks what its GPU memory fits) or a number 1-64."""

    name = "auto|1-64"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return 0
        try:
            number = int(value)
        except ValueError:
            self.fail(f"must be auto or a number from 1 to 64, got: {value!r}", param, ctx)
        if not 1 <= number <= 64:
            self.fail(f"must be auto or a number from 1 to 64, got: {number}", param, ctx)
        return number
