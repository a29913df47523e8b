"""Benchmarks for the submit path (tiny model, CPU). Prints figures; asserts nothing.

  python bench/bench_submit.py [--rows 200] [--size 64] [--steps 4] [--validate-rows 1000000] [--s3]

1. rows/s of the full `submit` path (Ray actor, micro-batches, store, ledger, results) vs a bare loop
   calling the same pipeline and writing the same PNG files, and the ratio (start-up excluded and
   reported separately);
2. tiny-model rows/s at batch 1, 2, 4, 8 and the ratio to batch 1;
3. validate time and peak RSS for a generated manifest of --validate-rows rows (in a subprocess);
4. with --s3: rows/s into SeaweedFS vs into a local dir, and with injected faults.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def write_manifest(path: Path, rows: int, size: int, steps: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = ["a bilingual travel guide page 香港", "a luxury perfume ad", "官方通知 标题", "a restaurant menu"]
    pq.write_table(
        pa.table(
            {
                "id": [f"row-{n:06d}" for n in range(rows)],
                "prompt": [f"{prompts[n % 4]} #{n}" for n in range(rows)],
                "width": pa.array([size] * rows, pa.int64()),
                "height": pa.array([size] * rows, pa.int64()),
                "steps": pa.array([steps] * rows, pa.int64()),
            }
        ),
        path,
    )
    return str(path)


def bare_loop(manifest: str, out: Path, batch_size: int) -> float:
    """The same rows through the same pipeline and PNG encoder, no Ray, no store, no ledger."""
    import numpy as np

    from jobs.manifest import ResolveContext, iter_resolved, open_parquet, render_rows
    from qwen_worker.encode import encode_image
    from qwen_worker.presets import get_preset
    from qwen_worker.render import micro_batches, render_batch
    from qwen_worker.models.qwen_image import build_tiny_pipeline

    import torch

    torch.set_num_threads(1)  # like a Ray actor with num_cpus=1 (Ray sets OMP_NUM_THREADS=1)
    pipe = build_tiny_pipeline()
    context = ResolveContext(preset=get_preset("tiny"))
    rows = [row for resolved in iter_resolved(open_parquet(manifest), manifest, context)
            for row in render_rows(resolved, np.flatnonzero(resolved.valid))]
    render_batch(pipe, next(micro_batches(rows[:1], 1)))  # warm-up, like the actor's first call
    (out / "images").mkdir(parents=True)
    started = time.perf_counter()
    for tasks in micro_batches(rows, batch_size):
        for task, image in zip(tasks, render_batch(pipe, tasks)):
            (out / task.key).write_bytes(encode_image(image, "png"))  # the same PNG settings as the workers
    return len(rows) / (time.perf_counter() - started)


def submit_rate(manifest: str, output: str, rows: int, batch_size: int) -> tuple[float, float]:
    """(rows/s after the first row is stored, seconds until then) for the full submit path."""
    from jobs.submit_api import submit_job

    started = time.perf_counter()
    first_row_at = []

    def echo(_text):
        pass

    import jobs.progress

    original = jobs.progress.ProgressBar.update

    def timed_update(self, **kwargs):
        if not first_row_at:
            first_row_at.append(time.perf_counter())
        return original(self, **kwargs)

    jobs.progress.ProgressBar.update = timed_update
    try:
        outcome = submit_job(manifest, output, model="tiny", batch_size=batch_size, show_progress=False, echo=echo)
    finally:
        jobs.progress.ProgressBar.update = original
    ended = time.perf_counter()
    assert outcome.done == rows, outcome
    return (rows - 1) / (ended - first_row_at[0]), first_row_at[0] - started


def batch_sizes(size: int, steps: int) -> None:
    from qwen_worker.render import ImageTask, render_batch
    from qwen_worker.rows import RenderRow
    from qwen_worker.models.qwen_image import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    rows = [RenderRow(i, f"r{i}", f"prompt {i}", " ", size, size, steps, 4.0, i, (f"k{i}",)) for i in range(32)]
    render_batch(pipe, [ImageTask(rows[0], 0)])
    base = None
    for batch in (1, 2, 4, 8):
        started = time.perf_counter()
        for start in range(0, 32, batch):
            render_batch(pipe, [ImageTask(row, 0) for row in rows[start : start + batch]])
        rate = 32 / (time.perf_counter() - started)
        base = base or rate
        print(f"  batch {batch}: {rate:7.1f} rows/s  ({rate / base:.2f}x batch 1)")


VALIDATE_SCRIPT = """
import sys, time
from jobs.manifest import ResolveContext, validate_manifest
from qwen_worker.presets import get_preset
started = time.perf_counter()
summary = validate_manifest(sys.argv[1], ResolveContext(preset=get_preset("qwen-image-df11")))
elapsed = time.perf_counter() - started
# VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited across exec)
peak_mb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(f"{summary.rows} {elapsed:.1f} {peak_mb:.0f}")
"""


def validate_large(rows: int, tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "large.parquet"
    chunk = 100_000
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("aspect_ratio", pa.string()), ("seed", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            writer.write_table(pa.table({
                "id": [f"page-{i:08d}" for i in range(start, start + n)],
                "prompt": [f"Travel guide page {i}, title \"香港 Hong Kong\"" for i in range(start, start + n)],
                "aspect_ratio": ["16:9"] * n,
                "seed": list(range(start, start + n)),
            }, schema=schema))
    size_mb = path.stat().st_size / 1e6
    out = subprocess.run([sys.executable, "-c", VALIDATE_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    count, seconds, peak = out.stdout.split()
    print(f"  {int(count):,} rows ({size_mb:.0f} MB Parquet): validate {float(seconds):.1f} s "
          f"({int(count) / float(seconds):,.0f} rows/s), peak RSS {peak} MB")


def start_s3(tmp: Path):
    """A SeaweedFS server with the AWS environment pointing at it (before Ray starts, so the
    workers inherit the credentials)."""
    from s3_server import start_s3_server

    server = start_s3_server(tmp / "seaweed")
    os.environ.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
                      AWS_REGION="us-east-1", AWS_ENDPOINT_URL=server.endpoint)
    server.client().create_bucket(Bucket="bench")
    return server


def s3_rates(server, manifest: str, rows: int, batch_size: int) -> None:
    from fault_proxy import FaultProxy

    try:
        clean, _ = submit_rate(manifest, "s3://bench/clean", rows, batch_size)
        proxy = FaultProxy(server.endpoint, seed=3, slowdown=0.10, reset=0.03, drop=0.05).start()
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        faulty, _ = submit_rate(manifest, "s3://bench/faulty", rows, batch_size)
        proxy.stop()
        print(f"  to S3 (SeaweedFS):        {clean:7.1f} rows/s")
        print(f"  to S3 through faults:     {faulty:7.1f} rows/s  (10% 503, 3% resets, 5% dropped responses;"
              f" {sum(proxy.injected.values())} faults; slowdown {clean / faulty:.2f}x)")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--validate-rows", type=int, default=1_000_000)
    parser.add_argument("--s3", action="store_true", help="also measure S3 (SeaweedFS) and a fault run")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        manifest = write_manifest(tmp / "m.parquet", args.rows, args.size, args.steps)
        print(f"tiny model, {args.rows} rows, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, CPU")
        bare = bare_loop(manifest, tmp / "bare", args.batch_size)
        server = start_s3(tmp) if args.s3 else None
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            rate, startup = submit_rate(manifest, str(tmp / "local"), args.rows, args.batch_size)
            print(f"  bare loop (pipeline + PNG files): {bare:7.1f} rows/s")
            print(f"  qwen-batch submit, local dir:     {rate:7.1f} rows/s  ({rate / bare:.2f}x bare; "
                  f"{startup:.1f} s until the first row: actor start + model load)")
            if args.s3:
                print(f"  local dir (same job):     {rate:7.1f} rows/s")
                s3_rates(server, manifest, args.rows, args.batch_size)
        finally:
            ray.shutdown()
        print("micro-batching (tiny model, same shape, 32 rows):")
        batch_sizes(args.size, args.steps)
        if args.validate_rows:
            print("manifest validation:")
            validate_large(args.validate_rows, tmp)


if __name__ == "__main__":
    main()
