"""The model families: presets as data, footprints from the real configs, the tiny offline builds of
each family rendering for real, and batched editing against the pipeline's own one-by-one call."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_worker.models import FAMILY_MODULES, PRESETS, family_module, get_preset
from qwen_worker.models.footprint import QWEN_IMAGE, QWEN_IMAGE_21, count_parameters
from qwen_worker.render import ImageTask
from qwen_worker.rows import InputRef, RenderRow


def picture(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def edit_row(index, prompt, inputs, *, width=64, height=64, steps=2, cfg=4.0, negative=" "):
    refs = tuple(InputRef(f"/in/{index}-{n}.png", "v1", image.width, image.height) for n, image in enumerate(inputs))
    return RenderRow(row_index=index, id=f"e{index}", prompt=prompt, negative_prompt=negative, width=width,
                     height=height, steps=steps, true_cfg_scale=cfg, seed=100 + index, keys=(f"e{index}.png",),
                     inputs=refs)


class Model:
    """What a family's render() reads of a LoadedModel."""

    def __init__(self, preset, pipe):
        self.preset, self.pipe = preset, pipe
        companions = getattr(family_module(preset.family), "companion_pipelines", None)
        self.pipes = {"main": pipe, **(companions(preset, pipe) if companions else {})}


@pytest.mark.parametrize("family, counts", [("qwen-image", QWEN_IMAGE), ("qwen-image-2.1", QWEN_IMAGE_21)])
def test_footprint_parameter_counts_are_those_of_the_real_configs(family, counts):
    assert count_parameters(family) == counts


def test_every_preset_has_a_family_module_that_builds_and_renders_it():
    for preset in PRESETS.values():
        module = family_module(preset.family)
        assert preset.family in FAMILY_MODULES and module.FAMILY == preset.family
        assert callable(module.render) and callable(module.build_tiny) and module.pipeline_class(preset).__name__
        if preset.name.endswith("-df11"):
            assert preset.uses_df11
    assert {p.name for p in PRESETS.values() if p.builtin} >= {"tiny", "tiny-df11", "tiny-edit", "tiny-2.1"}


def test_real_edit_presets_resize_inputs_as_diffusers_does():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    for name in ("qwen-image-edit-2509-df11", "qwen-image-edit-2511-df11"):
        preset = get_preset(name)
        assert (preset.input_area, preset.condition_area) == (edit_plus.VAE_IMAGE_SIZE, edit_plus.CONDITION_IMAGE_SIZE)
        # the output size for an input: the pipeline's calculate_dimensions at the last input's aspect ratio
        assert family_module(preset.family).output_size(preset, [(800, 600), (1600, 900)]) == \
            edit_plus.calculate_dimensions(1024 * 1024, 1600 / 900)


@pytest.fixture(scope="module")
def tiny_edit_fp32():
    preset = get_preset("tiny-edit")
    return Model(preset, family_module(preset.family).build_tiny(preset, seed=0, dtype=torch.float32))


def test_batched_editing_equals_one_by_one_within_one_level(tiny_edit_fp32):
    """One denoising loop over a batch of edit rows (at the real models' input sizes) against
    QwenImageEditPlusPipeline's own call per row, in float32."""
    from qwen_worker.models.qwen_image_edit import render_plus_batch

    pipe = tiny_edit_fp32.pipe
    rows = [edit_row(0, "make it red", [picture(48, 48, 1)]),
            edit_row(1, "replace the background with a beach at sunset", [picture(64, 64, 2)], negative="blurry")]
    inputs = {row.inputs[0].uri: picture(48 + 16 * row.row_index, 48 + 16 * row.row_index, row.row_index + 1)
              for row in rows}
    tasks = [ImageTask(row, 0) for row in rows]
    batched = render_plus_batch(pipe, tasks, inputs)  # the real VAE and condition areas (1024², 384²)
    for task, image in zip(tasks, batched):
        alone = pipe(image=[inputs[task.row.inputs[0].uri]], prompt=task.row.prompt,
                     negative_prompt=task.row.negative_prompt, true_cfg_scale=4.0, height=64, width=64,
                     num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(task.seed)).images[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1


def test_tiny_edit_takes_one_to_three_images_and_renders_deterministically():
    preset = get_preset("tiny-edit")
    module = family_module(preset.family)
    model = Model(preset, module.build_tiny(preset, seed=0))
    product, scene = picture(48, 64, 3), picture(64, 64, 4)
    row = edit_row(0, "put the product in the scene", [product, scene])
    inputs = {row.inputs[0].uri: product, row.inputs[1].uri: scene}
    first = module.render(model, [ImageTask(row, 0)], inputs)[0]
    again = module.render(Model(preset, module.build_tiny(preset, seed=0)), [ImageTask(row, 0)], inputs)[0]
    assert first.size == (64, 64) and np.array_equal(pixels(first), pixels(again))
    other = module.render(model, [ImageTask(edit_row(0, "put the product in the scene", [scene, product]), 0)],
                          {row.inputs[0].uri: scene, row.inputs[1].uri: product})[0]
    assert not np.array_equal(pixels(first), pixels(other))  # the inputs matter


def test_tiny_2_1_renders_rgba_with_and_without_reference_images():
    preset = get_preset("tiny-2.1")
    module = family_module(preset.family)
    model = Model(preset, module.build_tiny(preset, seed=0))
    plain = RenderRow(row_index=0, id="p", prompt="a poster", negative_prompt=" ", width=64, height=32, steps=2,
                      true_cfg_scale=1.0, seed=3, keys=("p.png",))
    [image] = module.render(model, [ImageTask(plain, 0)], {})
    assert (image.mode, image.size) == ("RGBA", (64, 32))
    reference = picture(64, 48, 5).convert("RGBA")
    row = RenderRow(row_index=1, id="r", prompt="the same style", negative_prompt=" ", width=64, height=64, steps=2,
                    true_cfg_scale=1.0, seed=3, keys=("r.png",), inputs=(InputRef("/ref.png", "v", 64, 48),))
    [with_reference] = module.render(model, [ImageTask(row, 0)], {"/ref.png": reference})
    assert with_reference.mode == "RGBA" and with_reference.size == (64, 64)


def test_output_size_follows_the_input_aspect_ratio():
    edit, q21 = get_preset("tiny-edit"), get_preset("tiny-2.1")
    assert family_module(edit.family).output_size(edit, [(1600, 900)]) == (96, 64)  # 64² area at 16:9, 32-multiples
    assert family_module(q21.family).output_size(q21, [(900, 1600)]) == (64, 96)
    real = get_preset("qwen-image-edit-df11")  # Edit: the first input; Edit-2509/2511: the last
    assert family_module(real.family).output_size(real, [(1000, 1000), (1600, 900)]) == (1024, 1024)
