"""Overlapping DF11 CPU offload's host-to-GPU copies with compute.

dfloat11 0.5.0's offload (dfloat11/dfloat11.py, `get_hook`'s decode_hook) copies a block's
compressed tensors (encoded exponents, sign/mantissa bytes) to the GPU inside that block's own
forward pre-hook, on the current stream, then decodes them: each offloaded block waits for its own
copy, and the copy engine idles while blocks compute. `enable_prefetch` adds a pre-hook before
dfloat11's on every offloaded block that (1) waits for the copy a previous block started for it on
a side stream and hands the copies over (dfloat11's hook then finds its tensors on the GPU and
copies nothing), and (2) starts the copy of the next offloaded block on the side stream, so it runs
while this block decodes and computes. Host copies must be pinned for the copy to be asynchronous
(the offload plan pins them when there is host RAM for it). Costs one block's compressed tensors of
GPU memory (~0.44 GB for Qwen-Image). Measured by bench/bench_gpu.py.
"""

from __future__ import annotations

import re


def offloaded_units(transformer) -> list:
    """The DF11 units whose compressed tensors live in host RAM, in execution (block) order."""
    units = [(name, module) for name, module in transformer.named_modules() if hasattr(module, "offloaded_tensors")]

    def order(item):
        numbers = re.findall(r"\d+", item[0])
        return [int(n) for n in numbers]

    return [module for _name, module in sorted(units, key=order)]


def enable_prefetch(transformer) -> int:
    """Install the prefetching pre-hooks; returns how many offloaded units they cover (0: nothing
    is offloaded, nothing installed)."""
    import torch

    units = offloaded_units(transformer)
    if not units or not torch.cuda.is_available():
        return 0
    stream = torch.cuda.Stream()
    in_flight: dict[int, tuple[dict, object]] = {}  # id(unit) -> (GPU copies, event)

    def start_copy(unit) -> None:
        if id(unit) in in_flight:
            return
        device = unit.luts.device
        with torch.cuda.stream(stream):
            copies = {name: tensor.to(device, non_blocking=True) for name, tensor in unit.offloaded_tensors.items()}
            event = torch.cuda.Event()
            event.record(stream)
        in_flight[id(unit)] = (copies, event)

    def make_hook(position: int):
        def prefetch_hook(module, _args):
            entry = in_flight.pop(id(module), None)
            if entry is not None:
                copies, event = entry
                current = torch.cuda.current_stream(module.luts.device)
                current.wait_event(event)
                for name, tensor in copies.items():
                    tensor.record_stream(current)  # made on the side stream, freed after use on this one
                    module.register_buffer(name, tensor)
            start_copy(units[(position + 1) % len(units)])  # the next one (wrapping: the next step's first)

        return prefetch_hook

    for position, unit in enumerate(units):
        unit.register_forward_pre_hook(make_hook(position), prepend=True)
    return len(units)
