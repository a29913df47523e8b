"""DF11 CPU codec throughput: encode and decode weights/s, and the size against BF16.

    .venv/bin/python bench/bench_df11.py [--weights 64M] [--units 4] [--repeat 1]

The weights are synthetic and seeded: N(0, 0.02) in BF16, like the linear layers of a
transformer block (real Qwen-Image blocks compress to ~66-70 % of BF16). Every decode is
checked bit for bit against the input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qwen_worker.df11.codec import decode_weights, encode_weights  # noqa: E402


def _count(text: str) -> int:
    scale = {"K": 10**3, "M": 2**20, "G": 2**30}
    text = text.strip().upper()
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="64M", help="total weights (e.g. 64M, 1e6)")
    parser.add_argument("--units", type=int, default=4, help="DF11 units the weights are split into")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    total = _count(args.weights)
    per_unit = total // args.units
    rng = np.random.default_rng(0)
    units = []
    for _ in range(args.units):
        # Each unit: two sub-layer weights, as a block holds several linears.
        w = torch.from_numpy(rng.standard_normal(per_unit, dtype=np.float32) * 0.02)
        w = w.to(torch.bfloat16)
        units.append([w[: per_unit // 3], w[per_unit // 3 :]])
    n = per_unit * args.units

    def best(fn):
        """Best wall time and best process CPU time of `repeat` runs (the codec runs on one
        core; CPU time is the steadier figure on a shared machine)."""
        walls, cpus, result = [], [], None
        for _ in range(args.repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            result = fn()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        return min(walls), min(cpus), result

    encode_s, encode_cpu, encoded = best(lambda: [encode_weights(u) for u in units])
    decode_s, decode_cpu, decoded = best(lambda: [decode_weights(e) for e in encoded])
    for u, d in zip(units, decoded):
        original = torch.cat([w.reshape(-1) for w in u]).view(torch.int16)
        if not torch.equal(original, d.view(torch.int16)):
            print("decode mismatch", file=sys.stderr)
            return 1

    df11_bytes = sum(t.numel() * t.element_size() for e in encoded for t in e.values())
    exponent_bytes = sum(e["encoded_exponent"].numel() for e in encoded)
    print(f"weights:      {n:,} in {args.units} units (torch threads: {torch.get_num_threads()})")
    print(f"encode:       {n / encode_s / 1e6:8.1f} M weights/s  ({encode_s:.2f} s wall, "
          f"{n / encode_cpu / 1e6:.1f} M/s per CPU second)")
    print(f"decode:       {n / decode_s / 1e6:8.1f} M weights/s  ({decode_s:.2f} s wall, "
          f"{n / decode_cpu / 1e6:.1f} M/s per CPU second)")
    print(f"size:         {df11_bytes / (2 * n) * 100:8.2f} % of BF16 "
          f"({df11_bytes / n * 8:.2f} bits/weight, exponent {exponent_bytes / n * 8:.2f} bits)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
