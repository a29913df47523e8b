"""Memory footprints of the real models, from their parameter counts.

The counts are those of the diffusers/transformers classes built from the real configs (the
`REAL_CONFIGS` below) on the meta device: `count_parameters()` recomputes them, and a test checks
that the figures here are still what the classes give. Bytes follow from the counts: BF16 is 2
bytes a weight; DF11 keeps DF11_RATIO of that (DFloat11/Qwen-Image-DF11 is 28.43e9 bytes for
40.86e9 of BF16). Activation figures are per megapixel of image tokens (output plus inputs) in one
forward: fitted to the DF11 model card for Qwen-Image (29.74e9 bytes peak at 1328x1328, one image)
and scaled by hidden width for other transformers, until tests/gpu measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_worker.models.preset import MemoryFootprint

GIB = 2**30
DF11_RATIO = 28.43e9 / 40.86e9  # DF11 bytes / BF16 bytes, the published Qwen-Image transformer
QWEN_IMAGE_ACTIVATION_GB_PER_MP = 0.34  # width 3072, fitted to the DF11 model card
HOST_OVERHEAD_GB = 6.0  # Python, torch, CUDA context, the largest checkpoint file being read


@dataclass(frozen=True)
class ParameterCounts:
    text_encoder: int
    vae: int
    transformer: int
    blocks: int
    block: int  # parameters of one transformer block (all blocks are alike)
    hidden: int  # transformer width (activations scale with it)


# computed by count_parameters() from REAL_CONFIGS (tests/qwen_worker/test_models.py checks them)
QWEN_IMAGE = ParameterCounts(text_encoder=8_292_166_656, vae=126_892_531, transformer=20_430_401_088,
                             blocks=60, block=339_831_296, hidden=3072)
QWEN_IMAGE_21 = ParameterCounts(text_encoder=8_767_123_696, vae=337_740_404, transformer=7_115_124_736,
                                blocks=32, block=218_104_064, hidden=4096)

REAL_CONFIGS = {
    "qwen-image": {
        "transformer": ("QwenImageTransformer2DModel", {}),  # the class defaults are Qwen-Image's
        "vae": ("AutoencoderKLQwenImage", {}),
        "text_encoder": ("Qwen2_5_VLForConditionalGeneration", dict(
            text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064,
                             rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
            vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                               fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2),
            vocab_size=152064, hidden_size=3584, tie_word_embeddings=False)),
    },
    "qwen-image-2.1": {
        "transformer": ("QwenImage21Transformer2DModel", {}),
        "vae": ("AutoencoderKLQwenImage21", {}),
        "text_encoder": ("Qwen3VLForConditionalGeneration", dict(  # Qwen3-VL-8B (transformers' defaults are not it)
            text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936,
                             rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                              "mrope_interleaved": True, "rope_theta": 5e6}),
            vision_config=dict(depth=27, hidden_size=1152, out_hidden_size=4096, intermediate_size=4304, num_heads=16,
                               deepstack_visual_indexes=[8, 16, 24], patch_size=16, num_position_embeddings=2304),
            tie_word_embeddings=False)),
    },
}


def footprint(counts: ParameterCounts, *, df11: bool, vae_decode_gb_per_mp: float = 1.2) -> MemoryFootprint:
    """The MemoryFootprint of a model with these counts, its transformer in DF11 or BF16.
    `vae_decode_gb_per_mp`: 1.2 for Qwen-Image's VAE (fitted with the model card's peak); the 2.1
    VAE's decoder is 1.5x as wide."""
    bf16 = lambda params: 2 * params / GIB  # noqa: E731
    transformer_bf16 = bf16(counts.transformer)
    return MemoryFootprint(
        text_encoder_gb=round(bf16(counts.text_encoder), 2),
        vae_gb=round(bf16(counts.vae), 2),
        transformer_gb=round(transformer_bf16 * DF11_RATIO if df11 else transformer_bf16, 2),
        transformer_bf16_gb=round(transformer_bf16, 2),
        block_offload_gb=round(bf16(counts.block) * DF11_RATIO, 3) if df11 else 0.0,
        decode_buffer_gb=round(bf16(counts.block), 3) if df11 else 0.0,
        activation_gb_per_mp=round(QWEN_IMAGE_ACTIVATION_GB_PER_MP * counts.hidden / QWEN_IMAGE.hidden, 3),
        vae_decode_gb_per_mp=vae_decode_gb_per_mp,
        host_overhead_gb=HOST_OVERHEAD_GB,
    )


def count_parameters(family: str) -> ParameterCounts:
    """The counts of REAL_CONFIGS[family], from the classes themselves on the meta device (no memory)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    def build(component: str):
        class_name, kwargs = REAL_CONFIGS[family][component]
        if component == "text_encoder":
            cls = getattr(transformers, class_name)
            return cls._from_config(cls.config_class(**kwargs))
        return getattr(diffusers, class_name)(**kwargs)

    with init_empty_weights():
        transformer, vae, text_encoder = build("transformer"), build("vae"), build("text_encoder")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    blocks = transformer.transformer_blocks
    return ParameterCounts(text_encoder=count(text_encoder), vae=count(vae), transformer=count(transformer),
                           blocks=len(blocks), block=count(blocks[0]),
                           hidden=transformer.config.num_attention_heads * transformer.config.attention_head_dim)
