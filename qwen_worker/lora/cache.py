"""Adapters a worker keeps loaded: parsed once per file, least recently used dropped first when their
tensors exceed a byte budget (host RAM), so a manifest mixing a few brands switches between
micro-batches without reading a file again."""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass

DEFAULT_BUDGET_BYTES = 4 << 30


@dataclass
class Adapter:
    tensors: dict  # module -> (A, B scaled by alpha / rank)
    sha256: str
    nbytes: int


class AdapterCache:
    def __init__(self, read, linears: dict, *, dtype=None, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        """`read(uri) -> bytes` reads a LoRA file; `linears` are the transformer's Linear layers."""
        self.read, self.linears, self.dtype, self.budget = read, linears, dtype, budget_bytes
        self.adapters: collections.OrderedDict[str, Adapter] = collections.OrderedDict()
        self.loads = 0  # files read and parsed (a hit costs none)

    def get(self, uri: str) -> Adapter:
        adapter = self.adapters.get(uri)
        if adapter is not None:
            self.adapters.move_to_end(uri)
            return adapter
        adapter = self._load(uri)
        self.adapters[uri] = adapter
        self.loads += 1
        while len(self.adapters) > 1 and sum(a.nbytes for a in self.adapters.values()) > self.budget:
            self.adapters.popitem(last=False)
        return adapter

    def holds(self) -> list[str]:
        """URIs of the adapters loaded now (for the driver's affinity)."""
        return list(self.adapters)

    def _load(self, uri: str) -> Adapter:
        from safetensors.torch import load

        from qwen_worker.errors import UserError
        from qwen_worker.lora.format import LoraFormatError, adapter_tensors

        data = self.read(uri)
        try:
            tensors = adapter_tensors(load(data), self.linears, dtype=self.dtype)
        except LoraFormatError as exc:
            raise UserError(f"LoRA {uri} {exc}") from None
        except Exception as exc:  # not a safetensors file after all
            raise UserError(f"LoRA {uri} cannot be read as safetensors: {exc}") from None
        nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in tensors.values())
        return Adapter(tensors, hashlib.sha256(data).hexdigest(), nbytes)
