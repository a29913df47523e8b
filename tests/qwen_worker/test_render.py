"""The tiny pipeline, micro-batching and encoding, without Ray."""

import io

import numpy as np
import pytest
from PIL import Image

from qwen_worker.encode import encode_image
from qwen_worker.render import ImageTask, micro_batches, render_batch
from qwen_worker.rows import RenderRow


def make_row(index, prompt="a poster", *, width=32, height=32, steps=2, cfg=4.0, seed=None, images=1, fmt="png"):
    return RenderRow(
        row_index=index, id=f"r{index}", prompt=prompt, negative_prompt=" ", width=width, height=height,
        steps=steps, true_cfg_scale=cfg, seed=seed if seed is not None else 100 + index,
        keys=tuple(f"images/r{index}-{n}.png" for n in range(images)), format=fmt,
    )


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_micro_batches_group_by_shape_in_first_seen_order_and_split_by_size():
    rows = [make_row(0), make_row(1, width=48), make_row(2, images=3), make_row(3, steps=3), make_row(4)]
    batches = [[(t.row.row_index, t.index) for t in batch] for batch in micro_batches(rows, 3)]
    assert batches == [[(0, 0), (2, 0), (2, 1)], [(2, 2), (4, 0)], [(1, 0)], [(3, 0)]]


def test_image_seeds_follow_the_row_seed():
    row = make_row(0, seed=41, images=3)
    assert [ImageTask(row, n).seed for n in range(3)] == [41, 42, 43]


def test_same_seed_same_bytes_across_pipeline_builds(tiny_pipe):
    from qwen_worker.models.qwen_image import build_tiny_pipeline

    row = make_row(0, "香港 Hong Kong travel guide")
    first = encode_image(render_batch(tiny_pipe, [ImageTask(row, 0)])[0], "png")
    second = encode_image(render_batch(build_tiny_pipeline(seed=0), [ImageTask(row, 0)])[0], "png")
    other_seed = encode_image(render_batch(tiny_pipe, [ImageTask(make_row(0, "香港 Hong Kong travel guide", seed=7), 0)])[0], "png")
    assert first == second
    assert first != other_seed


def test_micro_batched_output_equals_one_by_one(tiny_pipe_fp32):
    tiny_pipe = tiny_pipe_fp32
    rows = [make_row(0, "a short prompt"), make_row(1, "a much longer prompt about a bilingual 旅游 指南 page"), make_row(2, "menu")]
    tasks = [ImageTask(row, 0) for row in rows]
    batched = render_batch(tiny_pipe, tasks)
    alone = [render_batch(tiny_pipe, [task])[0] for task in tasks]
    for together, single in zip(batched, alone):
        # float32 batched matmuls differ in the last bits, so at most one 8-bit level may flip
        difference = np.abs(pixels(together) - pixels(single))
        assert difference.max() <= 1
        assert (difference == 0).mean() > 0.99
    assert np.abs(pixels(batched[0]) - pixels(batched[1])).max() > 10  # different prompts+seeds differ


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_encode_is_deterministic_and_decodable(fmt, pil_format):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    data = encode_image(image, fmt)
    assert data == encode_image(image, fmt)
    decoded = Image.open(io.BytesIO(data))
    assert (decoded.format, decoded.size) == (pil_format, (48, 32))


class RunsOutOfMemoryAbove:
    """The real tiny pipeline behind a GPU-memory limit: a call with more than `limit` prompts
    raises torch's own CUDA out-of-memory error, as a 24 GB card does for too large a batch."""

    def __init__(self, pipe, limit):
        self.pipe, self.limit, self.calls = pipe, limit, []

    def __call__(self, **kwargs):
        import torch

        self.calls.append(len(kwargs["prompt"]))
        if len(kwargs["prompt"]) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.pipe(**kwargs)


def test_a_batch_out_of_gpu_memory_is_retried_in_halves(tiny_pipe):
    from qwen_worker.render import render_splitting_on_oom

    tasks = [ImageTask(make_row(n, f"prompt {n}"), 0) for n in range(5)]
    limited = RunsOutOfMemoryAbove(tiny_pipe, 2)
    images = render_splitting_on_oom(lambda batch: render_batch(limited, batch), tasks)
    assert limited.calls == [5, 2, 3, 1, 2]
    for image, task in zip(images, tasks):
        alone = render_batch(tiny_pipe, [task])[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1


def test_one_image_that_does_not_fit_raises(tiny_pipe):
    import torch

    from qwen_worker.render import render_splitting_on_oom

    with pytest.raises(torch.cuda.OutOfMemoryError, match="CUDA out of memory"):
        render_splitting_on_oom(lambda batch: render_batch(RunsOutOfMemoryAbove(tiny_pipe, 0), batch),
                                [ImageTask(make_row(0), 0)])


@pytest.mark.parametrize(
    "message, fatal",
    [
        ("CUDA error: an illegal memory access was encountered", True),
        ("CUDA error: device-side assert triggered", True),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
        ("shape mismatch", False),
    ],
)
def test_fatal_cuda_errors_are_told_apart(message, fatal):
    from qwen_worker.failures import is_fatal_cuda_error

    assert is_fatal_cuda_error(RuntimeError(message)) is fatal


def test_a_worker_remembers_the_batch_size_that_fit_after_an_out_of_memory_split(tiny_pipe, tmp_path):
    from qwen_worker.actor import RenderWorker

    worker = RenderWorker(model="tiny", output_uri=str(tmp_path / "out"), check_stored=False)
    worker.model.pipe = limited = RunsOutOfMemoryAbove(tiny_pipe, 2)
    rows = [make_row(n, f"prompt {n}") for n in range(12)]
    results = [result for batch in worker.render_shard(rows, batch_size=4) for result in batch]
    assert [r.status.value for r in results] == ["done"] * 12
    # the first batch of 4 runs out of memory and is split; the rest start at the 2 that fit
    assert limited.calls == [4, 2, 2, 2, 2, 2, 2]
    assert worker.fits == {rows[0].shape_key: 2}
