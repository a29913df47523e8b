"""Validation figures: time and memory of `validate_manifest` on generated manifests, each in a
fresh process, on one process and on every core (jobs.manifest.parallel), and the duplicate check
with many rows sharing one key. Memory: each process's peak RSS (VmHWM), and the peak of the
processes' summed PSS (shared library pages counted once), sampled every 10 ms in another run.

    .venv/bin/python bench/bench_validate.py [--rows 100000,1000000,5000000] [--dup 20000,200000] [--runs 3]

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
import json, os, resource, sys, threading, time
from jobs.manifest import ManifestError, ResolveContext, validate_manifest
from qwen_worker.presets import get_preset

def pss_kb(pid):  # proportional set size: shared library pages counted once over the processes sharing them
    try:
        return next(int(line.split()[1]) for line in open(f"/proc/{pid}/smaps_rollup") if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0

def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(child) for child in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return found

peak_pss, sampling = [0], sys.argv[3] == "pss"
def sample():
    while sampling:
        peak_pss[0] = max(peak_pss[0], pss_kb(os.getpid()) + sum(pss_kb(child) for child in children(os.getpid())))
        time.sleep(0.01)
if sampling:
    threading.Thread(target=sample, daemon=True).start()
processes = int(sys.argv[2]) if sys.argv[2] != "all" else None
started = time.perf_counter()
try:
    validate_manifest(sys.argv[1], ResolveContext(preset=get_preset("qwen-image-df11")), processes=processes)
    errors = 0
except ManifestError as exc:
    errors = exc.total
seconds = time.perf_counter() - started
sampling = False
peak = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({"seconds": seconds, "errors": errors, "peak_mb": peak / 1024,
                  "helper_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "pss_mb": peak_pss[0] / 1024}))
"""


def measure(path: Path, processes: str, runs: int = 3) -> dict:
    """Median time of `runs` fresh processes, their largest peak RSS (the caller's and a helper's),
    and the peak PSS of all of them together from one more, sampled, run."""
    def once(mode: str) -> dict:
        result = subprocess.run([sys.executable, "-c", RUN, str(path), processes, mode], capture_output=True, text=True,
                                cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode:
            raise SystemExit(result.stderr)
        return json.loads(result.stdout.strip().splitlines()[-1])

    timed = [once("time") for _ in range(runs)]
    figures = sorted(timed, key=lambda f: f["seconds"])[len(timed) // 2]
    figures["peak_mb"] = max(f["peak_mb"] for f in timed)
    figures["helper_peak_mb"] = max(f["helper_peak_mb"] for f in timed)
    figures["pss_mb"] = once("pss")["pss_mb"]
    return figures


def show(figures: dict) -> str:
    helper = f" + {figures['helper_peak_mb']:.0f} MB each helper" if figures["helper_peak_mb"] else ""
    return (f"{figures['seconds']:.2f} s, peak RSS {figures['peak_mb']:.0f} MB{helper}, "
            f"peak PSS of all processes {figures['pss_mb']:.0f} MB, {figures['errors']:,} errors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000,5000000")
    parser.add_argument("--dup", default="20000,200000")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qb-bench-validate-"))
    for rows in [int(r) for r in args.rows.split(",") if r]:
        path = work / f"m{rows}.parquet"
        started = time.perf_counter()
        generate(path, rows)
        made = time.perf_counter() - started
        print(f"validate {rows:>9,} rows (10% templates, 5% bad, 20,000 sharing one key; {path.stat().st_size / 1e6:.0f} MB "
              f"file, generated in {made:.0f} s):")
        for processes, words in (("1", "one process"), ("all", "every core")):
            figures = measure(path, processes, args.runs)
            print(f"  {words:<12} {show(figures)} ({rows / figures['seconds']:,.0f} rows/s)")
        path.unlink()
    for shared in [int(r) for r in args.dup.split(",") if r]:
        path = work / f"dup{shared}.parquet"
        generate(path, shared, shared_key_rows=shared, bad_fraction=0.0, template_fraction=0.0)
        print(f"duplicate check, {shared:,} rows sharing one output_key: {show(measure(path, 'all', args.runs))}")
        path.unlink()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
