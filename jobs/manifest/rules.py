"""The manifest's rules, checked on whole columns of a record batch (pyarrow.compute), and the
resolution of every valid row (final prompt, size, steps, keys) the same way.

One implementation serves validation, planning and results: `resolve_batch` returns the batch's
errors (each naming row, id, field, rule and value, built only for the rows that are shown) and
its resolved columns. Only template rows are handled row by row (a Jinja2 render each, cached by
template and params).

Rules come in stages, as a user reads them: value rules of each field first; then combinations
(the first one a row breaks); then templates; then what depends on the model (size limits) and on
other fields (an output_key's extension against `format`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.manifest.read import TextColumn, as_text
from qwen_worker.errors import UserError
from qwen_worker.presets import ASPECT_RATIOS, PROMPT_SUFFIX

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
FORMATS = ("png", "webp", "jpeg")
LANGUAGES = ("en", "zh", "auto")
EXTENSIONS = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
MAX_SEED = 2**63 - 9
# CJK ideographs, CJK punctuation, full-width forms: a prompt with any of them is Chinese for `auto`
CJK_PATTERN = r"[\x{3400}-\x{4DBF}\x{4E00}-\x{9FFF}\x{F900}-\x{FAFF}\x{3000}-\x{303F}\x{FF00}-\x{FFEF}]"
TEXT_COLUMNS = ("id", "prompt", "template", "negative_prompt", "aspect_ratio", "language", "format", "output_key",
                "image", "mask", "speed")
INT_COLUMNS = ("width", "height", "steps", "seed", "num_images")
# the order of a row's errors: its fields in column order (as the manifest table lists them)
FIELD_ORDER = {name: order for order, name in enumerate((
    "id", "prompt", "template", "params", "negative_prompt", "width", "height", "aspect_ratio", "steps",
    "true_cfg_scale", "seed", "language", "num_images", "format", "output_key", "image", "images", "mask", "lora",
    "speed", "text"))}


# --------------------------------------------------------------------------------------------
# messages


def format_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value[:40]) + (b"..." if len(value) > 40 else b""))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value)


def who(row_index: int, row_id: Any) -> str:
    if not isinstance(row_id, str) or not row_id:
        return f"row {row_index}"
    return f"row {row_index} (id {row_id if len(row_id) <= 128 else row_id[:125] + '...'!r})"  # valid ids whole


def row_error(row_index: int, row_id: Any, field_name: str, rule: str, value: Any) -> str:
    return f"{who(row_index, row_id)}: `{field_name}` {rule}, got: {format_value(value)}"


def sentence_error(row_index: int, row_id: Any, field_name: str, text: str, value: Any) -> str:
    """A library's whole sentence (a template's) as a row error; the value is added unless quoted."""
    text = " ".join(text.split())
    base = f"{who(row_index, row_id)}: `{field_name}`: {text}"
    return base if "got:" in text else f"{base}, got: {format_value(value)}"


def unsafe_key_reason(key: str) -> str | None:
    """Why `key` is not a safe relative object key, or None when it is."""
    if not key:
        return "empty"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in key):
        return "control character"
    if "\\" in key:
        return "backslash"
    if key.startswith("/") or (len(key) > 1 and key[1] == ":" and key[0].isalpha()):
        return "absolute"
    parts = key.split("/")
    if any(part in ("..", ".") for part in parts):
        return "'.' or '..' segment"
    if any(part == "" for part in parts):
        return "empty segment"
    if len(key) > 512:
        return "longer than 512 characters"
    return None


@dataclass
class _Rule:
    order: int  # position within a row's errors
    field: str
    rule: str
    mask: np.ndarray
    values: Any  # Arrow array of the values shown, or None (shown as None)


@dataclass
class BatchErrors:
    """The errors of one batch: whole-column rules as masks, template errors as ready messages."""

    start: int
    ids: Any  # the batch's `id` as an Arrow string array
    rules: list[_Rule] = field(default_factory=list)
    messages: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, order, message)

    def add(self, order: int, field_name: str, rule: str, mask: np.ndarray, values=None) -> None:
        if mask.any():
            self.rules.append(_Rule(order, field_name, rule, mask, values))

    def add_message(self, offset: int, order: int, message: str) -> None:
        self.messages.append((offset, order, message))

    def failing(self, n: int) -> np.ndarray:
        mask = np.zeros(n, dtype=bool)
        for rule in self.rules:
            mask |= rule.mask
        for offset, _order, _message in self.messages:
            mask[offset] = True
        return mask

    @property
    def count(self) -> int:
        return int(sum(int(rule.mask.sum()) for rule in self.rules)) + len(self.messages)

    def first(self, limit: int) -> list[tuple[int, str]]:
        """The first `limit` errors as (row index, message), in row order."""
        if limit <= 0:
            return []
        found: list[tuple[int, int, int, str | None]] = []  # (offset, order, rule number, message)
        for number, rule in enumerate(self.rules):
            for offset in np.flatnonzero(rule.mask)[:limit]:
                found.append((int(offset), rule.order, number, None))
        found.extend((offset, order, -1, message) for offset, order, message in self.messages)
        found.sort(key=lambda item: (item[0], item[1]))
        result = []
        for offset, _order, number, message in found[:limit]:
            if message is None:
                rule = self.rules[number]
                value = rule.values[offset].as_py() if rule.values is not None else None
                message = row_error(self.start + offset, self.ids[offset].as_py(), rule.field, rule.rule, value)
            result.append((self.start + offset, message))
        return result


@dataclass
class ResolvedBatch:
    """One batch of the manifest, checked and resolved. Arrays have one entry per row of the
    batch; entries of rows in `errors` are meaningless."""

    start: int
    size: int
    errors: BatchErrors
    valid: np.ndarray
    ids: Any
    prompt: Any  # final prompt, with the language's quality suffix
    negative_prompt: Any
    width: np.ndarray
    height: np.ndarray
    steps: np.ndarray
    true_cfg_scale: np.ndarray
    num_images: np.ndarray
    format: Any
    language: Any  # "en" | "zh", resolved
    template: Any  # the template's name, or null
    seed: np.ndarray | None  # given or derived (None unless asked for)
    output_key: Any
    keys: Any = None  # list<string> of image keys (jobs.manifest.keys)
    templates_used: dict = field(default_factory=dict)  # name -> sha256 of the templates valid rows use
    extras: Any = None  # RowExtras: input images, mask, LoRAs, speed per row (jobs.manifest.extras)


# --------------------------------------------------------------------------------------------
# the columns of a batch


def _column(batch, name: str):
    import pyarrow as pa

    index = batch.schema.get_field_index(name)
    return batch.column(index) if index >= 0 else pa.nulls(batch.num_rows)


def _mask(array) -> np.ndarray:
    """An Arrow boolean array (nulls = False) as numpy."""
    import pyarrow.compute as pc

    if array.null_count:
        array = pc.fill_null(array, False)
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=bool)


def _valid(array) -> np.ndarray:
    return _mask(array.is_valid())


def _int64(array):
    """`array` as int64 for checking (values beyond int64 become -1, which fails every range);
    the original is kept for messages."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_null(array.type):
        return pa.nulls(len(array), pa.int64())
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_uint64(array.type):
        too_big = pc.greater(array, pa.scalar(2**63 - 1, pa.uint64()))
        array = pc.if_else(too_big, pa.scalar(0, pa.uint64()), array).cast(pa.int64())
        return pc.if_else(too_big, pa.scalar(-1, pa.int64()), array)
    return array.cast(pa.int64())


def _float64(array):
    import pyarrow as pa

    if pa.types.is_null(array.type):
        return pa.nulls(len(array), pa.float64())
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array.cast(pa.float64())


def _np_int(array, default: int) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(array, default).to_numpy(zero_copy_only=False), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# the rules


def resolve_batch(batch, start: int, context, *, with_seeds: bool = False, extra_rules: tuple = ()) -> ResolvedBatch:
    """Check every rule on the batch and resolve its valid rows (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    preset = context.preset
    text: dict[str, TextColumn] = {name: as_text(_column(batch, name)) for name in TEXT_COLUMNS}
    raw = {name: _column(batch, name) for name in (*INT_COLUMNS, "true_cfg_scale", "params")}
    ints = {name: _int64(raw[name]) for name in INT_COLUMNS}
    cfg = _float64(raw["true_cfg_scale"])
    ids = text["id"].array
    errors = BatchErrors(start, ids)

    # stage 1: each field's own rules, in column order
    not_utf8 = {}
    for name in TEXT_COLUMNS:
        bad = text[name].bad_rows
        not_utf8[name] = np.zeros(n, dtype=bool)
        if bad:
            not_utf8[name][list(bad)] = True
            values = pa.array([bad.get(i) for i in range(n)], type=pa.binary())
            errors.add(FIELD_ORDER[name], name, "must be UTF-8 text", not_utf8[name], values)
    has = {name: _valid(text[name].array) for name in TEXT_COLUMNS}
    errors.add(0, "id", "is required", ~has["id"] & ~not_utf8["id"])
    errors.add(0, "id", "must be 1-128 letters, digits, '.', '_' or '-' and start with a letter or digit",
               has["id"] & ~_mask(pc.match_substring_regex(ids, ID_PATTERN)), ids)
    prompt = text["prompt"].array
    errors.add(1, "prompt", "must not be empty",
               has["prompt"] & _mask(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(prompt)), 0)), prompt)
    aspect = text["aspect_ratio"].array
    errors.add(7, "aspect_ratio", f"must be one of {', '.join(ASPECT_RATIOS)}",
               has["aspect_ratio"] & ~_mask(pc.is_in(aspect, value_set=pa.array(list(ASPECT_RATIOS)))), aspect)
    steps = ints["steps"]
    errors.add(8, "steps", "must be between 1 and 200",
               _valid(steps) & ~_mask(pc.and_(pc.greater_equal(steps, 1), pc.less_equal(steps, 200))), raw["steps"])
    errors.add(9, "true_cfg_scale", "must be between 1 and 50",
               _valid(cfg) & ~_mask(pc.and_(pc.greater_equal(cfg, 1.0), pc.less_equal(cfg, 50.0))), raw["true_cfg_scale"])
    seed = ints["seed"]
    errors.add(10, "seed", "must be between 0 and 2^63-9",
               _valid(seed) & ~_mask(pc.and_(pc.greater_equal(seed, 0), pc.less_equal(seed, MAX_SEED))), raw["seed"])
    language = text["language"].array
    errors.add(11, "language", f"must be one of {', '.join(LANGUAGES)}",
               has["language"] & ~_mask(pc.is_in(language, value_set=pa.array(list(LANGUAGES)))), language)
    num_images = ints["num_images"]
    errors.add(12, "num_images", "must be between 1 and 8",
               _valid(num_images) & ~_mask(pc.and_(pc.greater_equal(num_images, 1), pc.less_equal(num_images, 8))),
               raw["num_images"])
    fmt = text["format"].array
    errors.add(13, "format", f"must be one of {', '.join(FORMATS)}",
               has["format"] & ~_mask(pc.is_in(fmt, value_set=pa.array(list(FORMATS)))), fmt)
    output_key = text["output_key"].array
    _key_rules(errors, output_key, has["output_key"])
    for rule in extra_rules:  # columns other modules own (input images, LoRAs, ...)
        rule(errors, batch, n)
    stage1 = errors.failing(n)

    # stage 2: combinations; a row breaks at most one (the first)
    params = raw["params"]
    has_params = _valid(params)
    has_width, has_height = _valid(ints["width"]), _valid(ints["height"])
    combos = [
        (20, "prompt", "is required (or `template` + `params`)", ~has["prompt"] & ~has["template"], None),
        (21, "template", "cannot be combined with `prompt`", has["prompt"] & has["template"], text["template"].array),
        (22, "params", "needs a `template`", has_params & ~has["template"], params),
        (23, "height", "is required when `width` is given", has_width & ~has_height, None),
        (23, "width", "is required when `height` is given", has_height & ~has_width, None),
        (24, "aspect_ratio", "cannot be combined with `width`/`height`", has["aspect_ratio"] & has_width, aspect),
    ]
    broken = stage1.copy()
    for order, name, rule, mask, values in combos:
        mask = mask & ~broken
        errors.add(order, name, rule, mask, values)
        broken |= mask

    # stage 2b: input images, LoRAs and speed (rows naming files: the files are looked up once, in parallel)
    from jobs.manifest.extras import resolve_extras

    extras = resolve_extras(errors, batch, text, ints, raw, broken, context)
    broken = errors.failing(n)

    # stage 3: template rows (a render each)
    template_names = text["template"].array
    rendered, negatives, aspects, languages, used, wants = _render_templates(
        errors, context, template_names, params, np.flatnonzero(has["template"] & ~broken))
    failing = errors.failing(n) if wants else None
    for offset, count in wants.items():  # an editing template says how many input images a row gives
        if count != len(extras.inputs[offset]) and not failing[offset]:
            errors.add_message(offset, 32, sentence_error(
                start + offset, ids[offset].as_py(), "template",
                f"template {template_names[offset].as_py()!r} edits {count} input image(s) (`image` / `images`), "
                f"the row gives {len(extras.inputs[offset])}", template_names[offset].as_py()))
    broken = errors.failing(n)

    # stage 4: size limits of the model, output_key's extension against `format`
    width, height = ints["width"], ints["height"]
    for name, values, original in (("width", width, raw["width"]), ("height", height, raw["height"])):
        given = _valid(values) & ~broken
        in_range = _mask(pc.and_(pc.greater_equal(values, preset.min_size), pc.less_equal(values, preset.max_size)))
        errors.add(40, name, f"must be between {preset.size_limits_text()} for model {preset.name!r}", given & ~in_range,
                   original)
        step = preset.size_multiple
        errors.add(40, name, f"must be a multiple of {step}", given & in_range & (_np_int(values, 0) % step != 0),
                   original)
    fmt_filled = pc.fill_null(fmt, "png")
    last_segment = pc.replace_substring_regex(output_key, r"^.*/", "")
    has_ext = _mask(pc.match_substring(last_segment, "."))
    right_ext = np.zeros(n, dtype=bool)
    for name, ext in EXTENSIONS.items():
        right_ext |= _mask(pc.equal(fmt_filled, name)) & _mask(pc.ends_with(output_key, pattern=ext))
    bad_ext = has["output_key"] & ~broken & has_ext & ~right_ext
    if bad_ext.any():
        for offset in np.flatnonzero(bad_ext):
            name = fmt_filled[int(offset)].as_py()
            errors.add_message(int(offset), 41, row_error(start + int(offset), ids[int(offset)].as_py(), "output_key",
                               f"extension must match `format` {name} ({EXTENSIONS[name]})", output_key[int(offset)].as_py()))
    valid = ~errors.failing(n)

    # resolution of the valid rows
    prompt_text = pc.if_else(pa.array(has["template"]), rendered, prompt)
    negative = pc.coalesce(text["negative_prompt"].array, negatives, pa.scalar(" "))
    ratio = pc.coalesce(aspect, aspects, pa.scalar("1:1"))
    ratio_w, ratio_h = _ratio_sizes(ratio, preset)
    width_out = np.where(has_width, _np_int(width, 0), ratio_w)
    height_out = np.where(has_width, _np_int(height, 0), ratio_h)
    extras.default_sizes(width_out, height_out, has_width | has["aspect_ratio"], valid)
    language_given = pc.coalesce(language, languages, pa.scalar("auto"))
    chinese = pc.match_substring_regex(pc.fill_null(prompt_text, ""), CJK_PATTERN)
    resolved_language = pc.if_else(pc.equal(language_given, "auto"), pc.if_else(chinese, "zh", "en"), language_given)
    if preset.prompt_suffix:
        suffix = pc.if_else(pc.equal(resolved_language, "zh"), PROMPT_SUFFIX["zh"], PROMPT_SUFFIX["en"])
        final_prompt = pc.binary_join_element_wise(pc.fill_null(prompt_text, ""), suffix, "")
    else:
        final_prompt = pc.fill_null(prompt_text, "")
    seeds = None
    if with_seeds:
        from jobs.manifest.seeds import derive_seeds

        seeds = np.where(_valid(seed), _np_int(seed, 0), derive_seeds(context.job_seed, ids, valid))
    resolved = ResolvedBatch(
        start=start, size=n, errors=errors, valid=valid, ids=ids, prompt=final_prompt, negative_prompt=negative,
        width=width_out, height=height_out, steps=extras.steps(_np_int(steps, preset.default_steps), _valid(steps)),
        true_cfg_scale=extras.cfg(np.asarray(pc.fill_null(cfg, float(preset.default_true_cfg_scale)).to_numpy(
            zero_copy_only=False), dtype=np.float64), _valid(cfg)),
        num_images=_np_int(num_images, 1), format=fmt_filled, language=resolved_language,
        template=template_names, seed=seeds, output_key=output_key,
        templates_used={name: sha for name, sha in used.items()}, extras=extras,
    )
    from jobs.manifest.keys import image_keys_array

    resolved.keys = image_keys_array(ids, output_key, fmt_filled, resolved.num_images)
    return resolved


def _key_rules(errors: BatchErrors, output_key, has_key: np.ndarray) -> None:
    """`output_key` must be a safe relative key: whole-column checks, the reason per rule."""
    import pyarrow.compute as pc

    if not has_key.any():  # no output_key in this batch
        return
    checks = [
        ("empty", pc.equal(pc.utf8_length(output_key), 0)),
        ("control character", pc.match_substring_regex(output_key, r"[\x{0}-\x{1F}\x{7F}-\x{9F}]")),
        ("backslash", pc.match_substring(output_key, "\\")),
        ("absolute", pc.match_substring_regex(output_key, r"^(/|[A-Za-z]:)")),
        ("'.' or '..' segment", pc.match_substring_regex(output_key, r"(^|/)\.\.?(/|$)")),
        ("empty segment", pc.match_substring_regex(output_key, r"(^/|//|/$)")),
        ("longer than 512 characters", pc.greater(pc.utf8_length(output_key), 512)),
    ]
    broken = ~has_key
    for reason, check in checks:
        mask = _mask(check) & ~broken
        errors.add(14, "output_key", f"must be a safe relative key ({reason})", mask, output_key)
        broken |= mask


def _ratio_sizes(ratio, preset) -> tuple[np.ndarray, np.ndarray]:
    """Width and height of each row's aspect ratio: Qwen-Image's table for text-to-image presets,
    the preset's target area at that ratio (multiples of 32) for the others."""
    if preset.family == "qwen-image":
        return _map_ratio(ratio, 0), _map_ratio(ratio, 1)
    from qwen_worker.models.qwen_image_edit import area_size

    names = list(ASPECT_RATIOS)
    step = preset.size_multiple
    sizes = [area_size(preset.target_area, ASPECT_RATIOS[name][0] / ASPECT_RATIOS[name][1]) for name in names]
    table_w = np.array([w // step * step for w, _h in sizes] + [0], dtype=np.int64)
    table_h = np.array([h // step * step for _w, h in sizes] + [0], dtype=np.int64)
    import pyarrow as pa
    import pyarrow.compute as pc

    index = _np_int(pc.index_in(ratio, value_set=pa.array(names)), len(names))
    return table_w[index], table_h[index]


def _map_ratio(ratio, axis: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    names = list(ASPECT_RATIOS)
    index = pc.index_in(ratio, value_set=pa.array(names))
    table = np.array([ASPECT_RATIOS[name][axis] for name in names] + [0], dtype=np.int64)
    return table[_np_int(index, len(names))]


# --------------------------------------------------------------------------------------------
# templates


def _render_templates(errors: BatchErrors, context, names, params, offsets: np.ndarray):
    """Render the template rows at `offsets`: (prompts, negative prompts, aspect ratios, languages)
    as arrays over the batch (null elsewhere), {name: sha256} of the templates used, and {offset:
    input images} of rows whose template is an editing one."""
    import pyarrow as pa

    n = len(names)
    prompts: list = [None] * n
    negatives: list = [None] * n
    aspects: list = [None] * n
    languages: list = [None] * n
    used: dict[str, str] = {}
    wants: dict[int, int] = {}  # offset -> input images its (editing) template edits
    if len(offsets):
        library = context.template_library()
        cache = context.render_cache
        name_values = names.take(pa.array(offsets)).to_pylist()
        param_values = _params_values(params, offsets)
        templates: dict = {}
        for offset, name, value in zip(offsets.tolist(), name_values, param_values):
            template = templates.get(name)
            if template is None:
                try:
                    template = templates[name] = library.get(name)
                except UserError as exc:
                    errors.add_message(offset, 30, sentence_error(errors.start + offset, errors.ids[offset].as_py(),
                                                                  "template", str(exc), name))
                    continue
            if type(value) is _BadParams:
                errors.add_message(offset, 31, sentence_error(errors.start + offset, errors.ids[offset].as_py(),
                                                              "params", str(value), value.raw))
                continue
            key = (name, value if type(value) is str else json.dumps(value, sort_keys=True, ensure_ascii=False,
                                                                      default=str))
            result = cache.get(key)
            if result is None:
                result = _render(template, value if value is not None else {})
                if len(cache) >= 4096:
                    cache.clear()
                cache[key] = result
            if isinstance(result, Exception):
                errors.add_message(offset, 31, sentence_error(errors.start + offset, errors.ids[offset].as_py(),
                                                              "params", str(result), value if value is not None else {}))
                continue
            prompts[offset], negatives[offset] = result, template.negative_prompt
            aspects[offset], languages[offset] = template.aspect_ratio, template.language
            used[name] = template.sha256
            if template.inputs:
                wants[offset] = len(template.inputs)
    return (pa.array(prompts, type=pa.string()), pa.array(negatives, type=pa.string()),
            pa.array(aspects, type=pa.string()), pa.array(languages, type=pa.string()), used, wants)


class _BadParams(Exception):
    def __init__(self, message: str, raw: Any):
        super().__init__(message)
        self.raw = raw


def _params_values(params, offsets: np.ndarray) -> list:
    """Each template row's params as Python (a JSON string, a dict from a struct or a map, None),
    or a _BadParams for a value that cannot be one."""
    import pyarrow as pa

    from jobs.manifest.read import as_text

    taken = params.take(pa.array(offsets))
    if pa.types.is_map(taken.type):
        values = []
        for pairs in taken.to_pylist():
            if pairs is None:
                values.append(None)
                continue
            keys = [k for k, _v in pairs]
            repeated = next((k for k in keys if keys.count(k) > 1), None)
            values.append(_BadParams(f"params has the key {repeated!r} twice", dict(pairs)) if repeated is not None
                          else dict(pairs))
        return values
    if pa.types.is_struct(taken.type):
        return taken.to_pylist()
    if pa.types.is_null(taken.type):
        return [None] * len(offsets)
    text = as_text(taken)
    values = text.array.to_pylist()
    for offset, data in text.bad_rows.items():
        values[offset] = _BadParams("params must be UTF-8 text", data)
    return values


def _render(template, params):
    """The template's prompt for `params`, or the error (one line) that rendering raised."""
    try:
        return template.render(params)
    except UserError as exc:
        return exc
    except Exception as exc:  # anything a filter raises on these values
        return UserError(f"template {template.name!r} cannot render these params: {type(exc).__name__}: {exc}")
