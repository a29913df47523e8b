"""What a row names besides its prompt: input images (`image` / `images`, `mask`), LoRA adapters
(`lora`, --lora) and the speed preset (`speed`, --speed), checked against the model preset and the
files themselves, and resolved for rendering.

Rows that name none of them (and jobs without --lora / --speed) stay on the columnar fast path:
nothing here runs row by row for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jobs.manifest.rules import row_error

# error order within a row (after the fields' own rules, with the combinations)
_ORDER = {"image": 25, "images": 25, "mask": 26, "lora": 27, "speed": 28, "steps": 29, "true_cfg_scale": 29,
          "text": 15}


@dataclass
class RowExtras:
    """Per row of a batch: input images, mask, LoRAs and speed (Python values; None: none)."""

    size: int
    inputs: list = field(default_factory=list)  # tuple of InputRef per row
    masks: list = field(default_factory=list)  # InputRef or None
    loras: list = field(default_factory=list)  # tuple of LoraRef per row
    speeds: list = field(default_factory=list)
    texts: list = field(default_factory=list)  # the `text` column: None, or the strings the image must show
    lightning_steps: dict = field(default_factory=dict)  # offset -> steps of its Lightning speed
    preset: object = None

    @classmethod
    def empty(cls, size: int, speed: str = "standard", preset=None) -> "RowExtras":
        return cls(size, [()] * size, [None] * size, [()] * size, [speed] * size, [None] * size, preset=preset)

    def default_sizes(self, width: np.ndarray, height: np.ndarray, given: np.ndarray, valid: np.ndarray) -> None:
        """Rows with input images and no size of their own take the model's size for their inputs."""
        if self.preset is None or not self.preset.size_from_input:
            return
        from qwen_worker.models import family_module

        output_size = family_module(self.preset.family).output_size
        for offset, refs in enumerate(self.inputs):
            if refs and valid[offset] and not given[offset]:
                width[offset], height[offset] = output_size(self.preset, [(ref.width, ref.height) for ref in refs])

    def steps(self, steps: np.ndarray, given: np.ndarray) -> np.ndarray:
        """Steps, with a Lightning row's default (its step count) where the row gives none."""
        steps = np.array(steps, copy=True)
        for offset, lightning in self.lightning_steps.items():
            if not given[offset]:
                steps[offset] = lightning
        return steps

    def cfg(self, cfg: np.ndarray, given: np.ndarray) -> np.ndarray:
        cfg = np.array(cfg, copy=True)
        for offset in self.lightning_steps:
            if not given[offset]:
                cfg[offset] = 1.0
        return cfg

    def input_digest(self, offset: int) -> str:
        refs = [*self.inputs[offset], *([self.masks[offset]] if self.masks[offset] is not None else [])]
        return "|".join(f"{ref.uri}@{ref.version}" for ref in refs)


def _column(batch, name):
    from jobs.manifest.rules import _column as column

    return column(batch, name)


def resolve_extras(errors, batch, text: dict, ints: dict, raw: dict, broken: np.ndarray, context) -> RowExtras:
    """Check and resolve the extras of every row not already broken; errors go to `errors`."""
    from jobs.manifest.read import as_text_lists

    n = batch.num_rows
    preset = context.preset
    extras = RowExtras.empty(n, context.speed, preset)
    names = set(batch.schema.names)
    if "text" in names:
        extras.texts, problems = as_text_lists(_column(batch, "text"))
        for offset, problem in problems.items():
            errors.add_message(offset, _ORDER["text"], row_error(errors.start + offset, errors.ids[offset].as_py(), "text",
                                                                 problem, None))
    if not (names & {"image", "images", "mask", "lora", "speed"}) and not context.has_row_extras:
        if preset.min_inputs:  # an edit model and no input column at all
            errors.add(_ORDER["image"], "image", f"is required by model {preset.name!r} (give `image` or `images`)",
                       ~broken)
        return extras
    start, ids = errors.start, errors.ids
    image = text["image"].array.to_pylist()
    mask = text["mask"].array.to_pylist()
    speed = text["speed"].array.to_pylist()
    images, images_problems = as_text_lists(_column(batch, "images"))
    lora, lora_problems = as_text_lists(_column(batch, "lora"))
    given_steps, given_cfg = _given(ints["steps"]), _given(raw["true_cfg_scale"])

    def fail(offset: int, name: str, rule: str, value) -> None:
        errors.add_message(offset, _ORDER[name], row_error(start + offset, ids[offset].as_py(), name, rule, value))

    wanted_inputs, wanted_loras = [], []
    plans = {}
    for offset in np.flatnonzero(~broken):
        offset = int(offset)
        plan = _plan_row(offset, preset, context, image[offset], images[offset], images_problems.get(offset),
                         mask[offset], lora[offset], lora_problems.get(offset), speed[offset], fail)
        if plan is None:
            continue
        row_speed = plan["speed"]
        if row_speed != "standard":
            from jobs.manifest.loras import lightning_steps

            steps = lightning_steps(row_speed)
            if given_steps[offset] and int(ints["steps"][offset].as_py()) != steps:
                fail(offset, "steps", f"must be {steps} under speed {row_speed} (or give this row `speed` standard)",
                     raw["steps"][offset].as_py())
                continue
            if given_cfg[offset] and float(raw["true_cfg_scale"][offset].as_py()) != 1.0:
                fail(offset, "true_cfg_scale", f"must be 1 under speed {row_speed} (Lightning runs without CFG; or "
                     "give this row `speed` standard)", raw["true_cfg_scale"][offset].as_py())
                continue
        plans[offset] = plan
        wanted_inputs += [uri for uri, _field, _value in plan["inputs"]]
        if plan["mask"] is not None:
            wanted_inputs.append(plan["mask"][0])
        wanted_loras += [ref.uri for ref in plan["loras"]]
    if wanted_inputs:
        context.input_index().lookup(wanted_inputs)
    if wanted_loras:
        context.lora_index().lookup(wanted_loras)
    for offset, plan in plans.items():
        _finish_row(offset, plan, context, extras, fail)
    return extras


def _given(array) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(array.is_valid(), False).to_numpy(zero_copy_only=False), dtype=bool)


def _plan_row(offset, preset, context, image, images, images_problem, mask, lora, lora_problem, speed, fail):
    """What one row asks for, before any file is looked at; None when it breaks a rule."""
    from jobs.manifest.inputs import resolve_uri
    from jobs.manifest.loras import SPEEDS, lightning_source
    from qwen_worker.lora.spec import LoraSpecError, parse_specs, resolve_source
    from qwen_worker.rows import LoraRef

    base = context.base
    if images_problem:
        fail(offset, "images", images_problem, images)
        return None
    if lora_problem:
        fail(offset, "lora", lora_problem, lora)
        return None
    if image is not None and images is not None:
        fail(offset, "images", "cannot be combined with `image`", images)
        return None
    given = [image] if image is not None else list(images or [])
    field_name = "image" if image is not None else "images"
    shown = image if image is not None else images
    if any(not isinstance(item, str) or not item.strip() for item in given):
        fail(offset, field_name, "must name files (no empty entries)", shown)
        return None
    if given and not preset.takes_inputs:
        fail(offset, field_name, f"is not used by model {preset.name!r} (it takes no input images; edit models such "
             "as qwen-image-edit-2511-df11 do)", shown)
        return None
    if len(given) > preset.max_inputs:
        fail(offset, field_name, f"must name at most {preset.max_inputs} image(s) for model {preset.name!r}", shown)
        return None
    if len(given) < preset.min_inputs:
        fail(offset, "image", f"is required by model {preset.name!r} (give `image` or `images`)", None)
        return None
    if mask is not None and not preset.mask:
        fail(offset, "mask", f"is not used by model {preset.name!r} (inpainting: qwen-image-edit-df11)", mask)
        return None
    if mask is not None and len(given) != 1:
        fail(offset, "mask", "needs exactly one input image (`image`)", mask)
        return None
    row_speed = speed if speed is not None else context.speed
    if row_speed not in SPEEDS:
        fail(offset, "speed", f"must be one of {', '.join(SPEEDS)}", speed)
        return None
    try:
        loras = list(parse_specs(lora, base))
        for spec in context.job_loras:
            loras += list(parse_specs(spec, base))
    except LoraSpecError as exc:
        fail(offset, "lora", str(exc), lora)
        return None
    if row_speed != "standard":
        source = lightning_source(preset, row_speed, context.lightning_lora)
        if source is None:
            fail(offset, "speed", f"needs a Lightning LoRA and model {preset.name!r} has no known one for {row_speed} "
                 "(pass --lightning-lora FILE)", row_speed)
            return None
        loras.append(LoraRef(resolve_source(source, base), 1.0))
    uris = [ref.uri for ref in loras]
    if len(set(uris)) != len(uris):
        fail(offset, "lora", "names one file twice (with --lora or the Lightning LoRA?)", lora)
        return None
    return {
        "inputs": [(resolve_uri(item, base), field_name, shown) for item in given],
        "mask": (resolve_uri(mask, base), mask) if mask is not None else None,
        "loras": tuple(sorted(loras, key=lambda ref: (ref.uri, ref.scale))),
        "lora_value": lora,
        "speed": row_speed,
    }


def _finish_row(offset: int, plan: dict, context, extras: RowExtras, fail) -> None:
    """Check the files a row names (already looked up) and record the resolved row."""
    from qwen_worker.rows import InputRef

    index = context.input_index() if plan["inputs"] or plan["mask"] else None
    refs = []
    for uri, field_name, shown in plan["inputs"]:
        info = index.get(uri)
        if info.problem:
            fail(offset, field_name, f"{info.problem} ({uri})" if uri != shown else info.problem, shown)
            return
        refs.append(InputRef(uri, info.version, info.width, info.height))
    mask_ref = None
    if plan["mask"] is not None:
        uri, shown = plan["mask"]
        info = index.get(uri)
        if info.problem:
            fail(offset, "mask", f"{info.problem} ({uri})" if uri != shown else info.problem, shown)
            return
        mask_ref = InputRef(uri, info.version, info.width, info.height)
    for ref in plan["loras"]:
        problem = context.lora_index().problem(ref.uri)
        if problem:
            fail(offset, "lora", problem, plan["lora_value"] if plan["lora_value"] is not None else ref.uri)
            return
    extras.inputs[offset], extras.masks[offset] = tuple(refs), mask_ref
    extras.loras[offset], extras.speeds[offset] = plan["loras"], plan["speed"]
    if plan["speed"] != "standard":
        from jobs.manifest.loras import lightning_steps

        extras.lightning_steps[offset] = lightning_steps(plan["speed"])
