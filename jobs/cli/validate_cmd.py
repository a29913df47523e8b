import json

import click

from jobs.cli.options import json_option, model_option, render_options, templates_option


@click.command()
@click.argument("manifest")
@model_option
@templates_option
@click.option("--seed", default=0, show_default=True, help="Job seed (only affects derived seeds).")
@click.option("--model-dir", default=None, help="Where hf:// LoRAs are looked for first (<dir>/lightning/).")
@render_options
@json_option
def validate(manifest, model, template_dirs, seed, model_dir, lora, speed, lightning_lora, as_json):
    """Check every row of MANIFEST, input images and LoRA files included (before any model loads);
    print a summary, or every error with its row, field and value."""
    from jobs.manifest import ResolveContext, validate_manifest
    from qwen_worker.presets import get_preset

    context = ResolveContext(preset=get_preset(model), job_seed=seed, template_dirs=template_dirs, job_loras=tuple(lora),
                             speed=speed, lightning_lora=lightning_lora, model_dir=model_dir)
    summary = validate_manifest(manifest, context)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), ensure_ascii=False, indent=2))
        return 0
    click.echo(f"{manifest}: OK — {summary.rows} rows, {summary.images} images")

    def line(label, counter):
        if counter:
            click.echo(f"  {label}: " + ", ".join(f"{name} ×{count}" for name, count in counter.most_common()))

    line("shapes", summary.shapes)
    line("languages", summary.languages)
    line("templates", summary.templates)
    line("formats", summary.formats)
    if summary.extra_columns:
        click.echo(f"  passed through to results: {', '.join(summary.extra_columns)}")
    return 0
