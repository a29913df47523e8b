"""Editing figures: tiny edit rows/s one at a time (the pipeline's own call, batch 1) vs qwen-batch's
batched editing (one denoising loop over 4 rows), and the validation of 100,000 edit rows whose
input images are on S3 (a real SeaweedFS server; distinct images, looked up in parallel).

    .venv/bin/python bench/bench_edit.py [--rows 100000] [--images 2000]

Prints one figure per line.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def picture(width, height, seed):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def edit_throughput(rows: int = 16, batch: int = 4) -> None:
    import torch

    from qwen_worker.models import family_module, get_preset
    from qwen_worker.models.qwen_image_edit import render_plus_batch
    from qwen_worker.render import ImageTask
    from qwen_worker.rows import InputRef, RenderRow

    preset = get_preset("tiny-edit")
    pipe = family_module(preset.family).build_tiny(preset, seed=0)
    tasks, inputs = [], {}
    for n in range(rows):
        uri = f"/in/{n}.png"
        inputs[uri] = picture(64, 48, n)
        row = RenderRow(row_index=n, id=f"e{n}", prompt=f"make the product red, variant {n}", negative_prompt=" ",
                        width=64, height=64, steps=4, true_cfg_scale=4.0, seed=n, keys=(f"e{n}.png",),
                        inputs=(InputRef(uri, "v", 64, 48),))
        tasks.append(ImageTask(row, 0))
    areas = dict(input_area=preset.input_area, condition_area=preset.condition_area)
    render_plus_batch(pipe, tasks[:1], inputs, **areas)  # warm-up
    started = time.perf_counter()
    for task in tasks:
        render_plus_batch(pipe, [task], inputs, **areas)
    one = rows / (time.perf_counter() - started)
    started = time.perf_counter()
    for start in range(0, rows, batch):
        render_plus_batch(pipe, tasks[start:start + batch], inputs, **areas)
    batched = rows / (time.perf_counter() - started)
    started = time.perf_counter()
    for task in tasks[:4]:
        pipe(image=[inputs[task.row.inputs[0].uri]], prompt=task.row.prompt, negative_prompt=" ", true_cfg_scale=4.0,
             height=64, width=64, num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(task.seed))
    call = 4 / (time.perf_counter() - started)
    print(f"tiny-edit rows/s, batch 1 (qwen-batch's loop, tiny input sizes): {one:.2f}")
    print(f"tiny-edit rows/s, batch {batch} (one denoising loop):           {batched:.2f} ({batched / one:.2f}x)")
    print(f"tiny-edit rows/s, QwenImageEditPlusPipeline call (1 MP VAE inputs): {call:.2f}")


def validate_on_s3(rows: int, images: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.manifest import ResolveContext, validate_manifest
    from qwen_worker.presets import get_preset
    from s3_server import start_s3_server

    with tempfile.TemporaryDirectory() as tmp:
        server = start_s3_server(Path(tmp) / "seaweed")
        try:
            os.environ.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
                              AWS_REGION="us-east-1", AWS_ENDPOINT_URL=server.endpoint)
            client = server.client()
            client.create_bucket(Bucket="photos")
            buffer = io.BytesIO()
            picture(64, 48, 0).save(buffer, format="PNG")
            started = time.perf_counter()
            for n in range(images):
                client.put_object(Bucket="photos", Key=f"products/{n:06d}.png", Body=buffer.getvalue())
            uploaded = time.perf_counter() - started
            path = Path(tmp) / "edits.parquet"
            pq.write_table(pa.table({
                "id": [f"row-{n:07d}" for n in range(rows)],
                "prompt": [f"put product {n % images} on a marble counter" for n in range(rows)],
                "image": [f"s3://photos/products/{n % images:06d}.png" for n in range(rows)],
            }), path)
            started = time.perf_counter()
            summary = validate_manifest(str(path), ResolveContext(preset=get_preset("qwen-image-edit-2511-df11")))
            seconds = time.perf_counter() - started
            print(f"validate {summary.rows:,} edit rows naming {images:,} distinct S3 images: {seconds:.2f} s "
                  f"({summary.rows / seconds:,.0f} rows/s; {images / seconds:,.0f} images looked up/s; "
                  f"upload of the images took {uploaded:.1f} s)")
        finally:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=2_000)
    args = parser.parse_args()
    edit_throughput()
    validate_on_s3(args.rows, args.images)


if __name__ == "__main__":
    main()
