"""Load the pipeline a preset names, once per worker process."""

from __future__ import annotations

from qwen_worker.errors import UserError
from qwen_worker.presets import ModelPreset


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def load_pipeline(preset: ModelPreset, *, model_dir: str | None = None, offload: str = "auto"):
    """The ready-to-call QwenImagePipeline for `preset` (tiny: built in code, no download)."""
    if preset.name == "tiny":
        from qwen_worker.tiny import build_tiny_pipeline

        return build_tiny_pipeline(seed=0)
    if preset.needs_cuda and not cuda_available():
        raise UserError(
            f"model {preset.name!r} needs a CUDA GPU and none is visible to this worker "
            "(run `qwen-batch doctor`; use --model tiny to try the pipeline on CPU)"
        )
    from qwen_worker.real_model import load_real_pipeline

    return load_real_pipeline(preset, model_dir=model_dir, offload=offload)
