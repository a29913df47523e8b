"""Loading a preset's model once per worker process, and the LoadedModel the worker renders with:
its pipeline(s), the LoRA adapters active on its transformer, and the scheduler of a speed preset."""

from __future__ import annotations

import functools

from qwen_worker.errors import UserError
from qwen_worker.models import LIGHTNING_SCHEDULER, ModelPreset, family_module

DEVICES = ("auto", "cuda", "cpu")


def check_device_options(device: str, offload: str) -> None:
    """Validate `--device` and `--offload` on the driver, before any worker starts."""
    from qwen_worker.offload import parse_offload

    if device not in DEVICES:
        raise UserError(f"`--device` must be auto, cuda or cpu, got: {device!r}")
    parse_offload(offload)


class LoadedModel:
    """A preset's pipeline (and its companions, e.g. inpainting) ready to render micro-batches."""

    def __init__(self, preset: ModelPreset, pipe):
        self.preset, self.pipe = preset, pipe
        self.family = family_module(preset.family)
        companions = getattr(self.family, "companion_pipelines", None)
        self.pipes = {"main": pipe, **(companions(preset, pipe) if companions else {})}
        self.offload_plan = getattr(pipe, "qwen_batch_offload_plan", None)
        self._base_schedulers = {name: p.scheduler for name, p in self.pipes.items()}
        self._lightning_scheduler = None
        self._hooks = None

    @property
    def transformer(self):
        return self.pipe.transformer

    def hooks(self):
        """The LoRA hooks on the transformer (created on first use: a model without LoRAs has none)."""
        if self._hooks is None:
            from qwen_worker.lora.hooks import LoraHooks

            self._hooks = LoraHooks(self.transformer)
        return self._hooks

    def prepare(self, speed: str, adapters: list, key: tuple) -> None:
        """Before a micro-batch: the scheduler of its speed and its LoRA set (`adapters`: [(adapter,
        scale)], `key` naming the set: switching to the active set costs nothing)."""
        lightning = speed.startswith("lightning")
        for name, pipe in self.pipes.items():
            pipe.scheduler = self.lightning_scheduler() if lightning else self._base_schedulers[name]
        if adapters or self._hooks is not None:
            self.hooks().activate(adapters, key)

    def lightning_scheduler(self):
        if self._lightning_scheduler is None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self._lightning_scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER)
        return self._lightning_scheduler

    def render(self, tasks: list, inputs: dict) -> list:
        return self.family.render(self, tasks, inputs)


def load_model(preset: ModelPreset, *, model_dir: str | None = None, offload: str = "auto", device: str = "auto",
               images_per_call: int = 4) -> LoadedModel:
    """The LoadedModel of `preset`: tiny presets built in code (no download), real ones from their
    files (qwen_worker.real_model)."""
    if preset.builtin:
        pipe = family_module(preset.family).build_tiny(preset, seed=0)
        if preset.df11_in_code:
            pipe.transformer = _through_df11_codec(preset, pipe.transformer)
        return LoadedModel(preset, pipe)
    from qwen_worker.real_model import load_real_pipeline

    return LoadedModel(preset, load_real_pipeline(preset, model_dir=model_dir, offload=offload, device=device,
                                                  images_per_call=images_per_call))


def _through_df11_codec(preset: ModelPreset, transformer):
    """The tiny transformer compressed to DF11 files by our codec and loaded back by the same CPU
    DF11 loader as a real checkpoint (qwen_worker.real_model): the DF11 path end to end, offline."""
    from qwen_worker.real_model import decode_df11_into, empty_transformer

    directory = _tiny_df11_dir(preset.family)
    loaded = empty_transformer(family_module(preset.family).transformer_class(), dict(transformer.config))
    decode_df11_into(loaded, directory)
    return loaded.to(transformer.dtype).eval()


@functools.lru_cache(maxsize=None)
def _tiny_df11_dir(family: str) -> str:
    """A temporary DF11 checkpoint (config.json + safetensors) of a family's tiny transformer."""
    import tempfile
    from pathlib import Path

    from qwen_worker.df11.codec import compress_state_dict, save_df11

    transformer = tiny_transformer_of(family)
    directory = Path(tempfile.mkdtemp(prefix=f"qwen-batch-{family}-df11-"))
    tensors, config = compress_state_dict(transformer.state_dict(), pattern=df11_pattern(transformer))
    save_df11(directory, tensors, config)
    return str(directory)


def df11_pattern(transformer) -> dict[str, list[str]]:
    """DF11 units of a transformer: each block, compressing every Linear inside it (what
    dfloat11's pattern_dict says for Qwen-Image: `transformer_blocks\\.\\d+` and its sub-layers)."""
    import torch

    block = transformer.transformer_blocks[0]
    linears = [name for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]
    return {r"transformer_blocks\.\d+": linears}


@functools.lru_cache(maxsize=None)
def tiny_transformer_of(family: str):
    """The tiny transformer of a family (the weights every tiny build of that family has)."""
    from qwen_worker.models import PRESETS

    preset = next(p for p in PRESETS.values() if p.family == family and p.builtin and not p.df11_in_code)
    return family_module(family).build_tiny(preset, seed=0).transformer


def tiny_transformer(preset_name: str):
    from qwen_worker.models import get_preset

    return tiny_transformer_of(get_preset(preset_name).family)


@functools.lru_cache(maxsize=None)
def transformer_linears(preset_name: str) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of every Linear of a preset's transformer, from its config on the meta
    device (no weights): what LoRA files are checked against before any model loads."""
    from qwen_worker.lora.hooks import linear_layers
    from qwen_worker.models import get_preset

    preset = get_preset(preset_name)
    module = family_module(preset.family)
    if preset.builtin:
        from accelerate import init_empty_weights

        with init_empty_weights():
            return linear_layers(module.transformer_class()(**module.TINY_TRANSFORMER_CONFIG))
    from accelerate import init_empty_weights

    with init_empty_weights():  # the class defaults are the released models' configs
        return linear_layers(module.transformer_class()())
