"""`qwen-batch df11 compress`: DFloat11-compress a (fine-tuned / LoRA-merged) Qwen-Image transformer."""

import click


@click.group()
def df11():
    """DFloat11 tools (CPU, byte-compatible with the official dfloat11 format)."""


@click.command()
@click.argument("transformer_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--max-shard-gb", type=float, default=None, help="Split the output into safetensors files of at most this size.")
@click.option("--merge-lora", multiple=True, metavar="FILE[:SCALE]",
              help="Bake a LoRA into the weights before compressing (repeatable): a house style at no per-forward cost.")
def compress(transformer_dir, out_dir, max_shard_gb, merge_lora):
    """Compress TRANSFORMER_DIR (a diffusers transformer folder of Qwen-Image, -Edit, -2512 or -2.1:
    config.json + *.safetensors in BF16) into OUT_DIR, loadable by `--model-dir` and by dfloat11 itself."""
    from jobs.df11_compress import compress_transformer_dir

    report = compress_transformer_dir(transformer_dir, out_dir, max_shard_bytes=int(max_shard_gb * 1e9) if max_shard_gb else None,
                                      merge_lora=list(merge_lora))
    for line in report["merged"]:
        click.echo(f"merged {line}")
    click.echo(
        f"wrote {out_dir}: {report['weights']:,} weights compressed in {report['units']} blocks, "
        f"{report['bf16_bytes'] / 1e9:.2f} GB -> {report['df11_bytes'] / 1e9:.2f} GB "
        f"({100 * report['df11_bytes'] / report['bf16_bytes']:.1f}% of BF16) in {report['seconds']:.1f} s"
    )
    return 0


df11.add_command(compress)
