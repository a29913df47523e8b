"""LoRA file formats: which Linear of the transformer each tensor belongs to, checked against the
transformer's own layers, from a safetensors header alone (validation) or with the tensors (workers).

Known key formats (what diffusers' QwenImageLoraLoaderMixin reads):
- diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` / `.lora_B.weight`
  (the `transformer.` prefix optional, PEFT's `.default` adapter name allowed), scale 1 unless a
  `.alpha` is given;
- Kohya: `lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- lightx2v (Qwen-Image-Lightning) and ai-toolkit: dotted names with `lora_down` / `lora_up` /
  `.alpha`, bare or under `diffusion_model.`.
A module's delta is (alpha / rank) * B @ A, times the row's scale.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

HEADER_LIMIT = 100 << 20  # a safetensors header larger than this is not a LoRA

_PARTS = (
    (".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"),
    (".lora.down.weight", "A"), (".lora.up.weight", "B"),
    (".alpha", "alpha"),
)  # fmt: skip
_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")
_KOHYA_PREFIX = "lora_unet_"


class LoraFormatError(ValueError):
    """Not a LoRA for this transformer; the message names the first key that does not fit."""


@dataclass(frozen=True)
class LoraLayout:
    """What a LoRA file holds, per target module: rank and whether it has an alpha."""

    modules: dict  # module name -> rank
    tensors: int

    @property
    def rank(self) -> int:
        return max(self.modules.values()) if self.modules else 0


def parse_header(data: bytes) -> dict:
    """The JSON header of a safetensors file from its first bytes (at least 8 + header length)."""
    if len(data) < 8:
        raise LoraFormatError("is not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", data[:8])
    if length <= 1 or length > HEADER_LIMIT:
        raise LoraFormatError("is not a safetensors file (no valid header)")
    if len(data) < 8 + length:
        raise LoraFormatError("is not a safetensors file (its header is cut short)")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError:
        raise LoraFormatError("is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoraFormatError("is not a safetensors file (its header is not a JSON object)")
    return header


def header_length(first8: bytes) -> int:
    """Bytes to read for the whole header, from the file's first 8 bytes."""
    if len(first8) < 8:
        raise LoraFormatError("is not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", first8[:8])
    if length <= 1 or length > HEADER_LIMIT:
        raise LoraFormatError("is not a safetensors file (no valid header)")
    return 8 + length


def module_of(key: str, linears: dict) -> tuple[str | None, str | None]:
    """(module name, part: "A" | "B" | "alpha") of a LoRA key; (None, None) for a key of no known
    format; (name, part) with a name not in `linears` when the format is known but the module is not."""
    for suffix, part in _PARTS:
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            break
    else:
        return None, None
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix) and name not in linears:
                name, stripped = name[len(prefix):], True
    if name.startswith(_KOHYA_PREFIX):
        underscored = name[len(_KOHYA_PREFIX):]
        name = _kohya_table(linears).get(underscored, underscored)
    return name, part


def _kohya_table(linears: dict) -> dict:
    table = getattr(_kohya_table, "_cache", None)
    if table is None or table[0] is not linears:
        table = (linears, {name.replace(".", "_"): name for name in linears})
        _kohya_table._cache = table
    return table[1]


def check_layout(shapes: dict[str, list[int]], linears: dict[str, tuple[int, int]]) -> LoraLayout:
    """Check every tensor of a LoRA file (key -> shape) against the transformer's Linear layers
    (name -> (in_features, out_features)); LoraFormatError naming the first key that does not fit."""
    ranks: dict[str, int] = {}
    pairs: dict[str, dict[str, list[int]]] = {}
    count = 0
    for key in sorted(shapes):
        if key == "__metadata__":
            continue
        count += 1
        name, part = module_of(key, linears)
        if name is None:
            raise LoraFormatError(f"has key {key!r} of no known LoRA format (diffusers/PEFT lora_A/lora_B, "
                                  "Kohya lora_unet_…lora_down/lora_up, lightx2v lora_down/lora_up/alpha)")
        if name not in linears:
            raise LoraFormatError(f"has key {key!r} for module {name!r}, which this model's transformer does not have "
                                  "(a LoRA for another model family?)")
        pairs.setdefault(name, {})[part] = list(shapes[key])
    for name, parts in sorted(pairs.items()):
        in_features, out_features = linears[name]
        if "A" not in parts or "B" not in parts:
            missing = "lora_A/lora_down" if "A" not in parts else "lora_B/lora_up"
            raise LoraFormatError(f"has module {name!r} without its {missing} tensor")
        a, b = parts["A"], parts["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] < 1:
            raise LoraFormatError(f"module {name!r}: down {a} and up {b} are not a LoRA pair (rank x in, out x rank)")
        if a[1] != in_features or b[0] != out_features:
            raise LoraFormatError(
                f"module {name!r}: LoRA is {b[0]}x{a[1]}, the transformer's layer is {out_features}x{in_features} "
                "(a LoRA for another model size or family?)")
        if "alpha" in parts and parts["alpha"] not in ([], [1]):
            raise LoraFormatError(f"module {name!r}: alpha must be one number, got shape {parts['alpha']}")
        ranks[name] = a[0]
    if not ranks:
        raise LoraFormatError("holds no LoRA tensors")
    return LoraLayout(ranks, count)


def layout_from_header(header: dict, linears: dict) -> LoraLayout:
    shapes = {key: value.get("shape", []) for key, value in header.items()
              if key != "__metadata__" and isinstance(value, dict)}
    return check_layout(shapes, linears)


def adapter_tensors(tensors: dict, linears: dict, dtype=None) -> dict:
    """{module: (A, B * alpha / rank)} from a LoRA file's tensors (float32 math, then `dtype`)."""
    import torch

    check_layout({key: list(t.shape) for key, t in tensors.items()}, linears)
    grouped: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name, part = module_of(key, linears)
        grouped.setdefault(name, {})[part] = tensor
    adapter = {}
    for name, parts in grouped.items():
        a, b = parts["A"].float(), parts["B"].float()
        rank = a.shape[0]
        alpha = float(parts["alpha"].float().reshape(-1)[0]) if "alpha" in parts else float(rank)
        b = b * (alpha / rank)
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        adapter[name] = (a.contiguous(), b.contiguous())
    return adapter
