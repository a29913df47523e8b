"""The model side: one module per family (its pipeline classes, tiny offline builder, rendering and
presets as data), the registry of presets, and loading.

Families: `qwen_image` (text-to-image: Qwen-Image, -2512), `qwen_image_edit` (Edit, Edit-2509/2511,
inpainting), `qwen_image_21` (Qwen-Image-2.1). Adding a family is one module with FAMILY, PRESETS,
pipeline_class(preset), transformer_class(), build_tiny(preset, seed, dtype) and
render(model, tasks, inputs), plus its name in FAMILY_MODULES. Importing this package is cheap
(no torch, no diffusers): the driver validates manifests against the presets.
"""

from __future__ import annotations

import importlib

from qwen_worker.errors import UserError
from qwen_worker.models.preset import ASPECT_RATIOS, LIGHTNING_SCHEDULER, PROMPT_SUFFIX, MemoryFootprint, ModelPreset

FAMILY_MODULES = {
    "qwen-image": "qwen_worker.models.qwen_image",
    "qwen-image-edit": "qwen_worker.models.qwen_image_edit",
    "qwen-image-2.1": "qwen_worker.models.qwen_image_21",
}


def family_module(family: str):
    return importlib.import_module(FAMILY_MODULES[family])


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset for family in FAMILY_MODULES for preset in family_module(family).PRESETS
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r} (known: {', '.join(sorted(PRESETS))})") from None


__all__ = ["ASPECT_RATIOS", "FAMILY_MODULES", "LIGHTNING_SCHEDULER", "PRESETS", "PROMPT_SUFFIX", "MemoryFootprint",
           "ModelPreset", "family_module", "get_preset"]
