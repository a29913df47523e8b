"""Qwen-Image editing: Qwen/Qwen-Image-Edit (QwenImageEditPipeline, one input image) and
Qwen/Qwen-Image-Edit-2509 / -2511 (QwenImageEditPlusPipeline, one to three), with inpainting
(QwenImageEditInpaintPipeline, an image and a mask) on the same components; the tiny offline build;
the presets.

Micro-batching: QwenImageEditPlusPipeline refuses more than one prompt per call, and under CPU offload
a call of one image pays the whole weight transfer per forward. `render_plus_batch` runs one
denoising loop over a batch of rows that share output size and input-image slots, using the
pipeline's own components and methods the way its __call__ does (diffusers 0.42.1,
pipeline_qwenimage_edit_plus.py): text encoding per row (zero-padded to the longest, masked), one
VAE encode per input slot, per-row generators, true CFG with norm rescaling. Batched equals one by one
within one 8-bit level in float32 (tests/qwen_worker/test_models.py).
"""

from __future__ import annotations

from dataclasses import replace

from qwen_worker.models.footprint import QWEN_IMAGE, footprint
from qwen_worker.models.preset import Lightning, ModelPreset
from qwen_worker.models.qwen_image import TINY_TRANSFORMER_CONFIG  # the same transformer class and tiny config

FAMILY = "qwen-image-edit"

# The edit pipelines' system prompt; they drop its first 64 tokens (prompt_template_encode_start_idx).
TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
TEMPLATE_DROP_TOKENS = 64
_TINY_CORPUS = [
    "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n",
    "Picture 1: Picture 2: Picture 3: ",
    "Make the cat wear a red hat, change the background to a beach, replace the text with \"SALE 50%\".",
    "把背景换成海边，给猫戴上红色帽子，把文字改成“新年快乐”。",
    "Remove the person on the left, keep the lighting, 0123456789 ¥$€ .,:;!?\"'()[]",
]
# Qwen2-VL image processor at toy size: 28-pixel units, 1 to 16 vision tokens per image.
TINY_VL_PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)

_EDIT_FOOTPRINT = footprint(QWEN_IMAGE, df11=True)  # the Qwen-Image transformer; inputs add image tokens
_EDIT_BF16 = footprint(QWEN_IMAGE, df11=False)
_COMMON = dict(family=FAMILY, min_size=256, max_size=2048, default_steps=50, default_true_cfg_scale=4.0,
               needs_cuda=True, min_inputs=1, prompt_suffix=False, target_area=1024 * 1024)
_EDIT = dict(_COMMON, pipeline="QwenImageEditPipeline", max_inputs=1, mask=True, size_from_input="first",
             lightning={
                 "lightning-8": Lightning(8, "hf://lightx2v/Qwen-Image-Lightning/Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors"),
                 "lightning-4": Lightning(4, "hf://lightx2v/Qwen-Image-Lightning/Qwen-Image-Edit-Lightning-4steps-V1.0-bf16.safetensors"),
             })
_PLUS = dict(_COMMON, pipeline="QwenImageEditPlusPipeline", max_inputs=3, size_from_input="last")
_LIGHTNING_2509 = {
    "lightning-8": Lightning(8, "hf://lightx2v/Qwen-Image-Lightning/Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"),
    "lightning-4": Lightning(4, "hf://lightx2v/Qwen-Image-Lightning/Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"),
}
_LIGHTNING_2511 = {
    "lightning-4": Lightning(4, "hf://lightx2v/Qwen-Image-Edit-2511-Lightning/Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"),
}

PRESETS = [
    ModelPreset(name="qwen-image-edit-df11", base_repo="Qwen/Qwen-Image-Edit", df11_repo="DFloat11/Qwen-Image-Edit-DF11",
                description="Qwen-Image-Edit (one input image; a `mask` inpaints), DF11 transformer + CPU offload; 24 GB GPUs",
                host_memory_gb=50.0, vram_gb=23.0, footprint=_EDIT_FOOTPRINT, **_EDIT),
    ModelPreset(name="qwen-image-edit", base_repo="Qwen/Qwen-Image-Edit", df11_repo=None,
                description="Qwen-Image-Edit in BF16: 48 GB+ GPUs", host_memory_gb=16.0, vram_gb=60.0,
                footprint=_EDIT_BF16, **_EDIT),
    ModelPreset(name="qwen-image-edit-2509-df11", base_repo="Qwen/Qwen-Image-Edit-2509",
                df11_repo="DFloat11/Qwen-Image-Edit-2509-DF11",
                description="Qwen-Image-Edit-2509 (one to three input images), DF11 transformer + CPU offload; 24 GB GPUs",
                host_memory_gb=50.0, vram_gb=23.0, footprint=_EDIT_FOOTPRINT, lightning=_LIGHTNING_2509, **_PLUS),
    ModelPreset(name="qwen-image-edit-2509", base_repo="Qwen/Qwen-Image-Edit-2509", df11_repo=None,
                description="Qwen-Image-Edit-2509 in BF16: 48 GB+ GPUs", host_memory_gb=16.0, vram_gb=60.0,
                footprint=_EDIT_BF16, lightning=_LIGHTNING_2509, **_PLUS),
    ModelPreset(name="qwen-image-edit-2511-df11", base_repo="Qwen/Qwen-Image-Edit-2511", df11_repo="",
                description="Qwen-Image-Edit-2511 (one to three input images), DF11 transformer from "
                            "`qwen-batch df11 compress` + CPU offload; 24 GB GPUs",
                host_memory_gb=50.0, vram_gb=23.0, footprint=_EDIT_FOOTPRINT, lightning=_LIGHTNING_2511, **_PLUS),
    ModelPreset(name="qwen-image-edit-2511", base_repo="Qwen/Qwen-Image-Edit-2511", df11_repo=None,
                description="Qwen-Image-Edit-2511 in BF16: 48 GB+ GPUs", host_memory_gb=16.0, vram_gb=60.0,
                footprint=_EDIT_BF16, lightning=_LIGHTNING_2511, **_PLUS),
    ModelPreset(name="tiny-edit", base_repo=None, df11_repo=None,
                description="tiny randomly initialised Qwen-Image-Edit-2509 (one to three input images; a `mask` "
                            "inpaints) built offline in code (tests, demo)",
                host_memory_gb=1.0, vram_gb=0.0, builtin=True,
                **dict(_PLUS, needs_cuda=False, min_size=16, default_steps=4, mask=True, target_area=64 * 64,
                       input_area=64 * 64, condition_area=56 * 56,
                       lightning={"lightning-8": Lightning(8, "builtin:tiny-lightning-8"),
                                  "lightning-4": Lightning(4, "builtin:tiny-lightning-4")})),
]
PRESETS.append(replace(PRESETS[-1], name="tiny-edit-df11", df11_in_code=True,
                       description="tiny-edit with its transformer through qwen-batch's DF11 codec"))


# ----------------------------------------------------------------------------------- classes


def pipeline_class(preset: ModelPreset):
    import diffusers

    return getattr(diffusers, preset.pipeline)


def transformer_class():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel


def companion_pipelines(preset: ModelPreset, pipe) -> dict:
    """Other pipelines on the same components: the inpainting one for rows with a `mask`."""
    if not preset.mask:
        return {}
    from diffusers import QwenImageEditInpaintPipeline

    inpaint = QwenImageEditInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    return {"inpaint": inpaint}


def _image_only_processor_class():
    """Qwen2VLProcessor without its video sub-processor (transformers 5 type-checks every
    sub-processor, and the video one needs torchvision)."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


def build_tiny(preset: ModelPreset, *, seed: int = 0, dtype=None):
    """The tiny edit pipeline of `preset` (EditPlus for tiny-edit); weights a pure function of `seed`."""
    import diffusers
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qwen_worker.models.tiny_parts import (SPECIAL_TOKENS, TINY_VAE_CONFIG, cast_quietly, qwen25vl_text_encoder,
                                               qwen_image_scheduler, train_tokenizer)

    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**dict(TINY_VAE_CONFIG, base_dim=4))  # condition images are VAE-encoded too
    transformer, vae = cast_quietly([transformer, vae], dtype)
    tokenizer = train_tokenizer(TEMPLATE_PREFIX, TEMPLATE_DROP_TOKENS, _TINY_CORPUS, SPECIAL_TOKENS)
    torch.manual_seed(seed + 2)
    text_encoder = qwen25vl_text_encoder(tokenizer, dtype)
    processor = _image_only_processor_class()(Qwen2VLImageProcessorPil(**TINY_VL_PIXELS), tokenizer)
    pipe = getattr(diffusers, preset.pipeline)(scheduler=qwen_image_scheduler(), vae=vae, text_encoder=text_encoder,
                                              tokenizer=tokenizer, processor=processor, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------- sizes


def output_size(preset: ModelPreset, input_sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The size the pipeline picks for these inputs: `target_area` at the first (Edit) or last
    (Edit-2509/2511) input's aspect ratio, multiples of 32, then of the size multiple."""
    width, height = input_sizes[0] if preset.size_from_input == "first" else input_sizes[-1]
    out_w, out_h = area_size(preset.target_area, width / height)
    step = preset.size_multiple
    return out_w // step * step, out_h // step * step


def area_size(area: int, ratio: float) -> tuple[int, int]:
    """diffusers' calculate_dimensions: about `area` pixels at `ratio`, each side a multiple of 32."""
    import math

    width = math.sqrt(area * ratio)
    height = width / ratio
    return max(32, round(width / 32) * 32), max(32, round(height / 32) * 32)


# ----------------------------------------------------------------------------------- rendering


def render(model, tasks: list, inputs: dict) -> list:
    """One micro-batch of edit tasks (same batch key): PIL images in task order."""
    row = tasks[0].row
    if row.mask is not None:
        return [_render_one(model.pipes["inpaint"], task, inputs, mask=inputs[row.mask.uri]) for task in tasks]
    if model.preset.pipeline == "QwenImageEditPlusPipeline":
        return render_plus_batch(model.pipe, tasks, inputs, input_area=model.preset.input_area,
                                 condition_area=model.preset.condition_area)
    return [_render_one(model.pipe, task, inputs) for task in tasks]


def _render_one(pipe, task, inputs: dict, mask=None) -> object:
    import torch

    row = task.row
    images = [inputs[ref.uri] for ref in row.inputs]
    extra = {"mask_image": mask, "strength": 1.0} if mask is not None else {"height": row.height, "width": row.width}
    output = pipe(image=images if len(images) > 1 else images[0], prompt=row.prompt, negative_prompt=row.negative_prompt,
                  true_cfg_scale=row.true_cfg_scale, num_inference_steps=row.steps,
                  generator=torch.Generator("cpu").manual_seed(task.seed), output_type="pil", **extra)
    return output.images[0]


def _pad_text(encoded: list):
    """[(embeds [1, L_i, D], mask or None)] -> (embeds [B, L, D], mask [B, L] or None), zero-padded."""
    import torch

    lengths = [embeds.shape[1] for embeds, _mask in encoded]
    longest = max(lengths)
    embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])) for e, _mask in encoded])
    mask = (torch.arange(longest)[None] < torch.tensor(lengths)[:, None]).long().to(embeds.device)
    return embeds, (None if bool(mask.all()) else mask)


def render_plus_batch(pipe, tasks: list, inputs: dict, *, input_area: int = 1024 * 1024,
                      condition_area: int = 384 * 384) -> list:
    """One denoising loop over the tasks of a batch (QwenImageEditPlusPipeline's components).
    Tasks share output size, steps, true CFG scale and the aspect ratio of each input slot."""
    import numpy as np
    import torch
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps

    first = tasks[0].row
    height, width, steps, cfg = first.height, first.width, first.steps, first.true_cfg_scale
    device, batch = pipe._execution_device, len(tasks)
    do_true_cfg = cfg > 1
    with torch.no_grad():
        positive, negative, vae_columns, vae_sizes = [], [], [], None
        for task in tasks:  # per row: condition images for the VL encoder, VAE images, prompt encoding
            shown, encoded, sizes = [], [], []
            for ref in task.row.inputs:
                image = inputs[ref.uri]
                cond_w, cond_h = area_size(condition_area, image.width / image.height)
                vae_w, vae_h = area_size(input_area, image.width / image.height)
                shown.append(pipe.image_processor.resize(image, cond_h, cond_w))
                encoded.append(pipe.image_processor.preprocess(image, vae_h, vae_w).unsqueeze(2))
                sizes.append((vae_w, vae_h))
            vae_sizes = vae_sizes or sizes
            vae_columns.append(encoded)
            positive.append(pipe.encode_prompt(task.row.prompt, image=shown, device=device))
            if do_true_cfg:
                negative.append(pipe.encode_prompt(task.row.negative_prompt, image=shown, device=device))
        prompt_embeds, prompt_mask = _pad_text(positive)
        if do_true_cfg:
            negative_embeds, negative_mask = _pad_text(negative)
        # one VAE encode per input slot for all rows (argmax mode: no randomness); one generator per row
        slots = [pipe._encode_vae_image(torch.cat(column).to(device, prompt_embeds.dtype), generator=None)
                 for column in zip(*vae_columns)]
        generators = [torch.Generator("cpu").manual_seed(task.seed) for task in tasks]
        latents, image_latents = pipe.prepare_latents(slots, batch, pipe.transformer.config.in_channels // 4, height,
                                                      width, prompt_embeds.dtype, device, generators)
        scale = pipe.vae_scale_factor * 2
        img_shapes = [[(1, height // scale, width // scale), *[(1, h // scale, w // scale) for w, h in vae_sizes]]] * batch
        config = pipe.scheduler.config
        mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / steps, steps)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
        pipe.scheduler.set_begin_index(0)
        for t in timesteps:
            model_input = torch.cat([latents, image_latents], dim=1)
            timestep = t.expand(batch).to(latents.dtype)

            def predict(embeds, mask, context):
                with pipe.transformer.cache_context(context):
                    out = pipe.transformer(hidden_states=model_input, timestep=timestep / 1000, guidance=None,
                                           encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                                           img_shapes=img_shapes, attention_kwargs={}, return_dict=False)[0]
                return out[:, : latents.size(1)]

            noise = predict(prompt_embeds, prompt_mask, "cond")
            if do_true_cfg:
                uncond = predict(negative_embeds, negative_mask, "uncond")
                combined = uncond + cfg * (noise - uncond)
                noise = combined * (noise.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
            latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
        z_dim = pipe.vae.config.z_dim
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device,
                                                                                                  latents.dtype)
        image = pipe.vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]
        if hasattr(pipe, "maybe_free_model_hooks"):
            pipe.maybe_free_model_hooks()
        return pipe.image_processor.postprocess(image, output_type="pil")
