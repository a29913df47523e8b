"""Qwen-Image text-to-image (QwenImagePipeline): Qwen/Qwen-Image (Aug 2025) and Qwen/Qwen-Image-2512,
same architecture; the tiny offline build of it; its presets.

One pipeline call renders a micro-batch of prompts of one shape; each image gets its own
torch.Generator seeded from its row, so an image does not depend on which other images share its
batch (beyond BF16 padding effects, which exactly-once does not rely on).
"""

from __future__ import annotations

from dataclasses import replace

from qwen_worker.models.footprint import QWEN_IMAGE, footprint
from qwen_worker.models.preset import Lightning, ModelPreset

FAMILY = "qwen-image"

# The pipeline drops the first 34 tokens of its prompt template; the tiny tokenizer must encode the
# template prefix to exactly that many tokens, or the prompt would be cut.
TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
TEMPLATE_DROP_TOKENS = 34

# The tiny transformer: Qwen-Image's architecture (QwenImageTransformer2DModel) at toy width.
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)

_DF11 = footprint(QWEN_IMAGE, df11=True)
_BF16 = footprint(QWEN_IMAGE, df11=False)
_LIGHTNING = {
    "lightning-8": Lightning(8, "hf://lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V1.1.safetensors"),
    "lightning-4": Lightning(4, "hf://lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-4steps-V1.0.safetensors"),
}
_LIGHTNING_2512 = {
    "lightning-4": Lightning(4, "hf://lightx2v/Qwen-Image-2512-Lightning/Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors"),
}
_COMMON = dict(family=FAMILY, min_size=256, max_size=2048, default_steps=50, default_true_cfg_scale=4.0)

PRESETS = [
    ModelPreset(
        name="qwen-image-df11",
        description="Qwen-Image with its transformer in DFloat11 (lossless, ~70% of BF16) + CPU offload; fits 24 GB GPUs",
        base_repo="Qwen/Qwen-Image", df11_repo="DFloat11/Qwen-Image-DF11", needs_cuda=True,
        host_memory_gb=48.0, vram_gb=17.0, footprint=_DF11, lightning=_LIGHTNING, **_COMMON,
    ),
    ModelPreset(
        name="qwen-image",
        description="Qwen-Image in BF16 (transformer 40.9 GB): for 48 GB+ GPUs",
        base_repo="Qwen/Qwen-Image", df11_repo=None, needs_cuda=True,
        host_memory_gb=16.0, vram_gb=58.0, footprint=_BF16, lightning=_LIGHTNING, **_COMMON,
    ),
    ModelPreset(
        name="qwen-image-2512-df11",
        description="Qwen-Image-2512 (Dec 2025; same architecture), transformer in DF11 from `qwen-batch df11 compress` "
                    "(no official DF11 repo) + CPU offload; fits 24 GB GPUs",
        base_repo="Qwen/Qwen-Image-2512", df11_repo="", needs_cuda=True,
        host_memory_gb=48.0, vram_gb=17.0, footprint=_DF11, lightning=_LIGHTNING_2512, **_COMMON,
    ),
    ModelPreset(
        name="qwen-image-2512",
        description="Qwen-Image-2512 in BF16: for 48 GB+ GPUs",
        base_repo="Qwen/Qwen-Image-2512", df11_repo=None, needs_cuda=True,
        host_memory_gb=16.0, vram_gb=58.0, footprint=_BF16, lightning=_LIGHTNING_2512, **_COMMON,
    ),
]
_TINY = ModelPreset(
    name="tiny",
    description="tiny randomly initialised Qwen-Image built offline in code (tests, demo; renders noise)",
    base_repo=None, df11_repo=None, needs_cuda=False, min_size=16, max_size=2048, default_steps=4,
    default_true_cfg_scale=4.0, host_memory_gb=1.0, vram_gb=0.0, family=FAMILY, builtin=True,
    lightning={"lightning-8": Lightning(8, "builtin:tiny-lightning-8"), "lightning-4": Lightning(4, "builtin:tiny-lightning-4")},
)
PRESETS += [
    _TINY,
    replace(_TINY, name="tiny-df11", df11_in_code=True,
            description="the tiny model with its transformer compressed to DF11 and decoded by qwen-batch's codec "
                        "(tests the DF11 paths end to end on CPU)"),
]


# ----------------------------------------------------------------------------------- classes


def pipeline_class(preset: ModelPreset | None = None):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline


def transformer_class():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel


def build_tiny(preset: ModelPreset, *, seed: int = 0, dtype=None):
    """The tiny QwenImagePipeline; weights are a pure function of `seed`. BF16 by default, as the
    real models run: like them, a row's pixels then depend a little on the other prompts of its
    micro-batch (padding), which exactly-once must not rely on."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    from qwen_worker.models.tiny_parts import (SPECIAL_TOKENS, TINY_CORPUS, TINY_VAE_CONFIG, cast_quietly,
                                               qwen25vl_text_encoder, qwen_image_scheduler, train_tokenizer)

    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**TINY_VAE_CONFIG)
    transformer, vae = cast_quietly([transformer, vae], dtype)
    tokenizer = train_tokenizer(TEMPLATE_PREFIX, TEMPLATE_DROP_TOKENS, TINY_CORPUS, SPECIAL_TOKENS[:3])
    torch.manual_seed(seed + 2)
    text_encoder = qwen25vl_text_encoder(tokenizer, dtype)
    pipe = QwenImagePipeline(scheduler=qwen_image_scheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------- rendering


def render(model, tasks: list, inputs: dict) -> list:
    """One micro-batch (all tasks share a batch key): PIL images in task order."""
    return render_with(model.pipe, tasks)


def render_with(pipe, tasks: list) -> list:
    """One pipeline call for the tasks. Generators live on the CPU (diffusers draws the noise there
    and moves it), so the initial noise of a seed is the same on every device."""
    import torch

    first = tasks[0].row
    output = pipe(
        prompt=[task.row.prompt for task in tasks],
        negative_prompt=[task.row.negative_prompt for task in tasks],
        true_cfg_scale=first.true_cfg_scale,
        width=first.width,
        height=first.height,
        num_inference_steps=first.steps,
        generator=[torch.Generator("cpu").manual_seed(task.seed) for task in tasks],
        output_type="pil",
    )
    return list(output.images)


def build_tiny_pipeline(*, seed: int = 0, dtype=None):
    """The `tiny` preset's pipeline (tests and benchmarks build it directly)."""
    return build_tiny(_TINY, seed=seed, dtype=dtype)
