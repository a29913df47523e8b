"""Rendering: group a shard's images by batch key (size, steps, CFG, input slots, LoRA set, speed)
into micro-batches; each family's module renders one micro-batch per call.

With CPU offload every forward streams all transformer blocks to the GPU, so several prompts per
call amortise that transfer. Each image gets its own torch.Generator seeded from its row, so an
image does not depend on which other images share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from qwen_worker.failures import is_out_of_memory
from qwen_worker.rows import RenderRow


@dataclass(frozen=True)
class ImageTask:
    """One image to render: image `index` of `row`; `attempt` > 0 is a re-roll (another seed, derived
    from the image's own) of an image whose text read back too poorly (--check-text)."""

    row: RenderRow
    index: int
    attempt: int = 0

    @property
    def key(self) -> str:
        return self.row.keys[self.index]

    @property
    def seed(self) -> int:
        return reroll_seed(self.row.image_seeds()[self.index], self.attempt)

    @property
    def attempt_key(self) -> str:
        """Where this attempt is kept while (or, with --keep-rerolls, after) its row is re-rolled."""
        stem, dot, ext = self.key.rpartition(".")
        return f"rerolls/{stem}-r{self.attempt}.{ext}" if dot else f"rerolls/{self.key}-r{self.attempt}"


def reroll_seed(seed: int, attempt: int) -> int:
    """The seed of re-roll `attempt` of an image whose seed is `seed` (attempt 0: the seed itself)."""
    return seed if attempt == 0 else (seed + attempt * 0x9E3779B97F4A7C15) % (2**63 - 9)


def micro_batches(rows: Iterable[RenderRow], batch_size: int | Callable[[RenderRow], int]) -> Iterator[list[ImageTask]]:
    """Images grouped by shape key, in first-seen order, in chunks of at most `batch_size` (a number,
    or a function of a group's first row: the size that fits that shape, asked again before each
    chunk, so what a worker learns from an out-of-memory split applies to the rest of the group).

    Deterministic for a given row list, so the same shard renders the same calls everywhere.
    """
    return batches_of([ImageTask(row, index) for row in rows for index in range(len(row.keys))], batch_size)


def batches_of(tasks: Iterable[ImageTask], batch_size: int | Callable[[RenderRow], int]) -> Iterator[list[ImageTask]]:
    """Tasks grouped by their row's shape key, in first-seen order, in chunks of at most `batch_size`."""
    groups: dict[tuple, list[ImageTask]] = {}
    for task in tasks:
        groups.setdefault(task.row.shape_key, []).append(task)
    for tasks in groups.values():
        start = 0
        while start < len(tasks):
            size = max(1, batch_size(tasks[0].row) if callable(batch_size) else batch_size)
            yield tasks[start : start + size]
            start += size


def render_batch(pipe, tasks: list[ImageTask]) -> list:
    """Render one micro-batch of text-to-image tasks with a QwenImagePipeline (see
    qwen_worker.models.qwen_image.render_with)."""
    from qwen_worker.models.qwen_image import render_with

    return render_with(pipe, tasks)


def render_splitting_on_oom(render: Callable[[list[ImageTask]], list], tasks: list[ImageTask],
                            fits: dict | None = None) -> list:
    """`render(tasks)`, retrying a batch that runs out of GPU memory as two halves (down to one
    image); a single image that still does not fit raises. `fits` (shape key -> images per call)
    learns the size that fit after a split, so later batches of that shape start there instead of
    running out of memory first every time."""
    try:
        return render(tasks)
    except Exception as exc:
        if not is_out_of_memory(exc) or len(tasks) == 1:
            raise
    _free_cuda_cache()
    half = len(tasks) // 2
    images = render_splitting_on_oom(render, tasks[:half], fits) + render_splitting_on_oom(render, tasks[half:], fits)
    if fits is not None:  # both halves rendered (the larger, tasks[half:], possibly split again)
        key = tasks[0].row.shape_key
        fits[key] = min(fits.get(key, len(tasks)), len(tasks) - half)
    return images


def _free_cuda_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
