"""GPU checks of the newer families and of LoRAs on DF11 (skipped without CUDA; run by
tests/gpu/run_gpu_checks.sh, which installs the `gpu` extra):

1. A real-width Qwen-Image-2.1 block (4096 wide, random BF16 weights) compressed by our codec
   decodes bit for bit through the official dfloat11 GPU decoder, and its forward equals BF16's.
2. LoRAs on DF11: the tiny transformer under dfloat11 (weights decoded per block on the GPU, with
   and without block offload and side-stream prefetch) with a LoRA active through our hooks gives
   exactly the output of the BF16 transformer with the same LoRA.
Nothing is downloaded: every weight is random and every DF11 file is written here.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu/run_gpu_checks.sh)"),
]


def dfloat11_model_class():
    try:
        from dfloat11 import DFloat11Model
    except Exception as exc:
        pytest.fail(f"dfloat11 cannot be imported ({exc.__class__.__name__}: {exc}): pip install -e '.[gpu]'")
    return DFloat11Model


def random_bf16(transformer_class, config: dict, seed: int):
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = transformer_class(**config)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16).cpu().eval()
    torch.cuda.empty_cache()
    return model


def df11_copy(original, directory, transformer_class, config, *, cpu_offload=False, prefetch=False):
    """`original` through our codec's files and dfloat11's GPU loader (what workers run)."""
    from qwen_worker.df11.codec import compress_state_dict, save_df11
    from qwen_worker.models.loading import df11_pattern
    from qwen_worker.real_model import empty_transformer

    tensors, df11_config = compress_state_dict(original.state_dict(), pattern=df11_pattern(original))
    save_df11(directory, tensors, df11_config)
    model = empty_transformer(transformer_class, config)
    dfloat11_model_class().from_pretrained(str(directory), device="cuda", bfloat16_model=model, cpu_offload=cpu_offload,
                                           pin_memory=True)
    if prefetch:
        from qwen_worker.df11.prefetch import enable_prefetch

        assert enable_prefetch(model) > 0
    return model.to("cuda").eval()


def test_a_real_width_qwen_image_2_1_block_decodes_bit_for_bit_and_renders_the_same(tmp_path):
    from diffusers import QwenImage21Transformer2DModel

    config = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=1, attention_head_dim=128,
                  num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56))
    original = random_bf16(QwenImage21Transformer2DModel, config, seed=4)
    df11 = df11_copy(original, tmp_path / "df11", QwenImage21Transformer2DModel, config)
    for name, module in df11.named_modules():
        if hasattr(module, "weight_injection_modules"):
            for hook in list(module._forward_pre_hooks.values()):
                hook(module, ())
            for sub in module.weight_injection_modules:
                sub_name = next(n for n, m in df11.named_modules() if m is sub)
                expected = original.get_submodule(sub_name).weight
                assert torch.equal(sub.weight.cpu().view(torch.int16), expected.view(torch.int16)), sub_name


@pytest.mark.parametrize("cpu_offload, prefetch", [(False, False), (True, False), (True, True)])
def test_lora_on_df11_under_dfloat11_equals_lora_on_bf16(tmp_path, cpu_offload, prefetch):
    from diffusers import QwenImageTransformer2DModel

    from qwen_worker.lora.builtin import builtin_lora_bytes
    from qwen_worker.lora.cache import AdapterCache
    from qwen_worker.lora.hooks import LoraHooks, linear_layers
    from qwen_worker.models.qwen_image import TINY_TRANSFORMER_CONFIG

    original = random_bf16(QwenImageTransformer2DModel, TINY_TRANSFORMER_CONFIG, seed=2)
    df11 = df11_copy(original, tmp_path / "df11", QwenImageTransformer2DModel, TINY_TRANSFORMER_CONFIG,
                     cpu_offload=cpu_offload, prefetch=prefetch)
    bf16 = original.to("cuda")
    linears = linear_layers(bf16)
    adapter = AdapterCache(lambda uri: builtin_lora_bytes(uri, linears), linears, dtype=torch.bfloat16).get("brand")
    generator = torch.Generator("cpu").manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(2, 16, 64, generator=generator).to("cuda", torch.bfloat16),
                  encoder_hidden_states=torch.randn(2, 7, 32, generator=generator).to("cuda", torch.bfloat16),
                  encoder_hidden_states_mask=torch.ones(2, 7, dtype=torch.long, device="cuda"),
                  timestep=torch.full((2,), 0.5, device="cuda"), img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)
    outputs = []
    for model in (bf16, df11):
        LoraHooks(model).activate([(adapter.tensors, 0.8)], key=("brand", 0.8))
        with torch.no_grad():
            outputs.append(model(**kwargs)[0])
    assert torch.equal(outputs[0], outputs[1])
    print(f"\nLoRA on DF11 (offload={cpu_offload}, prefetch={prefetch}) == LoRA on BF16: max |diff| "
          f"{(outputs[0].float() - outputs[1].float()).abs().max().item():.1e}")
