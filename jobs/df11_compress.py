"""Compress a diffusers Qwen-Image transformer folder into a DF11 folder with our CPU codec."""

from __future__ import annotations

import time
from pathlib import Path

from qwen_worker.errors import UserError


def compress_transformer_dir(transformer_dir: str, out_dir: str, *, max_shard_bytes: int | None = None) -> dict:
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
    bf16_bytes = sum(t.numel() * t.element_size() for t in state.values())
    tensors, config = compress_state_dict(state)
    save_df11(out_dir, tensors, config, max_shard_bytes=max_shard_bytes)
    df11_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    units = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(DF11_SUFFIXES[0])}
    weights = sum(t.numel() for name, t in state.items() if name not in tensors)
    return {"weights": weights, "units": len(units), "bf16_bytes": bf16_bytes, "df11_bytes": df11_bytes,
            "seconds": time.perf_counter() - started}
