"""The command line as a user runs it: exit codes, one-line errors, nothing written on bad input."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import tiny_rows


def qwen_batch(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jobs", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_help_is_instant_and_imports_no_heavy_library():
    code = (
        "import sys, contextlib, io\n"
        "from jobs.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit as e: assert e.code == 0\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'diffusers', 'boto3', 'transformers', 'pyarrow') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_validate_prints_every_error_and_exits_1(write_manifest):
    manifest = write_manifest([{"id": "a", "prompt": "x", "steps": 0}, {"id": "b", "prompt": "y", "width": 1000, "height": 1024}])
    result = qwen_batch("validate", manifest)
    assert result.returncode == 1
    assert result.stderr == (
        "error: 2 error(s) in manifest:\n"
        "row 0 (id 'a'): `steps` must be between 1 and 200, got: 0\n"
        "row 1 (id 'b'): `width` must be a multiple of 16, got: 1000\n"
    )


def test_validate_prints_a_summary(write_manifest):
    result = qwen_batch("validate", write_manifest(tiny_rows(3)), "--model", "tiny")
    assert result.returncode == 0, result.stderr
    assert "OK — 3 rows, 3 images" in result.stdout and "shapes: 32x32 ×3" in result.stdout


def test_bad_manifest_writes_nothing_to_the_output(write_manifest, tmp_path):
    output = tmp_path / "out"
    result = qwen_batch("submit", write_manifest([{"id": "a", "prompt": ""}]), "--output", str(output), "--model", "tiny")
    assert result.returncode == 1
    assert result.stderr == "error: 1 error(s) in manifest:\nrow 0 (id 'a'): `prompt` must not be empty, got: ''\n"
    assert not output.exists()


def test_gpu_model_without_gpu_is_one_clear_line_before_anything_is_written(write_manifest, tmp_path):
    output = tmp_path / "out"
    manifest = write_manifest([{"id": "a", "prompt": "a poster", "aspect_ratio": "16:9"}])
    result = qwen_batch("submit", manifest, "--output", str(output))
    assert result.returncode == 1
    assert result.stderr.startswith("error: model 'qwen-image-df11' needs a CUDA GPU and this machine has none")
    assert "Traceback" not in result.stderr and not output.exists()


def test_bad_device_and_offload_options(write_manifest, tmp_path):
    manifest = write_manifest(tiny_rows(1))
    device = qwen_batch("submit", manifest, "--output", str(tmp_path / "o"), "--model", "tiny", "--device", "gpu")
    assert (device.returncode, device.stderr) == (1, "error: `--device` must be auto, cuda or cpu, got: 'gpu'\n")
    offload = qwen_batch("submit", manifest, "--output", str(tmp_path / "o"), "--model", "tiny", "--offload", "blocks:x")
    assert offload.returncode == 1 and offload.stderr.startswith("error: `--offload` must be auto, none, model or blocks:N")
    assert not (tmp_path / "o").exists()


def test_submit_and_status_exit_codes(ray_session, write_manifest, tmp_path):
    output = tmp_path / "out"
    (output / "images").mkdir(parents=True)
    (output / "images" / "row-001.png").write_bytes(b"not ours")
    manifest = write_manifest(tiny_rows(3))

    partial = qwen_batch("submit", manifest, "--output", str(output), "--model", "tiny", "--no-progress",
                         env={"RAY_ADDRESS": ray_session})

    assert partial.returncode == 3, partial.stderr
    assert "2/3 rows stored (2 rendered now, 0 already done), 1 failed" in partial.stdout
    assert f"1 row(s) failed (row-001); errors are in {output}/results.parquet" in partial.stderr
    status = qwen_batch("status", str(output), "--failed")
    assert status.returncode == 0
    assert "2/3 done, 1 failed, 0 pending" in status.stdout
    assert "row 1 (id 'row-001'): object exists with different content at" in status.stdout
    (output / "images" / "row-001.png").unlink()
    again = qwen_batch("submit", manifest, "--output", str(output), "--model", "tiny", "--no-progress",
                       env={"RAY_ADDRESS": ray_session})
    assert again.returncode == 0, again.stderr
    assert "3/3 rows stored (1 rendered now, 2 already done), 0 failed" in again.stdout
    assert Path(output, "report.html").exists()


def test_status_of_a_directory_without_a_job(tmp_path):
    result = qwen_batch("status", str(tmp_path))
    assert (result.returncode, result.stderr) == (1, f"error: no job found in {tmp_path} (it has no job.json)\n")


REPO = Path(__file__).resolve().parents[2]


def test_the_readme_examples_are_valid(tmp_path):
    manifest = tmp_path / "demo.parquet"
    made = subprocess.run([sys.executable, str(REPO / "examples" / "make_demo_manifest.py"), str(manifest)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    validated = qwen_batch("validate", str(manifest), "--model", "tiny")
    assert validated.returncode == 0 and "OK — 12 rows, 12 images" in validated.stdout
    assert "languages: zh ×8, en ×4" in validated.stdout
    schedule = qwen_batch("schedule", "next", str(REPO / "examples" / "schedule.yaml"), "--count", "12")
    assert schedule.returncode == 0, schedule.stderr
    assert "daily-posters" in schedule.stdout and "weekly-travel-guides" in schedule.stdout


def test_batch_size_is_auto_or_a_number(write_manifest, tmp_path):
    result = qwen_batch("submit", write_manifest(tiny_rows(1)), "--output", str(tmp_path / "o"), "--model", "tiny",
                        "--batch-size", "0")
    assert result.returncode == 2
    assert "Invalid value for '--batch-size': must be auto or a number from 1 to 64, got: 0" in result.stderr
    assert not (tmp_path / "o").exists()
