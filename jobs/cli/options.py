"""Options shared by several commands."""

import click

model_option = click.option(
    "--model",
    default="qwen-image-df11",
    show_default=True,
    help="Model preset (README lists them): qwen-image-df11 (24 GB GPUs, the default), qwen-image-2512-df11, "
         "qwen-image-edit-2511-df11 / -2509-df11 / qwen-image-edit-df11 (editing), qwen-image-2.1; BF16 variants "
         "without -df11; tiny, tiny-edit, tiny-2.1, tiny-df11 (CPU, offline, for tests).",
)


def render_options(command):
    """--lora, --speed, --lightning-lora: what every row renders with (validate and submit)."""
    for option in reversed([
        click.option("--lora", "lora", multiple=True, metavar="FILE[:SCALE]",
                     help="LoRA added to every row (repeatable): a path, s3:// URI or hf://owner/repo/file.safetensors."),
        click.option("--speed", type=click.Choice(["standard", "lightning-8", "lightning-4"]), default="standard",
                     show_default=True, help="Few-step rendering with the model's Lightning LoRA (rows without a `speed`)."),
        click.option("--lightning-lora", default=None, metavar="FILE",
                     help="The Lightning LoRA to use instead of the preset's (a model without a known one needs it)."),
    ]):
        command = option(command)
    return command
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
