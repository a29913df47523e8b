"""Edit rows, LoRAs and speed presets in manifests: every file a row names is checked before any
model loads (locally and on a real S3 server), every error naming row, id, field, rule and value."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.manifest import ManifestError, ResolveContext, iter_resolved, render_rows, validate_manifest
from jobs.manifest.read import open_parquet
from qwen_worker.presets import get_preset


def context(model="tiny-edit", **options):
    return ResolveContext(preset=get_preset(model), **options)


def errors_of(path, ctx):
    with pytest.raises(ManifestError) as caught:
        validate_manifest(str(path), ctx)
    return caught.value.errors


def rows_of(path, ctx):
    validate_manifest(str(path), ctx)
    parquet = open_parquet(str(path))
    return [row for resolved in iter_resolved(parquet, str(path), ctx)
            for row in render_rows(resolved, np.flatnonzero(resolved.valid))]


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "product.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "scene.jpg")
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    Image.fromarray(((rng.random((48, 64)) > 0.5) * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    return tmp_path


def manifest(directory, name="m.parquet", **columns):
    n = len(next(iter(columns.values())))
    table = {"id": [f"r{i}" for i in range(n)], "prompt": [f"edit {i}" for i in range(n)], **columns}
    path = directory / name
    pq.write_table(pa.table(table), path)
    return path


def test_input_images_are_resolved_relative_to_the_manifest_and_size_the_output(photos):
    (photos / "briefs").mkdir()
    path = manifest(photos / "briefs", image=["../product.png", None], images=[None, ["../product.png", "../scene.jpg"]])
    first, second = rows_of(path, context())
    assert [ref.uri for ref in first.inputs] == [str(photos / "product.png")]
    assert (first.inputs[0].width, first.inputs[0].height) == (64, 48)
    assert first.inputs[0].version.startswith(f"{(photos / 'product.png').stat().st_size}-")
    assert (first.width, first.height) == (64, 64)  # tiny-edit: 64² area at the last input's 4:3, 32-multiples
    assert [ref.uri for ref in second.inputs] == [str(photos / "product.png"), str(photos / "scene.jpg")]
    assert first.prompt == "edit 0"  # edit models get no "Ultra HD, 4K" suffix


def test_every_input_problem_is_a_row_error_before_any_model_loads(photos):
    path = manifest(photos, image=["missing.png", "notes.png", "tiny.png", None, "product.png", None],
                    images=[None, None, None, ["product.png"] * 4, ["scene.jpg"], None])
    assert errors_of(path, context()) == [
        f"row 0 (id 'r0'): `image` must name an existing file ({photos}/missing.png), got: 'missing.png'",
        f"row 1 (id 'r1'): `image` must be an image Pillow opens (PNG, JPEG, WebP, ...) ({photos}/notes.png), "
        "got: 'notes.png'",
        f"row 2 (id 'r2'): `image` must be 16 to 8192 pixels a side (is 12x12) ({photos}/tiny.png), got: 'tiny.png'",
        "row 3 (id 'r3'): `images` must name at most 3 image(s) for model 'tiny-edit', got: "
        "['product.png', 'product.png', 'product.png', 'product.png']",
        "row 4 (id 'r4'): `images` cannot be combined with `image`, got: ['scene.jpg']",
        "row 5 (id 'r5'): `image` is required by model 'tiny-edit' (give `image` or `images`), got: None",
    ]


def test_a_text_to_image_model_refuses_input_images_and_masks(photos):
    path = manifest(photos, image=["product.png"], mask=["mask.png"])
    assert errors_of(path, context("tiny")) == [
        "row 0 (id 'r0'): `image` is not used by model 'tiny' (it takes no input images; edit models such as "
        "qwen-image-edit-2511-df11 do), got: 'product.png'"]


def test_a_mask_needs_one_image_and_a_model_that_inpaints(photos):
    path = manifest(photos, images=[["product.png", "scene.jpg"], None], image=[None, "product.png"],
                    mask=["mask.png", "mask.png"])
    assert errors_of(path, context()) == ["row 0 (id 'r0'): `mask` needs exactly one input image (`image`), got: 'mask.png'"]
    path = manifest(photos, name="q21.parquet", image=["product.png"], mask=["mask.png"])
    assert errors_of(path, context("tiny-2.1")) == [
        "row 0 (id 'r0'): `mask` is not used by model 'tiny-2.1' (inpainting: qwen-image-edit-df11), got: 'mask.png'"]


def test_inputs_on_s3_are_looked_up_in_parallel_and_pinned_to_their_etag(s3_env, s3_bucket, photos):
    bucket = s3_bucket.split("/")[2]
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="briefs/product.png", Body=(photos / "product.png").read_bytes())
    client.put_object(Bucket=bucket, Key="briefs/notes.png", Body=b"hello")
    client.put_object(Bucket=bucket, Key="briefs/m.parquet", Body=b"")
    path = manifest(photos, image=[f"s3://{bucket}/briefs/product.png", f"s3://{bucket}/briefs/notes.png",
                                   f"s3://{bucket}/briefs/gone.png"])
    assert errors_of(path, context()) == [
        f"row 1 (id 'r1'): `image` must be an image Pillow opens (PNG, JPEG, WebP, ...), got: 's3://{bucket}/briefs/notes.png'",
        f"row 2 (id 'r2'): `image` must name an existing object, got: 's3://{bucket}/briefs/gone.png'"]
    good = manifest(photos, name="good.parquet", image=[f"s3://{bucket}/briefs/product.png"])
    [row] = rows_of(good, context())
    etag = client.head_object(Bucket=bucket, Key="briefs/product.png")["ETag"].strip('"')
    assert (row.inputs[0].version, row.inputs[0].width, row.inputs[0].height) == (etag, 64, 48)


def test_lora_files_are_checked_from_their_header(photos):
    from qwen_worker.lora.builtin import write_builtin_lora

    write_builtin_lora(photos / "brand.safetensors", "brand-x", "tiny")
    write_builtin_lora(photos / "edit-brand.safetensors", "brand-x", "tiny-2.1")  # another family's layers
    (photos / "broken.safetensors").write_bytes(b"\x00" * 4)
    path = manifest(photos, lora=["brand.safetensors:0.8", "edit-brand.safetensors", "broken.safetensors",
                                  "missing.safetensors", "brand.safetensors:much"])
    errors = errors_of(path, context("tiny"))
    assert errors[0] == (
        f"row 1 (id 'r1'): `lora` must be a LoRA for model 'tiny': {photos}/edit-brand.safetensors has key "
        "'transformer_blocks.0.img_mlp.out.alpha' for module 'transformer_blocks.0.img_mlp.out', which this model's "
        "transformer does not have (a LoRA for another model family?), got: 'edit-brand.safetensors'")
    assert errors[1:] == [
        f"row 2 (id 'r2'): `lora` must be a LoRA for model 'tiny': {photos}/broken.safetensors is not a safetensors "
        "file (shorter than 8 bytes), got: 'broken.safetensors'",
        f"row 3 (id 'r3'): `lora` must be readable: {photos}/missing.safetensors does not exist, got: 'missing.safetensors'",
        "row 4 (id 'r4'): `lora` scale after ':' must be a number, got 'much', got: 'brand.safetensors:much'",
    ]
    [row] = rows_of(manifest(photos, name="ok.parquet", lora=["brand.safetensors:0.8"]), context("tiny"))
    assert [(ref.uri, ref.scale) for ref in row.loras] == [(str(photos / "brand.safetensors"), 0.8)]


def test_speed_lightning_adds_its_lora_and_steps_and_refuses_other_steps_or_cfg(photos):
    path = manifest(photos, speed=["lightning-8", "lightning-4", "lightning-8", None, "turbo"],
                    steps=pa.array([None, None, 20, None, None], pa.int64()),
                    true_cfg_scale=pa.array([None, None, None, 4.0, None], pa.float64()))
    errors = errors_of(path, context("tiny", speed="lightning-8"))
    assert errors == [
        "row 2 (id 'r2'): `steps` must be 8 under speed lightning-8 (or give this row `speed` standard), got: 20",
        "row 3 (id 'r3'): `true_cfg_scale` must be 1 under speed lightning-8 (Lightning runs without CFG; or give "
        "this row `speed` standard), got: 4.0",
        "row 4 (id 'r4'): `speed` must be one of standard, lightning-8, lightning-4, got: 'turbo'",
    ]
    fine = manifest(photos, name="fine.parquet", speed=["lightning-8", "lightning-4", "standard"])
    eight, four, standard = rows_of(fine, context("tiny"))
    assert (eight.steps, eight.true_cfg_scale, [r.uri for r in eight.loras]) == (8, 1.0, ["builtin:tiny-lightning-8"])
    assert (four.steps, four.speed, [r.uri for r in four.loras]) == (4, "lightning-4", ["builtin:tiny-lightning-4"])
    assert (standard.steps, standard.loras) == (4, ())
    assert eight.shape_key != four.shape_key  # another scheduler, LoRA and step count: another micro-batch


def test_a_model_without_a_known_lightning_lora_says_to_give_one(photos):
    path = manifest(photos, speed=["lightning-8"])
    assert errors_of(path, context("qwen-image-2.1")) == [
        "row 0 (id 'r0'): `speed` needs a Lightning LoRA and model 'qwen-image-2.1' has no known one for lightning-8 "
        "(pass --lightning-lora FILE), got: 'lightning-8'"]


def test_an_editing_template_needs_its_input_images(photos):
    path = manifest(photos, template=["edit-compose-product-scene"] * 2, prompt=[None, None],
                    params=[json.dumps({"placement": "on the table"})] * 2,
                    images=[["product.png", "scene.jpg"], ["product.png"]])
    assert errors_of(path, context()) == [
        "row 1 (id 'r1'): `template`: template 'edit-compose-product-scene' edits 2 input image(s) (`image` / "
        "`images`), the row gives 1, got: 'edit-compose-product-scene'"]


def test_manifest_from_csv_and_jsonl_take_the_image_lora_and_text_columns(tmp_path):
    from click.testing import CliRunner

    from jobs.cli import cli

    (tmp_path / "in.csv").write_text('id,prompt,image,images,lora\na,edit,p.png,,brand.safetensors:0.8\n'
                                     'b,compose,,"p.png;q.png","[""x.safetensors"", ""y.safetensors:0.5""]"\n',
                                     encoding="utf-8")
    (tmp_path / "in.jsonl").write_text('{"id": "c", "prompt": "x", "images": ["p.png"], "text": "SALE"}\n'
                                       '{"id": "d", "prompt": "x", "images": [1, 2]}\n', encoding="utf-8")
    runner = CliRunner()
    assert runner.invoke(cli, ["manifest", "from-csv", str(tmp_path / "in.csv"), str(tmp_path / "a.parquet")]).exit_code == 0
    rows = pq.read_table(tmp_path / "a.parquet").select(["image", "images", "lora"]).to_pylist()
    assert rows == [{"image": "p.png", "images": None, "lora": ["brand.safetensors:0.8"]},
                    {"image": None, "images": ["p.png", "q.png"], "lora": ["x.safetensors", "y.safetensors:0.5"]}]
    result = runner.invoke(cli, ["manifest", "from-jsonl", str(tmp_path / "in.jsonl"), str(tmp_path / "b.parquet")])
    assert result.exit_code == 1
    assert "line 2 (id 'd'): `images` must be a list of strings (or text: a JSON list, or items separated by ';'), " \
           "got: [1, 2]" in str(result.exception)
