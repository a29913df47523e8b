"""Applying LoRA adapters beside a transformer's weights, switched per micro-batch without reloading.

One forward hook per targeted nn.Linear adds scale * B(A x) to the layer's output (PEFT's unmerged
order: A first, then B, in the activation's dtype). The hook never reads the layer's weight, so it
works the same on a plain BF16 transformer, on one whose DF11 weights our codec decoded, and under
dfloat11 on a GPU, where each Linear's weight only exists (in a buffer shared by every block) while
its block runs. Adapters are copied to the activation's device and dtype once per active set
(with model CPU offload the transformer moves to the GPU only when it runs).
"""

from __future__ import annotations


def linear_layers(transformer) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every nn.Linear of `transformer` (weights not read)."""
    import torch

    return {name: (module.in_features, module.out_features)
            for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}


class LoraHooks:
    """The adapters active on one transformer. `activate([(adapter, scale), ...])` before a pipeline
    call; an empty list renders the base model exactly (the hooks then return the output untouched)."""

    def __init__(self, transformer):
        import torch

        self.modules = {name: module for name, module in transformer.named_modules()
                        if isinstance(module, torch.nn.Linear)}
        self.handles: dict = {}
        self.active: dict[str, list] = {}  # module -> [(A, B scaled)]
        self.active_key: tuple = ()
        self._placed: dict = {}  # (id of tensor, device, dtype) -> tensor there

    def activate(self, adapters: list[tuple[dict, float]], key: tuple = ()) -> None:
        """Make `adapters` ({module: (A, B)}, scale) the active set; `key` names the set (switching
        to the set already active costs nothing)."""
        if key and key == self.active_key:
            return
        active: dict[str, list] = {}
        for adapter, scale in adapters:
            for name, (a, b) in adapter.items():
                scaled = b if scale == 1.0 else (b.float() * scale).to(b.dtype)
                active.setdefault(name, []).append((a, scaled))
        for name in active:
            self._hook(name)
        self.active, self.active_key = active, key
        self._placed = {}

    def _hook(self, name: str) -> None:
        if name in self.handles:
            return

        def add_lora(_module, inputs, output, name=name):
            deltas = self.active.get(name)
            if not deltas:
                return None
            import torch.nn.functional as F

            x = inputs[0]
            for a, b in deltas:
                output = output + F.linear(F.linear(x, self._place(a, x)), self._place(b, x))
            return output

        self.handles[name] = self.modules[name].register_forward_hook(add_lora)

    def _place(self, tensor, like):
        key = (id(tensor), like.device, like.dtype)
        placed = self._placed.get(key)
        if placed is None:
            placed = self._placed[key] = tensor.to(device=like.device, dtype=like.dtype)
        return placed

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()
        self.handles, self.active, self.active_key, self._placed = {}, {}, (), {}
