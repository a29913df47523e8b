"""Whole jobs of the newer families, LoRAs and speed presets on the real tiny builds and the session's
Ray: editing with input images (local and on S3), inpainting, Qwen-Image-2.1's RGBA, LoRA rows
grouped by set, Lightning, DF11 through the codec, a changed input re-rendered alone on resume."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import ledger_rows
from jobs.submit_api import submit_job
from qwen_worker.encode import read_provenance


def run(manifest, output, model, **options):
    options.setdefault("shard_size", 4)
    return submit_job(manifest, str(output), model=model, show_progress=False, echo=lambda _: None, **options)


def photo(path, width=64, height=48, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    directory = tmp_path / "photos"
    directory.mkdir()
    for n in range(3):
        photo(directory / f"p{n}.png", seed=n)
    Image.fromarray(((np.random.default_rng(9).random((48, 64)) > 0.5) * 255).astype(np.uint8)).save(directory / "mask.png")
    return directory


def test_an_edit_job_renders_from_input_images_records_their_sha256_and_shows_them(ray_session, write_manifest,
                                                                                   tmp_path, photos):
    import hashlib

    rows = [{"id": "one", "prompt": "make it red", "image": str(photos / "p0.png")},
            {"id": "two", "prompt": "put picture 1 into picture 2", "images": [str(photos / "p1.png"), str(photos / "p2.png")]},
            {"id": "inpaint", "prompt": "fill with flowers", "image": str(photos / "p0.png"), "mask": str(photos / "mask.png")},
            {"id": "styled", "prompt": "make it blue", "image": str(photos / "p1.png"), "width": 32, "height": 32}]
    output = tmp_path / "out"
    outcome = run(write_manifest(rows), output, "tiny-edit")
    assert (outcome.done, outcome.failed) == (4, 0)
    results = {r["id"]: r for r in pq.read_table(output / "results.parquet").to_pylist()}
    digest = hashlib.sha256((photos / "p0.png").read_bytes()).hexdigest()
    assert results["one"]["inputs"] == [str(photos / "p0.png")] and results["one"]["inputs_sha256"] == [digest]
    assert results["two"]["inputs"] == [str(photos / "p1.png"), str(photos / "p2.png")]
    assert results["inpaint"]["inputs"] == [str(photos / "p0.png"), str(photos / "mask.png")]
    assert Image.open(output / "images/one.png").size == (64, 64)  # tiny-edit's area at the input's 4:3
    assert Image.open(output / "images/styled.png").size == (32, 32)
    provenance = read_provenance((output / "images/two.png").read_bytes())
    assert provenance["inputs"][0].startswith(f"{photos / 'p1.png'}@") and len(provenance["inputs_sha256"]) == 2
    assert provenance["prompt"] == "put picture 1 into picture 2"  # no text-to-image suffix for edits
    report = (output / "report.html").read_text()
    assert 'alt="input 1: p1.png"' in report and "../photos/p1.png" in report


def test_a_changed_input_is_rendered_again_alone_on_resume(ray_session, write_manifest, tmp_path, photos):
    rows = [{"id": f"r{n}", "prompt": "edit", "image": str(photos / f"p{n}.png")} for n in range(3)]
    manifest, output = write_manifest(rows), tmp_path / "out"
    assert run(manifest, output, "tiny-edit").done == 3
    before = {n: (output / f"images/r{n}.png").read_bytes() for n in range(3)}
    photo(photos / "p1.png", seed=42)
    os.utime(photos / "p1.png", ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version, even on a coarse clock
    resumed = run(manifest, output, "tiny-edit")
    assert (resumed.skipped, resumed.rendered, resumed.done, resumed.failed) == (2, 1, 3, 0)
    assert (output / "images/r0.png").read_bytes() == before[0] and (output / "images/r2.png").read_bytes() == before[2]
    assert (output / "images/r1.png").read_bytes() != before[1]  # the stale image was replaced
    assert run(manifest, output, "tiny-edit").rendered == 0


def test_an_edit_job_reads_inputs_from_another_s3_bucket(ray_session, s3_env, s3_bucket, write_manifest, tmp_path, photos):
    client = s3_env.client()
    client.create_bucket(Bucket="product-photos")
    client.put_object(Bucket="product-photos", Key="cat/p0.png", Body=(photos / "p0.png").read_bytes())
    rows = [{"id": "s3-edit", "prompt": "make it red", "image": "s3://product-photos/cat/p0.png"}]
    outcome = run(write_manifest(rows), s3_bucket, "tiny-edit")
    assert (outcome.done, outcome.failed) == (1, 0)
    bucket, prefix = s3_bucket[len("s3://"):].split("/", 1)
    stored = client.get_object(Bucket=bucket, Key=f"{prefix}/images/s3-edit.png")["Body"].read()
    assert read_provenance(stored)["inputs"][0].startswith("s3://product-photos/cat/p0.png@")


def test_qwen_image_2_1_renders_rgba_pngs_with_and_without_references(ray_session, write_manifest, tmp_path, photos):
    rows = [{"id": "t2i", "prompt": 'a poster "Hi"', "width": 64, "height": 32},
            {"id": "ref", "prompt": "the same style", "image": str(photos / "p0.png")}]
    output = tmp_path / "out"
    assert run(write_manifest(rows), output, "tiny-2.1").done == 2
    assert Image.open(output / "images/t2i.png").mode == "RGBA" and Image.open(output / "images/t2i.png").size == (64, 32)
    assert Image.open(output / "images/ref.png").mode == "RGBA"


def test_lora_rows_lightning_and_df11_run_as_a_job(ray_session, write_manifest, tmp_path):
    from qwen_worker.lora.builtin import write_builtin_lora

    for brand in ("a", "b", "house"):
        write_builtin_lora(tmp_path / f"brand-{brand}.safetensors", f"brand-{brand}", "tiny")
    rows = [{"id": f"r{n}", "prompt": f"poster {n}", "width": 32, "height": 32,
             "lora": f"brand-{'ab'[n % 2]}.safetensors:0.8", **({"speed": "lightning-8"} if n == 5 else {})}
            for n in range(6)]
    output = tmp_path / "out"
    outcome = run(write_manifest(rows), output, "tiny-df11", lora=(f"{tmp_path / 'brand-house.safetensors'}:0.2",))
    assert (outcome.done, outcome.failed) == (6, 0)
    results = {r["id"]: r for r in pq.read_table(output / "results.parquet").to_pylist()}
    assert results["r1"]["loras"] == [f"{tmp_path / 'brand-b.safetensors'}:0.8", f"{tmp_path / 'brand-house.safetensors'}:0.2"]
    assert results["r5"]["speed"] == "lightning-8" and results["r5"]["steps"] == 8
    assert "builtin:tiny-lightning-8:1" in results["r5"]["loras"]
    assert len(set(results["r1"]["loras_sha256"])) == 2 and all(len(d) == 64 for d in results["r1"]["loras_sha256"])
    job = json.loads((output / "job.json").read_text())
    assert job["render"] == {"lora": [f"{tmp_path / 'brand-house.safetensors'}:0.2"]}  # part of the job's identity


def test_check_text_records_what_was_read_for_every_image(ray_session, write_manifest, tmp_path):
    rows = [{"id": "poster", "prompt": 'a poster with the title "SALE"', "width": 32, "height": 32},
            {"id": "plain", "prompt": "a quiet landscape", "width": 32, "height": 32}]
    output = tmp_path / "out"
    outcome = run(write_manifest(rows), output, "tiny", check_text=True, min_text_score=0.9, max_rerolls=1)
    assert (outcome.done, outcome.failed) == (2, 0)
    records = {r["id"]: r for r in ledger_rows(output)}
    poster = records["poster"]  # noise reads as no text: it scores 0, is re-rolled once, the better kept
    assert poster["text_score"] == [0.0] and poster["text_missing"] == ["SALE"] and poster["rerolls"] == 1
    assert records["plain"]["text_score"] == [] and records["plain"]["rerolls"] == 0  # no quoted text: not checked
    assert not any(Path(output, "rerolls").rglob("*.png"))
    assert json.loads((output / "job.json").read_text())["options"]["check_text"] == {
        "min_score": 0.9, "max_rerolls": 1, "keep_rerolls": False}


def test_an_idle_worker_gets_the_shard_whose_loras_it_already_holds():
    from types import SimpleNamespace

    from jobs.pool import WorkerSlot
    from jobs.runner import RunOptions, ShardWork, _Driver
    from qwen_worker.rows import LoraRef, RenderRow

    def shard(index, *brands):
        row = RenderRow(row_index=index, id=f"r{index}", prompt="p", negative_prompt=" ", width=32, height=32, steps=2,
                        true_cfg_scale=4.0, seed=0, keys=(f"r{index}.png",), loras=tuple(LoraRef(b) for b in brands))
        return ShardWork(index, [row])

    driver = SimpleNamespace(lookahead=[shard(0, "a"), shard(1, "b"), shard(2, "b", "c"), shard(3)],
                             options=RunOptions())
    holds_b = WorkerSlot(actor=None, name="w", loras={"b", "c"})
    fresh = WorkerSlot(actor=None, name="v")
    assert _Driver.by_affinity(driver, holds_b).shard_index == 2  # both of its adapters are loaded there
    assert _Driver.by_affinity(driver, fresh).shard_index == 3  # nothing to load beats loading one
    driver.options = RunOptions(affinity=False)
    assert _Driver.by_affinity(driver, holds_b).shard_index == 0  # without affinity: the oldest
