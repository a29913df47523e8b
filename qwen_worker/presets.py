"""Model presets: what each `--model` name loads and the limits rows are validated against.

Presets are plain data, so the driver can validate a manifest against them before any model
(or torch) is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from qwen_worker.errors import UserError

# Qwen-Image's aspect-ratio table (from the model card).
ASPECT_RATIOS = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}

# Qwen-Image's recommended prompt suffix ("positive magic") by language.
PROMPT_SUFFIX = {
    "en": ", Ultra HD, 4K, cinematic composition.",
    "zh": ", 超清，4K，电影级构图.",
}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def prompt_language(prompt: str, language: str) -> str:
    """'en' or 'zh': the given language, or for 'auto' zh when the prompt has any CJK character."""
    if language != "auto":
        return language
    return "zh" if _CJK.search(prompt) else "en"


def with_prompt_suffix(prompt: str, language: str) -> str:
    return prompt + PROMPT_SUFFIX[prompt_language(prompt, language)]


@dataclass(frozen=True)
class MemoryFootprint:
    """What a model occupies, in GiB (2**30 bytes, what nvidia-smi and torch report as "GB"), for
    planning GPU offload (qwen_worker.offload). Weights are as loaded for inference (BF16, or DF11
    for a DFloat11 transformer); per-megapixel figures are for one image in one call."""

    text_encoder_gb: float  # Qwen2.5-VL-7B in BF16
    vae_gb: float
    transformer_gb: float  # as held for inference: DF11-compressed when the preset uses DF11
    transformer_bf16_gb: float  # decoded to BF16 (the --device cpu path)
    block_offload_gb: float  # what DF11 CPU offload moves to host RAM per transformer block (0: no DF11)
    decode_buffer_gb: float  # DF11 decodes one block at a time into a BF16 buffer of the largest block
    activation_gb_per_mp: float  # transformer activations per image-megapixel in one forward
    vae_decode_gb_per_mp: float  # VAE decode activations per image-megapixel
    host_overhead_gb: float  # Python, torch and the largest checkpoint file being read


# Qwen-Image: text encoder 8.29 B params, VAE 127 M, transformer 20.43 B params (40.86e9 bytes BF16,
# 28.43e9 bytes DF11), 60 blocks of 339.7 M weights each (DF11: ~0.44 GiB, of which the exponent
# stream and sign/mantissa bytes, ~0.43 GiB, go to host RAM with cpu_offload). The activation
# figure is fitted to the DF11 model card (29.74e9 bytes peak at 1328x1328, one image).
_QWEN_IMAGE_DF11_FOOTPRINT = MemoryFootprint(
    text_encoder_gb=15.44,
    vae_gb=0.24,
    transformer_gb=26.48,
    transformer_bf16_gb=38.05,
    block_offload_gb=0.43,
    decode_buffer_gb=0.63,
    activation_gb_per_mp=0.34,
    vae_decode_gb_per_mp=1.2,
    host_overhead_gb=6.0,
)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    base_repo: str | None  # diffusers pipeline (text encoder, VAE, tokenizer, scheduler, transformer config)
    df11_repo: str | None  # DFloat11-compressed transformer, when the preset uses one
    needs_cuda: bool
    min_size: int
    max_size: int
    default_steps: int
    default_true_cfg_scale: float
    host_memory_gb: float  # host RAM one worker needs (CPU offload keeps weights in RAM)
    vram_gb: float  # GPU memory one worker needs with its default offload plan
    footprint: MemoryFootprint | None = None  # for offload planning; None: small, nothing to offload

    def size_limits_text(self) -> str:
        return f"{self.min_size} and {self.max_size}"


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in [
        ModelPreset(
            name="qwen-image-df11",
            description="Qwen-Image with its transformer in DFloat11 (lossless, ~70% of BF16) + CPU offload; fits 24 GB GPUs",
            base_repo="Qwen/Qwen-Image",
            df11_repo="DFloat11/Qwen-Image-DF11",
            needs_cuda=True,
            min_size=256,
            max_size=2048,
            default_steps=50,
            default_true_cfg_scale=4.0,
            host_memory_gb=48.0,
            vram_gb=17.0,
            footprint=_QWEN_IMAGE_DF11_FOOTPRINT,
        ),
        ModelPreset(
            name="qwen-image",
            description="Qwen-Image in BF16 (transformer 40.9 GB): for 48 GB+ GPUs",
            base_repo="Qwen/Qwen-Image",
            df11_repo=None,
            needs_cuda=True,
            min_size=256,
            max_size=2048,
            default_steps=50,
            default_true_cfg_scale=4.0,
            host_memory_gb=16.0,
            vram_gb=58.0,
            footprint=replace(
                _QWEN_IMAGE_DF11_FOOTPRINT, transformer_gb=38.05, block_offload_gb=0.0, decode_buffer_gb=0.0
            ),
        ),
        ModelPreset(
            name="tiny",
            description="tiny randomly initialised Qwen-Image built offline in code (tests, demo; renders noise)",
            base_repo=None,
            df11_repo=None,
            needs_cuda=False,
            min_size=16,
            max_size=2048,
            default_steps=4,
            default_true_cfg_scale=4.0,
            host_memory_gb=1.0,
            vram_gb=0.0,
        ),
    ]
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r} (known: {', '.join(sorted(PRESETS))})") from None
