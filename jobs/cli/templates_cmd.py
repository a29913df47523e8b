"""`qwen-batch templates list|show|render`: the prompt templates, built-in and your own."""

from __future__ import annotations

import json

import click

from jobs.cli.options import templates_option


@click.group("templates")
def templates():
    """Prompt templates: list them, show one, render one with params."""


@templates.command("list")
@templates_option
def list_templates(template_dirs):
    """List the templates: name, language, aspect ratio, description."""
    from jobs.templates import load_library

    library = load_library(template_dirs)
    width = max(len(name) for name in library.names())
    for template in library:
        summary = template.description.split(". ")[0].rstrip(".")
        click.echo(f"{template.name:<{width}}  {template.language:<4}  {template.aspect_ratio:<5}  {summary}")
    return 0


@templates.command("show")
@click.argument("name")
@templates_option
def show_template(name, template_dirs):
    """Show a template: its params (with examples), its prompt and a sample render."""
    from jobs.templates import load_library

    template = load_library(template_dirs).get(name)
    width, height = template.size
    click.echo(f"name:            {template.name}")
    click.echo(f"file:            {template.source}")
    click.echo(f"description:     {template.description}")
    click.echo(f"language:        {template.language}")
    click.echo(f"aspect_ratio:    {template.aspect_ratio} ({width}x{height})")
    click.echo(f"negative_prompt: {template.negative_prompt!r}")
    if template.inputs:
        click.echo("input images (an editing template: give them as `image` / `images`, with an edit model):")
        for number, description in enumerate(template.inputs, 1):
            click.echo(f"  {number}. {description}")
    click.echo("params:")
    for param in template.params.values():
        rule = "required" if param.required else f"optional, default {json.dumps(param.default, ensure_ascii=False)}"
        click.echo(f"  {param.name} ({rule}): {param.description}")
        click.echo(f"      example: {json.dumps(param.example, ensure_ascii=False)}")
    click.echo("prompt template:")
    for line in template.prompt.strip().splitlines():
        click.echo(f"  {line}")
    click.echo("sample params:")
    click.echo(f"  {json.dumps(template.sample_params(), ensure_ascii=False)}")
    click.echo("sample prompt:")
    click.echo(f"  {template.render(template.sample_params())}")
    return 0


@templates.command("render")
@click.argument("name")
@click.option(
    "--params",
    "params_json",
    default=None,
    help='Params as a JSON object, e.g. \'{"title": "故宫 · The Forbidden City"}\'. Default: the sample params.',
)
@templates_option
def render_template(name, params_json, template_dirs):
    """Print the prompt NAME renders to with --params."""
    from jobs.templates import load_library, parse_params

    template = load_library(template_dirs).get(name)
    if params_json is None:
        params = template.sample_params()
        click.echo("(no --params: using the sample params)", err=True)
    else:
        params = parse_params(params_json)
    click.echo(template.render(params))
    return 0
