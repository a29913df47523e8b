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
