"""Whole process, start to exit, on one job: `qwen-batch submit` vs the same job written the way Ray
Data's batch-inference docs do it vs a bare single-process loop. Each is a fresh process (Python
start, imports, Ray start, model build, rendering, PNG files, exit), run in turn, `--runs` times;
prints each run and the median, and the ratios. Asserts nothing.

    .venv/bin/python bench/bench_whole.py [--rows 600] [--size 64] [--steps 4] [--batch-size 4] [--runs 3]

The Ray Data way (read_parquet -> map_batches with an actor class, concurrency 1 -> PNG files) needs
Ray Data's own dependencies: `.venv/bin/pip install pandas` (left out of qwen-batch's). Without them
that column is skipped. All three call the same tiny pipeline with the same prompts, sizes, steps,
batch size and PNG encoder, on one worker process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

RAY_DATA = """
import sys
from pathlib import Path

import ray

manifest, out, batch_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True)


class Render:
    def __init__(self):
        import torch

        from qwen_worker.encode import encode_image
        from qwen_worker.models.qwen_image import build_tiny_pipeline

        self.torch, self.encode, self.pipe = torch, encode_image, build_tiny_pipeline()

    def __call__(self, batch):
        n = len(batch["id"])
        images = self.pipe(prompt=list(batch["prompt"]), negative_prompt=[" "] * n, true_cfg_scale=4.0,
                           width=int(batch["width"][0]), height=int(batch["height"][0]),
                           num_inference_steps=int(batch["steps"][0]),
                           generator=[self.torch.Generator("cpu").manual_seed(i) for i in range(n)]).images
        for row_id, image in zip(batch["id"], images):
            (out / f"{row_id}.png").write_bytes(self.encode(image, "png"))
        return {"id": batch["id"]}


ray.init()
ray.data.read_parquet(manifest).map_batches(Render, concurrency=1, batch_size=batch_size, num_cpus=1).materialize()
"""

BARE = """
import sys
from pathlib import Path

sys.path.insert(0, %r)
from bench_submit import bare_loop

bare_loop(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
"""


def commands(manifest: str, out: Path, batch: int, run: int) -> dict[str, list[str]]:
    found = {
        "qwen-batch submit": [str(Path(PYTHON).with_name("qwen-batch")), "submit", manifest, "--output",
                              str(out / f"submit-{run}"), "--model", "tiny", "--workers", "1", "--batch-size",
                              str(batch), "--no-progress"],
        "bare loop": [PYTHON, "-c", BARE % str(ROOT / "bench"), manifest, str(out / f"bare-{run}"), str(batch)],
    }
    if importlib.util.find_spec("pandas") is not None:
        found["Ray Data way"] = [PYTHON, "-c", RAY_DATA, manifest, str(out / f"raydata-{run}"), str(batch)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_submit import write_manifest

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-whole-") as tmp:
        manifest = write_manifest(Path(tmp) / "m.parquet", args.rows, args.size, args.steps)
        print(f"tiny model, {args.rows} rows, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, "
              "one worker, whole process")
        for run in range(args.runs):  # paired: each run has all of them, one after another
            for name, command in commands(manifest, Path(tmp), args.batch_size, run).items():
                started = time.perf_counter()
                done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp)
                elapsed = time.perf_counter() - started
                if done.returncode != 0:
                    raise SystemExit(f"{name} exited {done.returncode}:\n{done.stderr[-3000:]}")
                seconds.setdefault(name, []).append(elapsed)
                print(f"  run {run + 1}: {name}: {elapsed:.1f} s")
    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in median.items():
        print(f"{name}: median {value:.1f} s ({args.rows / value:.1f} rows/s whole process)")
    ours = median["qwen-batch submit"]
    print(f"qwen-batch submit vs bare loop: {median['bare loop'] / ours:.2f}x (above 1: faster)")
    if "Ray Data way" in median:
        print(f"qwen-batch submit vs the Ray Data way: {median['Ray Data way'] / ours:.2f}x")
    else:
        print("the Ray Data way: skipped (pip install pandas into .venv to run it)")


if __name__ == "__main__":
    main()
