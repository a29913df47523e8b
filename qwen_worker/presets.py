"""Model presets: what each `--model` name loads and the limits rows are validated against.

Presets are plain data kept beside each model family (qwen_worker/models/<family>.py), so the
driver can validate a manifest against them before any model (or torch) is loaded. This module is
the one place the rest of the code asks for them.
"""

from __future__ import annotations

import re

from qwen_worker.models import ASPECT_RATIOS, PRESETS, PROMPT_SUFFIX, MemoryFootprint, ModelPreset, get_preset

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def prompt_language(prompt: str, language: str) -> str:
    """'en' or 'zh': the given language, or for 'auto' zh when the prompt has any CJK character."""
    if language != "auto":
        return language
    return "zh" if _CJK.search(prompt) else "en"


def with_prompt_suffix(prompt: str, language: str) -> str:
    return prompt + PROMPT_SUFFIX[prompt_language(prompt, language)]


__all__ = ["ASPECT_RATIOS", "PRESETS", "PROMPT_SUFFIX", "MemoryFootprint", "ModelPreset", "get_preset",
           "prompt_language", "with_prompt_suffix"]
