"""Qwen-Image-2.1 (QwenImage21Pipeline): a 7 B single-stream transformer, the Qwen3-VL-8B text
encoder, a 16x RGBA VAE; text-to-image, or with reference images. The tiny offline build; presets.

Rendering: a list of prompts per call; reference images are one list shared by every prompt of a
call, so rows with references are batched only with rows naming the same references. Images come
out RGBA (PNG and WebP keep the alpha channel). The pipeline is meant to be sampled without
guidance: true_cfg_scale defaults to 1.
"""

from __future__ import annotations

from dataclasses import replace

from qwen_worker.models.footprint import QWEN_IMAGE_21, footprint
from qwen_worker.models.preset import Lightning, ModelPreset

FAMILY = "qwen-image-2.1"
SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
# Only what the pipeline needs of Qwen3-VL's chat template: it renders the system message once to
# count the tokens it drops, and formats the prompt itself.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'text' -%}{{- c['text'] -}}"
    "{%- elif c['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
_TINY_CORPUS = [
    "<image1> <image2> <|im_end|>\n<|im_start|>assistant\n",
    "A bilingual travel guide page for Hong Kong, title \"香港 Hong Kong\".",
    "一张官方通知，标题“关于春节放假的通知”，正文排版整齐。",
    "Replace the background with a beach; keep the person. Picture 1 Picture 2 0123456789 ¥$€ .,:;!?\"'()[]",
]
# QwenImage21Transformer2DModel at toy width (real: 32 layers, 32 heads x 128, context 4096, mlp_ratio 3).
TINY_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=2, attention_head_dim=16,
                               num_attention_heads=2, context_in_dim=32, mlp_ratio=3, axes_dims_rope=(4, 6, 6),
                               causal_condition=True)
# AutoencoderKLQwenImage21 at toy width: z_dim stays 64 (the pipeline tells latents from RGBA images
# by their channel count) and 5 levels, the 16x the pipeline assumes.
TINY_VAE_CONFIG = dict(base_dim=8, decoder_base_dim=8, z_dim=64, dim_mult=[1, 1, 2, 2, 2], num_res_blocks=1,
                       attn_scales=[], temperal_downsample=[False, True, True, True], is_residual=True,
                       in_channels=4, out_channels=4, latents_mean=[0.0] * 64, latents_std=[1.0] * 64)

_COMMON = dict(family=FAMILY, pipeline="QwenImage21Pipeline", min_size=256, max_size=2048, default_steps=40,
               default_true_cfg_scale=1.0, needs_cuda=True, max_inputs=3, prompt_suffix=False, size_multiple=32,
               target_area=1024 * 1024, size_from_input="last", rgba=True)  # Lightning: --lightning-lora FILE
PRESETS = [
    ModelPreset(name="qwen-image-2.1", base_repo="Qwen/Qwen-Image-2.1", df11_repo=None,
                description="Qwen-Image-2.1 (7 B transformer in BF16, Qwen3-VL-8B text encoder, reference images, RGBA): "
                            "model CPU offload on 24 GB GPUs", host_memory_gb=40.0, vram_gb=18.0,
                footprint=footprint(QWEN_IMAGE_21, df11=False, vae_decode_gb_per_mp=1.8), **_COMMON),
    ModelPreset(name="qwen-image-2.1-df11", base_repo="Qwen/Qwen-Image-2.1", df11_repo="",
                description="Qwen-Image-2.1 with its transformer in DF11 from `qwen-batch df11 compress`",
                host_memory_gb=36.0, vram_gb=18.0,
                footprint=footprint(QWEN_IMAGE_21, df11=True, vae_decode_gb_per_mp=1.8), **_COMMON),
]
_TINY = ModelPreset(name="tiny-2.1", base_repo=None, df11_repo=None, host_memory_gb=1.0, vram_gb=0.0, builtin=True,
                    description="tiny randomly initialised Qwen-Image-2.1 built offline in code (tests, demo)",
                    **dict(_COMMON, needs_cuda=False, min_size=32, default_steps=4, target_area=64 * 64,
                           lightning={"lightning-8": Lightning(8, "builtin:tiny-lightning-8"),
                                      "lightning-4": Lightning(4, "builtin:tiny-lightning-4")}))
PRESETS += [_TINY, replace(_TINY, name="tiny-2.1-df11", df11_in_code=True,
                           description="tiny-2.1 with its transformer through qwen-batch's DF11 codec")]


def pipeline_class(preset: ModelPreset):
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline


def transformer_class():
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel


def _image_only_processor(image_processor, tokenizer):
    """Qwen3VLProcessor, or without torchvision an image-only subclass (the real class insists on a
    video processor, which needs torchvision; the pipeline never passes videos)."""
    import importlib.util

    from transformers import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Qwen3VLVideoProcessor

        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATE)

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    return ImageOnlyQwen3VLProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


def _text_encoder(tokenizer, dtype):
    """A tiny Qwen3-VL with its vision tower (deepstack on), token ids those of `tokenizer`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                          "rope_theta": 5e6},
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype).eval()


def build_tiny(preset: ModelPreset, *, seed: int = 0, dtype=None):
    """The tiny QwenImage21Pipeline; weights a pure function of `seed`."""
    import torch
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Pipeline, QwenImage21Transformer2DModel
    from transformers import Qwen2VLImageProcessorPil

    from qwen_worker.models.tiny_parts import SPECIAL_TOKENS, cast_quietly, qwen_image_scheduler, train_tokenizer

    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(**TINY_TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage21(**TINY_VAE_CONFIG)
    transformer, vae = cast_quietly([transformer, vae], dtype)
    tokenizer = train_tokenizer(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n", None,
                                _TINY_CORPUS, SPECIAL_TOKENS)
    tokenizer.pad_token = "<|endoftext|>"
    # real Qwen3-VL: patch 16, merge 2; the tiny one lets 64x64 references through unscaled (one vision
    # token must stay 2x2 latents)
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                               size={"shortest_edge": 32 * 32, "longest_edge": 16777216})
    torch.manual_seed(seed + 2)
    text_encoder = _text_encoder(tokenizer, dtype)
    pipe = QwenImage21Pipeline(scheduler=qwen_image_scheduler(), vae=vae, text_encoder=text_encoder,
                               processor=_image_only_processor(image_processor, tokenizer), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def output_size(preset: ModelPreset, input_sizes: list[tuple[int, int]]) -> tuple[int, int]:
    from qwen_worker.models.qwen_image_edit import area_size

    width, height = input_sizes[-1]
    out_w, out_h = area_size(preset.target_area, width / height)
    step = preset.size_multiple
    return out_w // step * step, out_h // step * step


def render(model, tasks: list, inputs: dict) -> list:
    """One call for the batch (its rows share references, size, steps and CFG)."""
    import math

    import torch

    first = tasks[0].row
    references = [inputs[ref.uri] for ref in first.inputs] or None
    output = model.pipe(
        prompt=[task.row.prompt for task in tasks],
        negative_prompt=[task.row.negative_prompt for task in tasks],
        image=references,
        true_cfg_scale=first.true_cfg_scale,
        width=first.width,
        height=first.height,
        num_inference_steps=first.steps,
        generator=[torch.Generator("cpu").manual_seed(task.seed) for task in tasks],
        output_resolution=int(math.isqrt(model.preset.target_area)),
        output_type="pil",
    )
    return list(output.images)
