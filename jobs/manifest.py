"""Manifests: read a Parquet manifest streaming by row group, validate every row, resolve rows.

Validation reports ALL errors (row index, id, field, rule, value) before any model loads, in memory
bounded by one row group plus 16 bytes per row (id/key hashes for the uniqueness checks).
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from qwen_worker.errors import UserError
from qwen_worker.presets import ASPECT_RATIOS, ModelPreset, prompt_language, with_prompt_suffix
from qwen_worker.rows import RenderRow

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMATS = ("png", "webp", "jpeg")
LANGUAGES = ("en", "zh", "auto")
MAX_ERRORS_KEPT = 1000
READ_BATCH_ROWS = 8192

# column -> (arrow type family, words for the error message)
COLUMN_TYPES = {
    "id": ("string", "text"),
    "prompt": ("string", "text"),
    "template": ("string", "text"),
    "params": ("string_or_struct", "a JSON object (text) or a struct"),
    "negative_prompt": ("string", "text"),
    "width": ("integer", "integer"),
    "height": ("integer", "integer"),
    "aspect_ratio": ("string", "text"),
    "steps": ("integer", "integer"),
    "true_cfg_scale": ("number", "a number"),
    "seed": ("integer", "integer"),
    "language": ("string", "text"),
    "num_images": ("integer", "integer"),
    "format": ("string", "text"),
    "output_key": ("string", "text"),
}


class ManifestError(UserError):
    """The manifest has errors; `errors` lists them (one line each), `total` counts them all."""

    def __init__(self, errors: list[str], total: int | None = None):
        self.errors = errors
        self.total = total if total is not None else len(errors)
        shown = "\n".join(errors)
        more = f"\n… and {self.total - len(errors)} more" if self.total > len(errors) else ""
        super().__init__(f"{self.total} error(s) in manifest:\n{shown}{more}")


class ManifestRow(BaseModel):
    """One row as the user wrote it. Validators raise ValueError with the rule text only;
    `_row_errors` adds row, id, field and value."""

    model_config = ConfigDict(extra="allow", strict=False)

    id: str
    prompt: str | None = None
    template: str | None = None
    params: Any = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    aspect_ratio: str | None = None
    steps: int | None = None
    true_cfg_scale: float | None = None
    seed: int | None = None
    language: str = "auto"
    num_images: int = 1
    format: str = "png"
    output_key: str | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not ID_PATTERN.fullmatch(value):
            raise ValueError(
                "must be 1-128 letters, digits, '.', '_' or '-' and start with a letter or digit"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value):
        if value is not None and not 1 <= value <= 200:
            raise ValueError("must be between 1 and 200")
        return value

    @field_validator("true_cfg_scale")
    @classmethod
    def _cfg(cls, value):
        if value is not None and not (value >= 1.0 and value <= 50.0):
            raise ValueError("must be between 1 and 50")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value):
        if value is not None and not 0 <= value < 2**63 - 8:
            raise ValueError("must be between 0 and 2^63-9")
        return value

    @field_validator("language")
    @classmethod
    def _language(cls, value):
        if value not in LANGUAGES:
            raise ValueError(f"must be one of {', '.join(LANGUAGES)}")
        return value

    @field_validator("num_images")
    @classmethod
    def _num_images(cls, value):
        if not 1 <= value <= 8:
            raise ValueError("must be between 1 and 8")
        return value

    @field_validator("format")
    @classmethod
    def _format(cls, value):
        if value not in FORMATS:
            raise ValueError(f"must be one of {', '.join(FORMATS)}")
        return value

    @field_validator("aspect_ratio")
    @classmethod
    def _aspect_ratio(cls, value):
        if value is not None and value not in ASPECT_RATIOS:
            raise ValueError(f"must be one of {', '.join(ASPECT_RATIOS)}")
        return value

    @field_validator("output_key")
    @classmethod
    def _output_key(cls, value):
        if value is not None:
            problem = unsafe_key_reason(value)
            if problem:
                raise ValueError(f"must be a safe relative key ({problem})")
        return value

    @model_validator(mode="after")
    def _combinations(self):
        if self.prompt is None and self.template is None:
            raise _FieldError("prompt", "is required (or `template` + `params`)", None)
        if self.prompt is not None and self.template is not None:
            raise _FieldError("template", "cannot be combined with `prompt`", self.template)
        if self.params is not None and self.template is None:
            raise _FieldError("params", "needs a `template`", self.params)
        if (self.width is None) != (self.height is None):
            missing = "height" if self.height is None else "width"
            other = "width" if missing == "height" else "height"
            raise _FieldError(missing, f"is required when `{other}` is given", None)
        if self.aspect_ratio is not None and self.width is not None:
            raise _FieldError("aspect_ratio", "cannot be combined with `width`/`height`", self.aspect_ratio)
        return self


class _FieldError(ValueError):
    def __init__(self, field_name: str, rule: str, value: Any):
        super().__init__(rule)
        self.field_name, self.rule, self.value = field_name, rule, value


def unsafe_key_reason(key: str) -> str | None:
    """Why `key` is not a safe relative object key, or None when it is."""
    if not key:
        return "empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "control character"
    if "\\" in key:
        return "backslash"
    if key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        return "absolute"
    parts = key.split("/")
    if any(part in ("..", ".") for part in parts):
        return "'.' or '..' segment"
    if any(part == "" for part in parts):
        return "empty segment"
    if len(key) > 512:
        return "longer than 512 characters"
    return None


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return repr(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else str(value)


def row_error(row_index: int, row_id: Any, field_name: str, rule: str, value: Any) -> str:
    who = f"row {row_index} (id {row_id!r})" if isinstance(row_id, str) and row_id else f"row {row_index}"
    return f"{who}: `{field_name}` {rule}, got: {_format_value(value)}"


def template_error(row_index: int, row_id: Any, field_name: str, exc: Exception, value: Any) -> str:
    """A template library message (a whole sentence) as a row error; the value is added unless
    the message already quotes it."""
    who = f"row {row_index} (id {row_id!r})"
    text = str(exc)
    return f"{who}: `{field_name}`: {text}" if "got:" in text else f"{who}: `{field_name}`: {text}, got: {_format_value(value)}"


# --------------------------------------------------------------------------------------------
# Reading


def _arrow_family(arrow_type) -> str:
    import pyarrow as pa

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type):
        return "number"
    if pa.types.is_struct(arrow_type) or pa.types.is_map(arrow_type):
        return "struct"
    if pa.types.is_null(arrow_type):
        return "null"
    return str(arrow_type)


def open_parquet(source: str, *, version: str | None = None):
    """A pyarrow ParquetFile for a local path or s3:// URI (read by range, never whole; pinned to
    ETag `version` when given)."""
    import pyarrow.parquet as pq

    if source.startswith("s3://"):
        from jobs.s3_files import open_s3_input

        return pq.ParquetFile(open_s3_input(source, version=version))
    try:
        return pq.ParquetFile(source)
    except FileNotFoundError:
        raise UserError(f"manifest not found: {source}") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid for a file that is not Parquet
        raise UserError(f"cannot read manifest {source} as Parquet: {exc}") from None


def check_columns(schema) -> list[str]:
    """Column-level errors: missing `id`, known columns of the wrong type."""
    errors = []
    names = schema.names
    if "id" not in names:
        errors.append(f"manifest: column `id` is required, got columns: {', '.join(names) or '(none)'}")
    if "prompt" not in names and "template" not in names:
        errors.append("manifest: column `prompt` (or `template` + `params`) is required")
    for name in names:
        if name not in COLUMN_TYPES:
            continue
        expected, words = COLUMN_TYPES[name]
        family = _arrow_family(schema.field(name).type)
        allowed = {"string_or_struct": {"string", "struct"}, "number": {"number", "integer"}}.get(expected, {expected})
        if family not in allowed | {"null"}:
            errors.append(f"manifest: column `{name}` must be {words}, got type: {schema.field(name).type}")
    return errors


def iter_raw_rows(parquet_file, *, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict]]:
    """(row index, row dict) for rows [start, stop), reading only the row groups that hold them."""
    metadata = parquet_file.metadata
    stop = metadata.num_rows if stop is None else min(stop, metadata.num_rows)
    first_row = 0
    for group in range(metadata.num_row_groups):
        group_rows = metadata.row_group(group).num_rows
        if first_row + group_rows <= start or first_row >= stop:
            first_row += group_rows
            continue
        for batch in parquet_file.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group]):
            records = batch.to_pylist()
            for offset, record in enumerate(records):
                index = first_row + offset
                if start <= index < stop:
                    yield index, {k: v for k, v in record.items() if v is not None}
            first_row += len(records)


# --------------------------------------------------------------------------------------------
# Validation and resolution


@dataclass
class ResolveContext:
    preset: ModelPreset
    job_seed: int = 0
    template_dirs: tuple[str, ...] = ()
    _library: Any = None

    def template_library(self):
        if self._library is None:
            from jobs.templates import load_library

            self._library = load_library(self.template_dirs)
        return self._library


@dataclass
class ManifestSummary:
    rows: int = 0
    images: int = 0
    shapes: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    templates: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    extra_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "images": self.images,
            "shapes": dict(self.shapes.most_common()),
            "languages": dict(self.languages.most_common()),
            "templates": dict(self.templates.most_common()),
            "formats": dict(self.formats.most_common()),
            "extra_columns": self.extra_columns,
        }


def derive_seed(job_seed: int, row_id: str) -> int:
    """A row's seed when the manifest gives none: a pure function of (job seed, id)."""
    digest = hashlib.sha256(f"{job_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2  # < 2^62: seed + n stays in range


def image_keys(row: ManifestRow) -> tuple[str, ...]:
    """Object keys of a row's images, relative to the output root."""
    from qwen_worker.encode import extension

    ext = extension(row.format)
    if row.output_key is not None:
        stem = row.output_key[: -len(ext)] if row.output_key.endswith(ext) else row.output_key
    else:
        stem = row.id
    if row.num_images == 1:
        return (f"images/{stem}{ext}",)
    return tuple(f"images/{stem}-{n}{ext}" for n in range(row.num_images))


def resolve_row(index: int, raw: dict, context: ResolveContext) -> RenderRow:
    """A validated RenderRow, or RowErrors listing every problem of this row."""
    errors: list[str] = []
    row_id = raw.get("id")
    try:
        row = ManifestRow.model_validate(raw)
    except ValidationError as exc:
        raise RowErrors([_pydantic_error(index, row_id, error, raw) for error in exc.errors()]) from None

    preset = context.preset
    prompt, negative, aspect_ratio, language = row.prompt, row.negative_prompt, row.aspect_ratio, row.language
    if row.template is not None:
        from jobs.templates import parse_params

        try:
            template = context.template_library().get(row.template)
        except UserError as exc:
            raise RowErrors([template_error(index, row_id, "template", exc, row.template)]) from None
        try:
            prompt = template.render(parse_params(row.params if row.params is not None else {}))
        except UserError as exc:
            raise RowErrors([template_error(index, row_id, "params", exc, row.params)]) from None
        negative = negative if negative is not None else template.negative_prompt
        aspect_ratio = aspect_ratio or (None if row.width is not None else template.aspect_ratio)
        language = language if "language" in raw else template.language

    if row.width is not None:
        width, height = row.width, row.height
        for name, value in (("width", width), ("height", height)):
            if not preset.min_size <= value <= preset.max_size:
                errors.append(row_error(index, row_id, name, f"must be between {preset.size_limits_text()} for model {preset.name!r}", value))
            elif value % 16:
                errors.append(row_error(index, row_id, name, "must be a multiple of 16", value))
    else:
        width, height = ASPECT_RATIOS[aspect_ratio or "1:1"]
    if row.output_key is not None:
        from qwen_worker.encode import extension

        suffix = row.output_key.rsplit("/", 1)[-1]
        if "." in suffix and not row.output_key.endswith(extension(row.format)):
            errors.append(row_error(index, row_id, "output_key", f"extension must match `format` {row.format} ({extension(row.format)})", row.output_key))
    if errors:
        raise RowErrors(errors)

    seed = row.seed if row.seed is not None else derive_seed(context.job_seed, row.id)
    return RenderRow(
        row_index=index,
        id=row.id,
        prompt=with_prompt_suffix(prompt, language),
        negative_prompt=negative if negative is not None else " ",
        width=width,
        height=height,
        steps=row.steps if row.steps is not None else preset.default_steps,
        true_cfg_scale=row.true_cfg_scale if row.true_cfg_scale is not None else preset.default_true_cfg_scale,
        seed=seed,
        keys=image_keys(row),
        format=row.format,
    )


class RowErrors(UserError):
    """Every problem of one row (one line each)."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages))
        self.messages = messages


_PYDANTIC_RULES = {
    "missing": "is required",
    "string_type": "must be text",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
}


def _pydantic_error(index: int, row_id: Any, error: dict, raw: dict) -> str:
    ctx_error = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _FieldError):
        return row_error(index, row_id, ctx_error.field_name, ctx_error.rule, ctx_error.value)
    field_name = str(error["loc"][0]) if error["loc"] else "row"
    if isinstance(ctx_error, ValueError):
        rule = str(ctx_error)
    else:
        rule = _PYDANTIC_RULES.get(error["type"], error["msg"])
    return row_error(index, row_id if isinstance(row_id, str) else None, field_name, rule, raw.get(field_name))


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)


def validate_manifest(source: str, context: ResolveContext) -> ManifestSummary:
    """Check every row; raise ManifestError listing every error, else return a summary."""
    import numpy as np

    parquet_file = open_parquet(source)
    errors = check_columns(parquet_file.schema_arrow)
    if errors:
        raise ManifestError(errors)
    summary = ManifestSummary(extra_columns=[n for n in parquet_file.schema_arrow.names if n not in COLUMN_TYPES])
    total_errors = 0
    # 8-byte hashes of every id and image key (and the key's row): 24 bytes a row, for uniqueness
    id_hashes, key_hashes, key_rows = array("q"), array("q"), array("q")

    def add(messages):
        nonlocal total_errors
        total_errors += len(messages)
        errors.extend(messages[: max(0, MAX_ERRORS_KEPT - len(errors))])

    for index, raw in iter_raw_rows(parquet_file):
        summary.rows += 1
        if isinstance(raw.get("id"), str):
            id_hashes.append(_hash64(raw["id"]))
        else:
            id_hashes.append(index ^ 0x5A5A5A5A5A5A)  # no id: reported below, never a duplicate
        try:
            row = resolve_row(index, raw, context)
        except RowErrors as exc:
            add(exc.messages)
            continue
        summary.images += len(row.keys)
        summary.shapes[f"{row.width}x{row.height}"] += 1
        summary.languages[prompt_language(row.prompt, raw.get("language", "auto"))] += 1
        summary.formats[row.format] += 1
        if raw.get("template"):
            summary.templates[raw["template"]] += 1
        for key in row.keys:
            key_hashes.append(_hash64(key))
            key_rows.append(index)

    add(_duplicates(parquet_file, np.frombuffer(id_hashes, dtype=np.int64), None, "id"))
    add(_duplicates(parquet_file, np.frombuffer(key_hashes, dtype=np.int64), np.frombuffer(key_rows, dtype=np.int64), "output_key"))
    if summary.rows == 0:
        add(["manifest: has no rows"])
    if total_errors:
        raise ManifestError(sorted(errors, key=_error_row), total_errors)
    return summary


def _error_row(message: str) -> int:
    match = re.match(r"row (\d+)", message)
    return int(match.group(1)) if match else -1


def _duplicates(parquet_file, hashes, rows, field_name: str) -> list[str]:
    """Errors for every row whose id (or image key) repeats an earlier row's."""
    import numpy as np

    if len(hashes) == 0:
        return []
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    repeat = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]) + 1
    if len(repeat) == 0:
        return []
    def row_of(position):
        return int(rows[position]) if rows is not None else int(position)

    first_of_run = {}
    pairs = []  # (duplicate row, first row)
    for position in repeat:
        start = position
        while start > 0 and sorted_hashes[start - 1] == sorted_hashes[position]:
            start -= 1
        first_of_run.setdefault(start, row_of(order[start]))
        first, dup = first_of_run[start], row_of(order[position])
        if dup != first:
            pairs.append((dup, first))
    wanted = {row for pair in pairs for row in pair}
    raws = {index: raw for index, raw in iter_raw_rows(parquet_file) if index in wanted}
    messages = []
    for dup, first in sorted(pairs):
        dup_id, first_id = raws[dup].get("id"), raws[first].get("id")
        if field_name == "id":
            messages.append(row_error(dup, dup_id, "id", f"must be unique (row {first} has it too)", dup_id))
        elif dup_id != first_id:  # rows sharing an id are already reported as duplicate ids
            key = _shared_key(raws[dup], raws[first])
            messages.append(
                row_error(dup, dup_id, "output_key", f"must not repeat an image key of row {first} (id {first_id!r})", key)
            )
    return messages


def _shared_key(raw_a: dict, raw_b: dict) -> str:
    keys_a = image_keys(ManifestRow.model_validate(raw_a))
    keys_b = set(image_keys(ManifestRow.model_validate(raw_b)))
    return next(key for key in keys_a if key in keys_b)


def iter_shard_rows(source: str, context: ResolveContext, start: int, stop: int) -> list[RenderRow]:
    """The resolved rows [start, stop) of an already validated manifest."""
    return [resolve_row(index, raw, context) for index, raw in iter_raw_rows(open_parquet(source), start=start, stop=stop)]


def manifest_row_count(source: str) -> int:
    return open_parquet(source).metadata.num_rows
