"""Checks that need a CUDA GPU and the `gpu` extra (dfloat11[cuda12]); skipped without CUDA.
Run them with tests/gpu/run_gpu_checks.sh, which installs the extra and prints the figures.

1. The official dfloat11 loader and CUDA decoder read files written by our encoder
   (qwen_worker.df11.codec) and produce the same weights, bit for bit, as our CPU decoder, on the
   tiny transformer and on one real-width Qwen-Image block (3072 hidden, 24 heads x 128, 340 M
   weights); a DF11 forward equals the BF16 forward, with and without block offload.
2. The offload plan keeps a real-width 60-block transformer (random weights, DF11 by our encoder)
   under a 24 GB card's memory (torch.cuda.set_per_process_memory_fraction) for a 1328x1328 forward,
   and its peak estimate is not below what is measured. Prints peak GB and s/step per case.

Nothing is downloaded: every weight is random and every DF11 file is written here.
"""

import gc
import os
import time

import pytest
import torch

from qwen_worker.models.qwen_image import TINY_TRANSFORMER_CONFIG

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu/run_gpu_checks.sh)"),
]

GIB = 2**30
CONTEXT_GB = 0.5  # what the CUDA context of a process takes on a consumer card, outside torch's allocator
QWEN_IMAGE_CONFIG = dict(  # Qwen/Qwen-Image transformer/config.json
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
TINY_CONFIG = TINY_TRANSFORMER_CONFIG


def dfloat11_model_class():
    """The official loader; a clear failure (not a skip) when CUDA is there but the extra is not."""
    try:
        from dfloat11 import DFloat11Model
    except Exception as exc:
        pytest.fail(f"dfloat11 cannot be imported ({exc.__class__.__name__}: {exc}): pip install -e '.[gpu]'")
    return DFloat11Model


def release_gpu():
    """Drop dfloat11's shared decode buffer and cached blocks between cases."""
    try:
        import dfloat11.dfloat11 as official

        official.TensorManager._tensors.clear()
    except Exception:
        pass
    gc.collect()
    torch.cuda.empty_cache()


def empty_bf16(config: dict):
    """The transformer with uninitialised BF16 weights on the CPU (as qwen_worker.real_model builds it)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        model = QwenImageTransformer2DModel(**config)
    torch.nn.Module.to(model, dtype=torch.bfloat16)
    return model.to_empty(device="cpu").eval()


def random_bf16(config: dict, seed: int):
    """The transformer with random BF16 weights, built on the GPU, kept on the CPU. Linear weights
    are N(0, 0.02): their exponents compress like trained ones (~2.6 bits), unlike uniform inits."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = QwenImageTransformer2DModel(**config)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16).cpu().eval()
    torch.cuda.empty_cache()
    return model


def inputs(config: dict, *, batch: int, height: int, width: int, text_tokens: int, seed: int = 0):
    """Transformer inputs as QwenImagePipeline makes them (packed latents, prompt embeddings, t/1000)."""
    g = torch.Generator("cpu").manual_seed(seed)
    h, w = height // 16, width // 16  # VAE /8, then 2x2 patches
    hidden = torch.randn(batch, h * w, config["in_channels"], generator=g).to("cuda", torch.bfloat16)
    text = torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g).to("cuda", torch.bfloat16)
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=text,
        encoder_hidden_states_mask=torch.ones(batch, text_tokens, dtype=torch.long, device="cuda"),
        timestep=torch.full((batch,), 0.5, device="cuda"),
        img_shapes=[[(1, h, w)]] * batch,
        return_dict=False,
    )


def decode_unit_officially(module) -> list[torch.Tensor]:
    """Run the official decode hook of one DF11 unit; its weights, copied (the buffer is shared)."""
    for hook in list(module._forward_pre_hooks.values()):
        hook(module, ())
    return [sub.weight.detach().clone() for sub in module.weight_injection_modules]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.cpu().contiguous().view(torch.int16), b.cpu().contiguous().view(torch.int16))


# --------------------------------------------------------------------------- 1. bit for bit


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_official_loader_reads_our_tiny_transformer_bit_for_bit(tmp_path, cpu_offload):
    from qwen_worker.df11.codec import compress_state_dict, decompress_state_dict, load_df11_state_dict, save_df11

    DFloat11Model = dfloat11_model_class()
    original = random_bf16(TINY_CONFIG, seed=1)
    compressed, config = compress_state_dict(original.state_dict())
    save_df11(tmp_path / "df11", compressed, config)

    tensors, df11_config = load_df11_state_dict(tmp_path / "df11")
    ours = decompress_state_dict(tensors, df11_config, shapes=original.state_dict())
    model = empty_bf16(TINY_CONFIG)
    DFloat11Model.from_pretrained(
        str(tmp_path / "df11"), device="cuda", bfloat16_model=model, cpu_offload=cpu_offload, pin_memory=True
    )
    units = {name: m for name, m in model.named_modules() if hasattr(m, "weight_injection_modules")}
    assert sorted(units) == ["transformer_blocks.0", "transformer_blocks.1"]
    pattern = df11_config["pattern_dict"][r"transformer_blocks\.\d+"]
    for name, module in units.items():
        official = decode_unit_officially(module)
        for attr, weight in zip(pattern, official):
            key = f"{name}.{attr}.weight"
            assert same_bits(weight, ours[key]), key
            assert same_bits(weight, original.state_dict()[key]), key

    release_gpu()
    args = inputs(TINY_CONFIG, batch=2, height=64, width=64, text_tokens=7)
    with torch.inference_mode():
        got = model(**args)[0]
        expected = original.to("cuda")(**args)[0]
    assert torch.equal(got, expected)
    del model, original
    release_gpu()


@pytest.fixture(scope="module")
def real_width(tmp_path_factory):
    """One real-width block with random weights, DF11 by our encoder: a 1-block checkpoint, and a
    60-block one whose blocks all hold that block's tensors (same sizes as Qwen-Image-DF11)."""
    from qwen_worker.df11.codec import compress_state_dict, save_df11

    root = tmp_path_factory.mktemp("real-width")
    one_config = {**QWEN_IMAGE_CONFIG, "num_layers": 1}
    original = random_bf16(one_config, seed=2)
    state = original.state_dict()
    started = time.perf_counter()
    compressed, config = compress_state_dict(state)
    encode_s = time.perf_counter() - started
    weights = sum(v.numel() for k, v in compressed.items() if k.endswith(".sign_mantissa"))
    print(f"\n[df11] our encoder: {weights / 1e6:.0f} M weights in {encode_s:.1f} s")
    save_df11(root / "one", compressed, config)

    sixty = {}
    for name, tensor in compressed.items():
        if name.startswith("transformer_blocks.0."):
            for i in range(QWEN_IMAGE_CONFIG["num_layers"]):
                sixty[f"transformer_blocks.{i}.{name[len('transformer_blocks.0.'):]}"] = tensor
        else:
            sixty[name] = tensor
    save_df11(root / "sixty", sixty, config, max_shard_bytes=4 * GIB)
    size = sum(p.stat().st_size for p in (root / "sixty").glob("*.safetensors"))
    print(f"[df11] 60-block checkpoint: {size / 1e9:.2f} GB (Qwen-Image-DF11: 28.43 GB)")
    del sixty
    gc.collect()
    return {"one": root / "one", "sixty": root / "sixty", "state": state, "config": config}


def test_official_decoder_matches_ours_on_a_real_width_block(real_width):
    from qwen_worker.df11.codec import decompress_state_dict, load_df11_state_dict

    DFloat11Model = dfloat11_model_class()
    model = empty_bf16({**QWEN_IMAGE_CONFIG, "num_layers": 1})
    DFloat11Model.from_pretrained(str(real_width["one"]), device="cuda", bfloat16_model=model)
    official = decode_unit_officially(model.transformer_blocks[0])

    tensors, df11_config = load_df11_state_dict(real_width["one"])
    started = time.perf_counter()
    ours = decompress_state_dict(tensors, df11_config, shapes=real_width["state"])
    print(f"\n[df11] our CPU decoder: one block in {time.perf_counter() - started:.1f} s")
    pattern = df11_config["pattern_dict"][r"transformer_blocks\.\d+"]
    assert len(official) == len(pattern) == 14
    for attr, weight in zip(pattern, official):
        key = f"transformer_blocks.0.{attr}.weight"
        assert same_bits(weight, ours[key]), key
        assert same_bits(weight, real_width["state"][key]), key
    del model, official
    release_gpu()


# --------------------------------------------------------------------------- 2. memory under a plan


@pytest.mark.parametrize(
    ("card_gb", "images"),
    [(24, 1), (24, 4), (32, 1)],
    ids=["24GB-1image", "24GB-4images", "32GB-1image"],
)
def test_offload_plan_keeps_a_real_width_stack_within_the_card(real_width, card_gb, images):
    from qwen_worker.offload import available_host_ram_gb, choose_offload_plan
    from qwen_worker.presets import PRESETS

    DFloat11Model = dfloat11_model_class()
    total_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    if total_gb < card_gb:
        pytest.skip(f"this GPU has {total_gb:.1f} GB, less than the {card_gb} GB card to emulate")
    release_gpu()
    usable_gb = card_gb - CONTEXT_GB
    torch.cuda.set_per_process_memory_fraction(usable_gb / total_gb, 0)
    try:
        free_gb = usable_gb - torch.cuda.memory_reserved(0) / GIB
        plan = choose_offload_plan(
            "auto",
            preset=PRESETS["qwen-image-df11"],
            free_vram_gb=free_gb,
            host_ram_gb=available_host_ram_gb(),
            images_per_call=images,
        )
        print(f"\n[plan] {card_gb} GB card, {images} image(s) of 1328x1328: {plan.describe()}")

        model = empty_bf16(QWEN_IMAGE_CONFIG)
        started = time.perf_counter()
        DFloat11Model.from_pretrained(
            str(real_width["sixty"]), device="cpu", bfloat16_model=model, **plan.dfloat11_options()
        )
        model.to("cuda")  # what model CPU offload does when the transformer's turn comes
        load_s = time.perf_counter() - started
        args = inputs(QWEN_IMAGE_CONFIG, batch=images, height=1328, width=1328, text_tokens=256)
        torch.cuda.reset_peak_memory_stats(0)
        with torch.inference_mode():
            model(**args)  # warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
            steps = 2
            for _ in range(steps):
                model(**args)  # prompt
                model(**args)  # negative prompt (true CFG runs the transformer twice per step)
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - started) / steps
        peak_gb = torch.cuda.max_memory_allocated(0) / GIB
        reserved_gb = torch.cuda.max_memory_reserved(0) / GIB
        print(
            f"[measured] {plan.label}: peak {peak_gb:.2f} GB allocated / {reserved_gb:.2f} GB reserved "
            f"(plan estimate {plan.expected_peak_vram_gb:.2f} GB, card budget {usable_gb:.1f} GB), "
            f"{step_s:.2f} s/step with CFG, load {load_s:.0f} s"
        )
        assert reserved_gb <= usable_gb
        assert peak_gb <= plan.expected_peak_vram_gb + 0.5, "the plan under-estimates the transformer stage"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        model = None
        release_gpu()


# --------------------------------------------------------------------------- 3. the loader's GPU path


@pytest.mark.parametrize("offload", ["none", "model", "blocks:1"])
def test_load_real_pipeline_renders_on_the_gpu_with_dfloat11_as_bf16_does(tmp_path, offload):
    """qwen_worker.real_model's GPU path (dfloat11 + the plan + model CPU offload) on the tiny
    pipeline saved to disk with its transformer in DF11: the same image as the BF16 pipeline."""
    from dataclasses import replace

    import numpy as np

    from qwen_worker.df11.codec import compress_state_dict, save_df11
    from qwen_worker.presets import PRESETS
    from qwen_worker.real_model import load_real_pipeline
    from qwen_worker.models.qwen_image import build_tiny_pipeline

    dfloat11_model_class()
    reference = build_tiny_pipeline(seed=0, dtype=torch.bfloat16)
    base = tmp_path / "pipeline"
    reference.save_pretrained(base)
    for weights in (base / "transformer").glob("*.safetensors"):
        weights.unlink()
    compressed, config = compress_state_dict(reference.transformer.state_dict())
    save_df11(base / "df11", compressed, config)
    preset = replace(PRESETS["tiny"], name="gpu-tiny-df11", base_repo="t/base", df11_repo="t/df11", needs_cuda=True, builtin=False)

    pipe = load_real_pipeline(preset, model_dir=str(base), offload=offload, device="cuda")
    assert pipe.qwen_batch_offload_plan.label == offload

    def render(p):
        generator = torch.Generator("cpu").manual_seed(7)
        return p(prompt=["a poster 香港"], negative_prompt=[" "], true_cfg_scale=4.0, width=64, height=64,
                 num_inference_steps=2, generator=[generator], output_type="np").images

    image = render(pipe)
    expected = render(reference.to("cuda"))
    assert np.array_equal(image, expected)
    del pipe, reference
    release_gpu()


@pytest.mark.skipif(not os.environ.get("QWEN_BATCH_MODEL_DIR"), reason="set QWEN_BATCH_MODEL_DIR to a --model-dir of qwen-image-df11")
def test_the_real_qwen_image_df11_renders_with_the_auto_plan():
    """The real model from a local directory (hub layout + df11/): one 1328x1328 image, 4 steps."""
    from qwen_worker.presets import PRESETS
    from qwen_worker.real_model import load_real_pipeline

    release_gpu()
    started = time.perf_counter()
    pipe = load_real_pipeline(PRESETS["qwen-image-df11"], model_dir=os.environ["QWEN_BATCH_MODEL_DIR"])
    load_s = time.perf_counter() - started
    plan = pipe.qwen_batch_offload_plan
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    steps = 4
    image = pipe(prompt=["A bilingual travel guide page for Hong Kong, title \"香港 Hong Kong\""], negative_prompt=[" "],
                 true_cfg_scale=4.0, width=1328, height=1328, num_inference_steps=steps,
                 generator=[torch.Generator("cpu").manual_seed(0)]).images[0]
    render_s = time.perf_counter() - started
    peak_gb = torch.cuda.max_memory_allocated() / GIB
    print(f"\n[real] {plan.describe()}\n[real] load {load_s:.0f} s, {render_s / steps:.1f} s/step, peak {peak_gb:.2f} GB")
    assert image.size == (1328, 1328)
    assert peak_gb <= plan.expected_peak_vram_gb + 0.5
