"""Text-fidelity OCR figures on this CPU: seconds per megapixel, the scores of right / near-miss /
wrong / text-free images, in Chinese, English and mixed, and rows/s of a tiny job with and without
`--check-text`.

    .venv/bin/python bench/bench_ocr.py [--threads N] [--repeat 3] [--job-rows 48] [--job-size 512]

Images are drawn with Pillow in Debian's fonts-wqy-microhei (apt-get install fonts-wqy-microhei):
two lines of text (the expected string and another line) on a plain background ("clean"), and the
same with noise, a few degrees of rotation, blur and JPEG at quality 50 ("degraded": closer to a
rendered poster than a flat page). Near miss: one character of the expected string changed;
wrong: other text of the same script; none: no text at all. One figure per line.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from text_images import FONT, NO_FONT, draw_text  # noqa: E402

# language -> (expected, near miss, wrong)
CASES = {
    "zh": [("欢迎光临西湖", "欢迎光临东湖", "故宫博物院"), ("断桥残雪", "断桥残云", "长城万里"),
           ("春节快乐", "春节决乐", "上海外滩")],
    "en": [("Night Market", "Night Marker", "Great Wall"), ("Grand Opening", "Brand Opening", "Summer Sale"),
           ("Fresh Coffee", "Fresh Toffee", "Book Store")],
    "mixed": [("西湖 West Lake 夜市", "西湖 Best Lake 夜市", "长城 Great Wall"), ("咖啡 Coffee ¥38", "咖啡 Coffee ¥36", "书店 Books"),
              ("上海 The Bund", "上海 The Bend", "故宫 Palace")],
}  # fmt: skip
OTHER_LINE = "Open 9:00-22:00"


def degrade(image, seed: int):
    import numpy as np
    from PIL import Image, ImageFilter

    rnd = random.Random(seed)
    pixels = np.asarray(image).astype(np.float32)
    pixels += np.random.default_rng(seed).normal(0, 14, pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype("uint8"))
    image = image.rotate(rnd.uniform(-4, 4), resample=Image.BICUBIC, fillcolor=(250, 246, 236))
    image = image.filter(ImageFilter.GaussianBlur(0.9))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=50)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: every core)")
    parser.add_argument("--repeat", type=int, default=3, help="images timed per size (the median is kept)")
    parser.add_argument("--job-rows", type=int, default=48, help="rows of the tiny job run with and without "
                        "--check-text (0: skip)")
    parser.add_argument("--job-size", type=int, default=512, help="that job's image size")
    args = parser.parse_args(argv)
    if not FONT.is_file():
        print(NO_FONT, file=sys.stderr)
        return 1

    import os

    from qwen_worker.textcheck import check_image
    from qwen_worker.textcheck.ocr import engine, read_text

    start = time.perf_counter()
    engine(args.threads)
    read_text(draw_text(["warm up 预热"], 320, 160))  # the models load on first use
    print(f"ocr_load_and_first_read_s {time.perf_counter() - start:.2f}")
    print(f"cpu_cores {os.cpu_count()} threads {args.threads or 'default'}")

    lines = [CASES["mixed"][0][0], OTHER_LINE]
    for size in (512, 1024, 1328):
        per_mp = []
        for n in range(args.repeat):
            image = draw_text(lines, size, size) if n % 2 == 0 else degrade(draw_text(lines, size, size), n)
            reading = read_text(image)
            per_mp.append(reading.seconds / (size * size / 1e6))
        print(f"ocr_s_per_megapixel_{size}x{size} {statistics.median(per_mp):.3f}")

    for style in ("clean", "degraded"):
        for language, triples in CASES.items():
            scores = {"right": [], "near": [], "wrong": [], "none": []}
            for n, (expected, near, wrong) in enumerate(triples):
                for variant, drawn in (("right", [expected, OTHER_LINE]), ("near", [near, OTHER_LINE]),
                                       ("wrong", [wrong, OTHER_LINE]), ("none", [])):
                    image = draw_text(drawn, 1024, 576)
                    if style == "degraded":
                        image = degrade(image, n)
                    scores[variant].append(check_image(image, [expected]).score)
            for variant, values in scores.items():
                print(f"score_{style}_{language}_{variant} mean {statistics.mean(values):.3f} "
                      f"min {min(values):.3f} max {max(values):.3f}")
    if args.job_rows:
        job_throughput(args.job_rows, args.job_size)
    return 0


def job_throughput(rows: int, size: int) -> None:
    """rows/s of a whole tiny job whose prompts carry quoted text, with and without --check-text
    (one worker; OCR runs on the worker beside encoding)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.submit_api import submit_job

    with tempfile.TemporaryDirectory(prefix="bench-ocr-job-") as tmp:
        manifest = f"{tmp}/m.parquet"
        pq.write_table(pa.table({"id": [f"sign-{n:04d}" for n in range(rows)],
                                 "prompt": [f'A shop sign reading "老王面馆 {n}"' for n in range(rows)],
                                 "width": [size] * rows, "height": [size] * rows, "steps": [4] * rows}), manifest)
        for label, options in (("off", {}), ("on", {"check_text": True, "min_text_score": 0.5})):
            started = time.perf_counter()
            outcome = submit_job(manifest, f"{tmp}/out-{label}", model="tiny", workers=1, show_progress=False,
                                 echo=lambda _text: None, **options)
            seconds = time.perf_counter() - started
            print(f"tiny_job_{rows}_rows_{size}x{size}_check_text_{label} {rows / seconds:.2f} rows/s "
                  f"(whole submit {seconds:.1f} s, {outcome.done} done)")


if __name__ == "__main__":
    sys.exit(main())
