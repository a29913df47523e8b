"""Compress a diffusers transformer folder (Qwen-Image, -Edit, -2512, -2.1) into a DF11 folder with our
CPU codec, optionally with LoRAs merged into its weights first (a fixed house style at no
per-forward cost)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from qwen_worker.errors import UserError


def merge_loras(state: dict, specs: list[str]) -> list[str]:
    """Add each LoRA (`source[:scale]`, a local .safetensors file) into the BF16 weights of `state`:
    W += scale * (alpha / rank) * B @ A, computed in float32. Returns one line per LoRA merged."""
    import torch
    from safetensors.torch import load_file

    from qwen_worker.lora.format import LoraFormatError, adapter_tensors
    from qwen_worker.lora.spec import LoraSpecError, resolve_source, split_spec

    linears = {name[: -len(".weight")]: (tensor.shape[1], tensor.shape[0]) for name, tensor in state.items()
               if name.endswith(".weight") and tensor.ndim == 2}
    merged = []
    for spec in specs:
        try:
            source, scale = split_spec(spec)
            path = resolve_source(source, None)
        except LoraSpecError as exc:
            raise UserError(f"--merge-lora {spec!r}: {exc}") from None
        if not Path(path).is_file():
            raise UserError(f"--merge-lora {spec!r}: {path} is not a file")
        try:
            adapter = adapter_tensors(load_file(path), linears)
        except LoraFormatError as exc:
            raise UserError(f"--merge-lora {spec!r}: not a LoRA for this transformer: {path} {exc}") from None
        except Exception as exc:
            raise UserError(f"--merge-lora {spec!r}: cannot read {path} as safetensors: {exc}") from None
        for module, (a, b) in adapter.items():
            weight = state[f"{module}.weight"]
            state[f"{module}.weight"] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
        merged.append(f"{path} x{scale:g} into {len(adapter)} layers")
    return merged


def df11_pattern_for(state: dict, class_name: str) -> dict | None:
    """The DF11 units of a transformer: dfloat11's own pattern for Qwen-Image's class, else each
    block with every Linear in it (None: the codec's Qwen-Image default)."""
    if class_name in ("", "QwenImageTransformer2DModel"):
        return None
    prefix = "transformer_blocks.0."
    layers = sorted(name[len(prefix): -len(".weight")] for name, tensor in state.items()
                    if name.startswith(prefix) and name.endswith(".weight") and tensor.ndim == 2)
    return {r"transformer_blocks\.\d+": layers}


def compress_transformer_dir(transformer_dir: str, out_dir: str, *, max_shard_bytes: int | None = None,
                             merge_lora: list[str] | None = None) -> dict:
    import torch
    from safetensors.torch import load_file

    from qwen_worker.df11.codec import DF11_SUFFIXES, compress_state_dict, save_df11

    source = Path(transformer_dir)
    files = sorted(source.glob("*.safetensors"))
    if not files or not (source / "config.json").exists():
        raise UserError(f"{source} is not a transformer folder (needs config.json and *.safetensors)")
    started = time.perf_counter()
    state = {}
    for path in files:
        state.update(load_file(path))
    not_bf16 = sorted(name for name, tensor in state.items() if tensor.is_floating_point() and tensor.dtype != torch.bfloat16)
    if not_bf16:
        raise UserError(f"{source}: DF11 compresses BF16 weights; {len(not_bf16)} tensor(s) are not, e.g. {not_bf16[0]!r}")
    merged = merge_loras(state, list(merge_lora or []))
    class_name = json.loads((source / "config.json").read_text()).get("_class_name", "")
    bf16_bytes = sum(t.numel() * t.element_size() for t in state.values())
    tensors, config = compress_state_dict(state, pattern=df11_pattern_for(state, class_name))
    save_df11(out_dir, tensors, config, max_shard_bytes=max_shard_bytes)
    df11_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    units = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(DF11_SUFFIXES[0])}
    weights = sum(t.numel() for name, t in state.items() if name not in tensors)
    return {"weights": weights, "units": len(units), "bf16_bytes": bf16_bytes, "df11_bytes": df11_bytes,
            "seconds": time.perf_counter() - started, "merged": merged}
