"""The `qwen-batch` command line: a thin click group whose commands live one group per module.

Command modules are imported only when their command runs, so `qwen-batch --help` stays instant
(no torch, ray, diffusers or boto3 at start-up).
"""

from __future__ import annotations

import importlib
import sys

import click

from qwen_worker.errors import QwenBatchError

# command name -> (module, attribute, one-line help shown by --help without importing the module)
COMMANDS = {
    "submit": ("jobs.cli.submit_cmd", "submit", "Render every row of a manifest into DEST (local or on a Ray cluster)."),
    "validate": ("jobs.cli.validate_cmd", "validate", "Check every row of a manifest; print a summary or every error."),
    "status": ("jobs.cli.status_cmd", "status", "Show done / failed / pending rows of a job (its output, or a cluster job id)."),
    "logs": ("jobs.cli.cluster_cmd", "logs", "Print (or follow) the logs of a job on a Ray cluster."),
    "cancel": ("jobs.cli.cluster_cmd", "cancel", "Stop a job on a Ray cluster (stored rows stay; submit again to resume)."),
    "jobs": ("jobs.cli.cluster_cmd", "jobs_list", "List the qwen-batch jobs a Ray cluster knows."),
    "templates": ("jobs.cli.templates_cmd", "templates", "List, show and render the prompt templates (built-in and your own)."),
    "manifest": ("jobs.cli.manifest_cmd", "manifest", "Make a Parquet manifest from CSV / JSON Lines, or a sample one per template."),
    "schedule": ("jobs.cli.schedule_cmd", "schedule", "Submit manifests on a cron schedule (next runs, run the scheduler)."),
    "df11": ("jobs.cli.df11_cmd", "df11", "DFloat11-compress a fine-tuned or LoRA-merged Qwen-Image transformer (CPU)."),
    "report": ("jobs.cli.report_cmd", "report", "Write DEST/report.html: a gallery of the job's images, prompts, status and timings."),
    "doctor": ("jobs.cli.doctor_cmd", "doctor", "Check GPUs, CUDA, dfloat11, host RAM, the offload plan, model files, S3 and Ray for a model."),
    "text-check": ("jobs.cli.textcheck_cmd", "text_check", "OCR existing images (files, s3:// keys, a job output) and score the text they show."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attribute, _help = COMMANDS[name]
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qwen-batch")
def cli():
    """qwen-batch: render a Parquet manifest with Qwen-Image on Ray, into a directory or S3.

    Exit codes: 0 every row stored; 1 bad input or option (nothing rendered);
    3 the job finished but some rows failed; 4 a system failure stopped the job
    (storage or cluster unreachable); 2 command-line usage error.
    """


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _write_trace() -> str:
    """Write the current exception's traceback to a file in the temp dir; its path."""
    import os
    import tempfile
    import time
    import traceback

    directory = os.path.join(tempfile.gettempdir(), "qwen-batch-errors")
    try:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
        with open(path, "w") as f:
            f.write(f"qwen-batch {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
        return path
    except OSError:
        return "nowhere: the temp dir is not writable"


def main(argv=None):
    """Console entry point: user mistakes and known failures print one line, no traceback."""
    try:
        exit_code = cli.main(args=argv, prog_name="qwen-batch", standalone_mode=False)
    except QwenBatchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line, like every other error
        command = exc.ctx.command_path if exc.ctx is not None else "qwen-batch"
        click.echo(f"error: {_one_line(exc.format_message())} (see `{command} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: finished rows are stored; run the same submit again to resume", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug or a failure nobody foresaw: one line, the trace in a file
        click.echo(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (full trace in {_write_trace()}; "
                   "stored rows are kept, run the same command again to resume)", err=True)
        sys.exit(4)
    # commands return their exit code (an int) or None for success
    sys.exit(exit_code if isinstance(exit_code, int) else 0)
