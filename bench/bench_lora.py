"""LoRA figures on the tiny model: rows/s of a whole job whose manifest interleaves 1, 3 and 5 LoRA
sets (brand adapters, row by row), with and without the driver's affinity, two workers; the cost
of an adapter switch between micro-batches (adapters cached); and, on paper, seconds per image
on 24 GB cards at 50 steps with CFG vs Lightning-8 (FLOPs per forward from the config).

    .venv/bin/python bench/bench_lora.py [--rows 96]

Prints one figure per line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def switch_cost() -> None:
    import torch

    from qwen_worker.lora.builtin import builtin_lora_bytes
    from qwen_worker.lora.cache import AdapterCache
    from qwen_worker.lora.hooks import LoraHooks, linear_layers
    from qwen_worker.models.qwen_image import build_tiny_pipeline

    transformer = build_tiny_pipeline().transformer
    linears = linear_layers(transformer)
    cache = AdapterCache(lambda uri: builtin_lora_bytes(uri, linears), linears, dtype=torch.bfloat16)
    started = time.perf_counter()
    adapters = [cache.get(f"brand-{n}") for n in range(5)]
    load = (time.perf_counter() - started) / 5
    hooks = LoraHooks(transformer)
    started = time.perf_counter()
    for n in range(500):
        adapter = adapters[n % 5]
        hooks.activate([(adapter.tensors, 0.8)], key=(n % 5,))
    switch = (time.perf_counter() - started) / 500
    print(f"LoRA adapter first load (read + parse, tiny): {load * 1000:.2f} ms; switch between cached sets: "
          f"{switch * 1e6:.0f} us")


def job_rates(rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from jobs.submit_api import submit_job
    from qwen_worker.lora.builtin import write_builtin_lora

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for n in range(5):
                write_builtin_lora(tmp / f"brand-{n}.safetensors", f"brand-{n}", "tiny")
            for sets in (1, 3, 5):
                path = tmp / f"m{sets}.parquet"
                pq.write_table(pa.table({"id": [f"r{n}" for n in range(rows)],
                                         "prompt": [f"poster {n}" for n in range(rows)],
                                         "width": [64] * rows, "height": [64] * rows, "steps": [4] * rows,
                                         "lora": [f"brand-{n % sets}.safetensors:0.8" for n in range(rows)]}), path)
                for affinity in (True, False):
                    started = time.perf_counter()
                    outcome = submit_job(str(path), str(tmp / f"out-{sets}-{affinity}"), model="tiny", workers=2,
                                         shard_size=4, batch_size=4, show_progress=False, affinity=affinity,
                                         echo=lambda _: None)
                    seconds = time.perf_counter() - started
                    assert outcome.done == rows
                    print(f"{rows} rows interleaving {sets} LoRA set(s), affinity {'on ' if affinity else 'off'}: "
                          f"{rows / seconds:.2f} rows/s (whole submit, 2 workers)")
    finally:
        ray.shutdown()


def on_paper() -> None:
    from bench_gpu import QWEN_IMAGE_CONFIG, forward_flops

    flops = forward_flops(QWEN_IMAGE_CONFIG, (1328 // 16) ** 2, 128, 1, 60)
    for card, peak in (("RTX 4090", 165), ("RTX 3090", 71), ("L4", 121), ("A10G", 70)):
        per_forward = flops / (0.4 * peak * 1e12)  # at 40 % of the BF16 peak
        print(f"on paper, {card} ({peak} TFLOP/s BF16, 40 % MFU), 1328²: {flops / 1e12:.0f} TFLOPs/forward, "
              f"{100 * per_forward:.0f} s/image at 50 steps + CFG, {8 * per_forward:.0f} s/image at Lightning-8 "
              f"({100 / 8:.1f}x fewer forwards; DF11 offload adds its copies on top)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=96)
    args = parser.parse_args()
    switch_cost()
    on_paper()
    job_rates(args.rows)


if __name__ == "__main__":
    main()
