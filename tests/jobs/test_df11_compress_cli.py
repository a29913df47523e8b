"""`qwen-batch df11 compress` on a real (tiny) Qwen-Image transformer saved by diffusers."""

import subprocess
import sys

import torch


def test_compress_a_saved_transformer_then_decode_it_bit_exact(tmp_path):
    from diffusers import QwenImageTransformer2DModel

    from qwen_worker.df11.codec import decompress_state_dict, load_df11_state_dict
    from qwen_worker.models.qwen_image import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(3)
    model = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "transformer")

    result = subprocess.run([sys.executable, "-m", "jobs", "df11", "compress", str(tmp_path / "transformer"),
                             str(tmp_path / "df11")], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'df11'}: ") and "compressed in 2 blocks" in result.stdout
    tensors, config = load_df11_state_dict(tmp_path / "df11")
    original = model.state_dict()
    restored = decompress_state_dict(tensors, config, shapes={k: v.shape for k, v in original.items()})
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(restored[name].view(torch.int16), tensor.view(torch.int16)), name


def test_compress_refuses_a_folder_that_is_not_a_transformer(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs", "df11", "compress", str(tmp_path), str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (
        1, f"error: {tmp_path} is not a transformer folder (needs config.json and *.safetensors)\n")


def test_compress_with_a_merged_lora_bakes_it_into_the_weights(tmp_path):
    from diffusers import QwenImageTransformer2DModel

    from qwen_worker.df11.codec import decompress_state_dict, load_df11_state_dict
    from qwen_worker.lora.builtin import TINY_ALPHA, TINY_RANK, builtin_lora_tensors
    from qwen_worker.lora.hooks import linear_layers
    from qwen_worker.models.qwen_image import TINY_TRANSFORMER_CONFIG
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "transformer")
    lora = builtin_lora_tensors("house-style", linear_layers(model))
    save_file(lora, tmp_path / "house.safetensors")

    result = subprocess.run([sys.executable, "-m", "jobs", "df11", "compress", str(tmp_path / "transformer"),
                             str(tmp_path / "df11"), "--merge-lora", f"{tmp_path / 'house.safetensors'}:0.5"],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"merged {tmp_path / 'house.safetensors'} x0.5 into 12 layers\n")
    tensors, config = load_df11_state_dict(tmp_path / "df11")
    original = model.state_dict()
    restored = decompress_state_dict(tensors, config, shapes={k: v.shape for k, v in original.items()})
    name = "transformer_blocks.1.attn.to_q"
    delta = 0.5 * (TINY_ALPHA / TINY_RANK) * lora[f"{name}.lora_up.weight"].float() @ lora[f"{name}.lora_down.weight"].float()
    assert torch.equal(restored[f"{name}.weight"], (original[f"{name}.weight"].float() + delta).to(torch.bfloat16))
    assert torch.equal(restored["transformer_blocks.1.attn.add_q_proj.weight"],
                       original["transformer_blocks.1.attn.add_q_proj.weight"])  # not a LoRA target: untouched


def test_a_lora_of_another_transformer_is_refused_naming_its_key(tmp_path):
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    from qwen_worker.models.qwen_image import TINY_TRANSFORMER_CONFIG

    QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG).to(torch.bfloat16).save_pretrained(tmp_path / "transformer")
    save_file({"transformer_blocks.0.img_mlp.gate_layer.lora_down.weight": torch.zeros(4, 32),
               "transformer_blocks.0.img_mlp.gate_layer.lora_up.weight": torch.zeros(32, 4)}, tmp_path / "other.safetensors")
    result = subprocess.run([sys.executable, "-m", "jobs", "df11", "compress", str(tmp_path / "transformer"),
                             str(tmp_path / "df11"), "--merge-lora", str(tmp_path / "other.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: --merge-lora '{tmp_path / 'other.safetensors'}': not a LoRA for this transformer: "
        f"{tmp_path / 'other.safetensors'} has key 'transformer_blocks.0.img_mlp.gate_layer.lora_down.weight' for module "
        "'transformer_blocks.0.img_mlp.gate_layer', which this model's transformer does not have (a LoRA for another "
        "model family?)\n")
