"""GPU figures of the real-width Qwen-Image transformer on a 24 GB budget, with no download.

Builds QwenImageTransformer2DModel from Qwen-Image's real config with N of its 60 blocks and random
BF16 weights, compresses it with qwen-batch's DF11 codec, loads it through the same loader the
workers use (dfloat11's decoder on the GPU), caps this process at 24 GB
(torch.cuda.set_per_process_memory_fraction: a consumer card), and prints, at 1024² and 1328² and
batch 1/2/4, one figure per line:

- seconds per transformer forward with every block resident, with every block offloaded to host
  RAM (DF11 CPU offload), and offloaded with side-stream prefetch (qwen_worker.df11.prefetch);
- peak GPU memory of each;
- the implied seconds per image of the real 60-block model under the plan a 24 GB card gets
  (qwen_worker.offload), at 50 steps with CFG (100 forwards) and at Lightning-8 (8 forwards);
- model-FLOPs utilisation: FLOPs per forward from the config / time / the device's BF16 peak.

    python bench/bench_gpu.py [--blocks 4] [--sizes 1024,1328] [--batches 1,2,4]

Run by tests/gpu/run_gpu_checks.sh; about 5 minutes on one H100.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN_IMAGE_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
CARD_GB = 24.0
TEXT_TOKENS = 128  # a long prompt's tokens after the template is dropped
# dense BF16 tensor-core peaks (TFLOP/s) from the vendors' data sheets
BF16_PEAK_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756, "H100": 756, "A100": 312,
                    "L40S": 362, "L4": 121, "A10G": 70, "RTX 4090": 165, "RTX 3090": 71, "RTX A6000": 155}


def peak_tflops(name: str) -> float | None:
    return next((value for key, value in BF16_PEAK_TFLOPS.items() if key in name), None)


def forward_flops(config: dict, tokens_image: int, tokens_text: int, batch: int, blocks: int) -> float:
    """FLOPs of one transformer forward: 2 per multiply-add of every Linear on its tokens, plus
    attention (QK^T and AV over the joint sequence), for `blocks` blocks."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * hidden
    per_stream = 4 * hidden * hidden + 2 * hidden * mlp  # q, k, v, out + the MLP (modulation is per image, not token)
    linear = 2 * per_stream * (tokens_image + tokens_text)
    attention = 2 * 2 * (tokens_image + tokens_text) ** 2 * hidden
    return batch * blocks * (linear + attention)


def build(blocks: int, directory: Path):
    """A real-width transformer of `blocks` blocks with random BF16 weights (std 0.02, like trained
    Linear weights' exponents), saved as DF11 files by our codec; returns its config."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from qwen_worker.df11.codec import compress_state_dict, save_df11

    config = dict(QWEN_IMAGE_CONFIG, num_layers=blocks)
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**config).to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 0.02)
    started = time.perf_counter()
    tensors, df11_config = compress_state_dict(model.state_dict())
    save_df11(directory, tensors, df11_config)
    print(f"built {blocks} real-width blocks ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B weights), "
          f"DF11-compressed by the codec in {time.perf_counter() - started:.0f} s")
    return config


def load(config: dict, directory: Path, *, offload_blocks: int | None, prefetch: bool):
    import torch
    from diffusers import QwenImageTransformer2DModel

    from qwen_worker.offload import OffloadPlan
    from qwen_worker.real_model import _load_df11_with_dfloat11, empty_transformer

    transformer = empty_transformer(QwenImageTransformer2DModel, config)
    mode = "blocks" if offload_blocks else "none"
    plan = OffloadPlan(mode=mode, cpu_offload_blocks=offload_blocks, pin_memory=True, expected_peak_vram_gb=0.0,
                       host_ram_needed_gb=0.0, reason="bench", prefetch=prefetch)
    _load_df11_with_dfloat11(transformer, directory, plan)
    if prefetch:
        from qwen_worker.df11.prefetch import enable_prefetch

        enable_prefetch(transformer)
    return transformer.to("cuda").eval()


def inputs(size: int, batch: int):
    import torch

    side = size // 16
    return dict(
        hidden_states=torch.randn(batch, side * side, 64, device="cuda", dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 3584, device="cuda", dtype=torch.bfloat16),
        encoder_hidden_states_mask=torch.ones(batch, TEXT_TOKENS, device="cuda", dtype=torch.long),
        timestep=torch.full((batch,), 0.5, device="cuda", dtype=torch.bfloat16),
        img_shapes=[[(1, side, side)]] * batch,
        return_dict=False,
    ), side * side


def time_forward(transformer, size: int, batch: int, repeats: int = 3) -> tuple[float, float]:
    """(seconds per forward, peak GB) after a warm-up forward."""
    import torch

    kwargs, _tokens = inputs(size, batch)
    with torch.no_grad():
        transformer(**kwargs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(repeats):
            transformer(**kwargs)
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats, torch.cuda.max_memory_allocated() / 2**30


def release(transformer) -> None:
    import torch

    del transformer
    try:
        import dfloat11.dfloat11 as official

        official.TensorManager._tensors.clear()
    except Exception:
        pass
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--sizes", default="1024,1328")
    parser.add_argument("--batches", default="1,2,4")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    properties = torch.cuda.get_device_properties(0)
    total_gb = properties.total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_GB / total_gb))
    peak = peak_tflops(properties.name)
    print(f"device: {properties.name}, {total_gb:.0f} GB, capped at {CARD_GB:.0f} GB; BF16 peak "
          f"{peak if peak else 'unknown'} TFLOP/s")

    from qwen_worker.models import get_preset
    from qwen_worker.offload import choose_offload_plan

    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "df11"
        config = build(args.blocks, directory)
        times: dict = {}
        for label, offload, prefetch in (("resident", None, False), ("offloaded", args.blocks, False),
                                         ("offloaded+prefetch", args.blocks, True)):
            transformer = load(config, directory, offload_blocks=offload, prefetch=prefetch)
            for size in sizes:
                for batch in batches:
                    try:
                        seconds, peak_gb = time_forward(transformer, size, batch)
                    except torch.cuda.OutOfMemoryError:
                        print(f"{label:19s} {size}² batch {batch}: out of memory under {CARD_GB:.0f} GB")
                        torch.cuda.empty_cache()
                        continue
                    times[(label, size, batch)] = seconds
                    _kwargs, tokens = inputs(size, batch)
                    flops = forward_flops(config, tokens, TEXT_TOKENS, batch, args.blocks)
                    mfu = f", MFU {100 * flops / seconds / (peak * 1e12):.0f}%" if peak else ""
                    print(f"{label:19s} {size}² batch {batch}: {seconds * 1000:8.1f} ms/forward ({args.blocks} blocks), "
                          f"{seconds / args.blocks * 1000:6.1f} ms/block, peak {peak_gb:5.1f} GB{mfu}")
            release(transformer)
        preset = get_preset("qwen-image-df11")
        for size in sizes:
            for batch in batches:
                plan = choose_offload_plan("auto", preset=preset, free_vram_gb=CARD_GB - 0.5, host_ram_gb=128.0,
                                           images_per_call=batch, megapixels=size * size / 1e6)
                offloaded = plan.cpu_offload_blocks or 0
                for label in ("offloaded", "offloaded+prefetch"):
                    resident, moved = times.get(("resident", size, batch)), times.get((label, size, batch))
                    if resident is None or moved is None:
                        continue
                    per_forward = (60 - offloaded) * resident / args.blocks + offloaded * moved / args.blocks
                    print(f"60-block model, plan {plan.label} ({label}), {size}² batch {batch}: "
                          f"{per_forward:.2f} s/forward -> {100 * per_forward / batch:.0f} s/image at 50 steps + CFG, "
                          f"{8 * per_forward / batch:.1f} s/image at Lightning-8")


if __name__ == "__main__":
    main()
