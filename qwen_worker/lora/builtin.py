"""LoRAs built in code for the tiny models (`builtin:<name>`): a "brand" adapter and "lightning"
ones, deterministic functions of their name, in the lightx2v key format (lora_down / lora_up /
alpha), so tests and the demo exercise every LoRA path without a file from a hub."""

from __future__ import annotations

import hashlib

BUILTIN_PREFIX = "builtin:"
TINY_RANK = 4
TINY_ALPHA = 2.0  # alpha / rank = 0.5, like Lightning's 8 / 64 != 1
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2",
           "img_mlp.proj", "img_mlp.out")  # fmt: skip


def builtin_lora_tensors(name: str, linears: dict) -> dict:
    """The tensors of builtin LoRA `name` for a transformer whose Linear layers are `linears`
    (name -> (in, out)): every block's attention and image-MLP layers, rank 4."""
    import torch

    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in sorted(linears):
        parts = module.split(".", 2)
        if len(parts) < 3 or parts[0] != "transformer_blocks" or parts[2] not in TARGETS:
            continue
        in_features, out_features = linears[module]
        tensors[f"{module}.lora_down.weight"] = (torch.randn(TINY_RANK, in_features, generator=generator) * 0.3).to(torch.bfloat16)
        tensors[f"{module}.lora_up.weight"] = (torch.randn(out_features, TINY_RANK, generator=generator) * 0.3).to(torch.bfloat16)
        tensors[f"{module}.alpha"] = torch.tensor(TINY_ALPHA)
    return tensors


def builtin_lora_bytes(name: str, linears: dict) -> bytes:
    """The safetensors file of builtin LoRA `name` (what a `builtin:` source reads as)."""
    from safetensors.torch import save

    return save(builtin_lora_tensors(name, linears))


def write_builtin_lora(path, name: str, preset_name: str = "tiny") -> str:
    """Write builtin LoRA `name` for a tiny preset's transformer to `path` (tests, the demo)."""
    from qwen_worker.lora.hooks import linear_layers
    from qwen_worker.models.loading import tiny_transformer

    data = builtin_lora_bytes(name, linear_layers(tiny_transformer(preset_name)))
    with open(path, "wb") as f:
        f.write(data)
    return str(path)
