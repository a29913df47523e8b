"""Validation figures: time and peak RSS of `validate_manifest` on generated manifests, each in a
fresh process (peak RSS = its VmHWM), and the duplicate check with many rows sharing one key.

    .venv/bin/python bench/bench_validate.py [--rows 100000,1000000,5000000] [--dup 20000,200000]

The manifest mixes shapes (width/height and aspect ratios), 10 % template rows (distinct params
per row), 5 % bad rows (spread over several rules) and 20,000 rows sharing one output_key (each
reported against the first). Prints one figure per line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, rows: int, *, shared_key_rows: int = 20_000, bad_fraction: float = 0.05,
             template_fraction: float = 0.10, seed: int = 0) -> None:
    """Write the manifest in row groups of 100k, built with numpy (fast for millions of rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("template", pa.string()), ("params", pa.string()),
                        ("width", pa.int64()), ("height", pa.int64()), ("aspect_ratio", pa.string()),
                        ("steps", pa.int64()), ("output_key", pa.string()), ("campaign", pa.string())])
    prompts = np.array(["a bilingual travel guide page 香港 Hong Kong", "a luxury perfume advertisement",
                        "官方通知 标题 关于春节放假的通知", "a restaurant menu with prices"])
    ratios = np.array(["1:1", "16:9", "9:16", "4:3", "3:4"])
    sizes = np.array([512, 768, 1024, 1328])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            index = np.arange(start, start + n)
            ids = np.char.add("row-", np.char.zfill(index.astype(str), 8))
            is_template = rng.random(n) < template_fraction
            kind = rng.integers(0, 2, n)  # 0: width/height, 1: aspect ratio
            width = np.where(kind == 0, sizes[rng.integers(0, 4, n)], 0)
            height = np.where(kind == 0, sizes[rng.integers(0, 4, n)], 0)
            steps = rng.integers(20, 60, n)
            bad = rng.random(n) < bad_fraction
            which = rng.integers(0, 3, n)
            steps = np.where(bad & (which == 0), 0, steps)  # `steps` out of range
            width = np.where(bad & (which == 1) & (kind == 0), 1000, width)  # not a multiple of 16
            ids = np.where(bad & (which == 2), np.char.add("../", ids), ids)  # unsafe id
            params = [json.dumps({"product_name": f"云雾绿茶 #{i}", "product": "a tea caddy", "price": f"¥{i % 100}.9",
                                  "slogan": "一口春天的味道"}, ensure_ascii=False) if t else None
                      for i, t in zip(index.tolist(), is_template.tolist())]
            output_key = np.where(index < shared_key_rows, "campaign/shared", None)
            table = pa.table({
                "id": pa.array(ids),
                "prompt": pa.array(np.where(is_template, None, np.char.add(prompts[index % 4], np.char.add(" #", index.astype(str)))).tolist(), pa.string()),
                "template": pa.array(np.where(is_template, "product-poster", None).tolist(), pa.string()),
                "params": pa.array(params, pa.string()),
                "width": pa.array(np.where((kind == 0) & ~is_template, width, None).tolist(), pa.int64()),
                "height": pa.array(np.where((kind == 0) & ~is_template, height, None).tolist(), pa.int64()),
                "aspect_ratio": pa.array(np.where((kind == 1) & ~is_template, ratios[index % 5], None).tolist(), pa.string()),
                "steps": pa.array(steps),
                "output_key": pa.array(output_key.tolist(), pa.string()),
                "campaign": pa.array(np.where(index % 2, "spring", "summer")),
            }, schema=schema)
            writer.write_table(table)


RUN = """
import json, sys, time
from jobs.manifest import ManifestError, ResolveContext, validate_manifest
from qwen_worker.presets import get_preset
started = time.perf_counter()
try:
    validate_manifest(sys.argv[1], ResolveContext(preset=get_preset("qwen-image-df11")))
    errors = 0
except ManifestError as exc:
    errors = exc.total
seconds = time.perf_counter() - started
peak = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({"seconds": seconds, "errors": errors, "peak_mb": peak / 1024}))
"""


def measure(path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", RUN, str(path)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000,5000000")
    parser.add_argument("--dup", default="20000,200000")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qb-bench-validate-"))
    for rows in [int(r) for r in args.rows.split(",") if r]:
        path = work / f"m{rows}.parquet"
        started = time.perf_counter()
        generate(path, rows)
        made = time.perf_counter() - started
        figures = measure(path)
        print(f"validate {rows:>9,} rows (10% templates, 5% bad, 20,000 sharing one key): {figures['seconds']:.2f} s, "
              f"{rows / figures['seconds']:,.0f} rows/s, peak RSS {figures['peak_mb']:.0f} MB, "
              f"{figures['errors']:,} errors ({path.stat().st_size / 1e6:.0f} MB file, generated in {made:.0f} s)")
        path.unlink()
    for shared in [int(r) for r in args.dup.split(",") if r]:
        path = work / f"dup{shared}.parquet"
        generate(path, shared, shared_key_rows=shared, bad_fraction=0.0, template_fraction=0.0)
        figures = measure(path)
        print(f"duplicate check, {shared:,} rows sharing one output_key: {figures['seconds']:.2f} s, "
              f"{figures['errors']:,} errors, peak RSS {figures['peak_mb']:.0f} MB")
        path.unlink()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
