"""Load the pipeline a preset names, once per worker process."""

from __future__ import annotations

from qwen_worker.errors import UserError
from qwen_worker.presets import ModelPreset

DEVICES = ("auto", "cuda", "cpu")


def check_device_options(device: str, offload: str) -> None:
    """Validate `--device` and `--offload` on the driver, before any worker starts."""
    from qwen_worker.offload import parse_offload

    if device not in DEVICES:
        raise UserError(f"`--device` must be auto, cuda or cpu, got: {device!r}")
    parse_offload(offload)


def load_pipeline(
    preset: ModelPreset, *, model_dir: str | None = None, offload: str = "auto", device: str = "auto",
    images_per_call: int = 4,
):
    """The ready-to-call QwenImagePipeline for `preset` (tiny: built in code, no download)."""
    if preset.name == "tiny":
        from qwen_worker.tiny import build_tiny_pipeline

        return build_tiny_pipeline(seed=0)
    from qwen_worker.real_model import load_real_pipeline

    return load_real_pipeline(preset, model_dir=model_dir, offload=offload, device=device,
                              images_per_call=images_per_call)
