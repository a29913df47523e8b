"""Manifests: read a Parquet manifest streaming by record batch, check every rule on whole columns,
and resolve its rows (prompt, size, seed, keys) for planning and results.

Validation reports ALL errors (row index, id, field, rule, value; the first MAX_ERRORS_KEPT shown,
all counted) before any model loads, in memory bounded by one batch plus a few 8-byte hashes per
row, on every core for a big manifest. Modules: `read` (files, columns, text types), `rules` (the
rules and the resolution), `keys` (image keys and collisions), `parallel` (batches checked by
several processes), `seeds`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from jobs.manifest.keys import KeyIndex, collision_errors, image_keys_array, row_keys
from jobs.manifest.read import (
    COLUMN_TYPES,
    READ_BATCH_ROWS,
    ManifestFileError,
    as_text,
    check_columns,
    iter_batches,
    open_parquet,
    use_system_allocator,
)
from jobs.manifest.rules import FORMATS, LANGUAGES, ResolvedBatch, resolve_batch, row_error, unsafe_key_reason
from jobs.manifest.seeds import derive_seed
from qwen_worker.errors import UserError
from qwen_worker.presets import ModelPreset
from qwen_worker.rows import RenderRow

MAX_ERRORS_KEPT = 1000

__all__ = [
    "COLUMN_TYPES", "FORMATS", "LANGUAGES", "MAX_ERRORS_KEPT", "READ_BATCH_ROWS", "ManifestError", "ManifestFileError",
    "ManifestSummary", "ResolveContext", "ResolvedBatch", "RowErrors", "check_columns", "derive_seed", "iter_resolved",
    "open_parquet", "render_rows", "resolve_row", "row_error", "row_keys", "unsafe_key_reason", "validate_manifest",
]  # fmt: skip


class ManifestError(UserError):
    """The manifest has errors; `errors` lists them (one line each), `total` counts them all."""

    def __init__(self, errors: list[str], total: int | None = None):
        self.errors = errors
        self.total = total if total is not None else len(errors)
        shown = "\n".join(errors)
        more = f"\n… and {self.total - len(errors)} more" if self.total > len(errors) else ""
        super().__init__(f"{self.total} error(s) in manifest:\n{shown}{more}")


class RowErrors(UserError):
    """Every problem of one row (one line each)."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages))
        self.messages = messages


@dataclass
class ResolveContext:
    preset: ModelPreset
    job_seed: int = 0
    template_dirs: tuple[str, ...] = ()
    base: str | None = None  # relative input and LoRA paths are relative to this (the manifest's directory)
    job_loras: tuple[str, ...] = ()  # --lora: adapters added to every row (source[:scale])
    speed: str = "standard"  # --speed: rows without a `speed` use it
    lightning_lora: str | None = None  # --lightning-lora: the Lightning LoRA instead of the preset's
    model_dir: str | None = None  # where hf:// LoRAs are looked for first (<model_dir>/lightning/)
    store_options: dict = field(default_factory=dict)  # s3:// inputs and LoRAs: endpoint settings
    _library: Any = None
    _inputs: Any = None
    _loras: Any = None
    render_cache: dict = field(default_factory=dict)  # (template, params) -> prompt or error

    def template_library(self):
        if self._library is None:
            from jobs.templates import load_library

            self._library = load_library(self.template_dirs)
        return self._library

    def input_index(self):
        """Input images looked up so far (jobs.manifest.inputs.InputIndex), kept for the run."""
        if self._inputs is None:
            from jobs.manifest.inputs import InputIndex

            self._inputs = InputIndex(self.store_options)
        return self._inputs

    def lora_index(self):
        if self._loras is None:
            from jobs.manifest.loras import LoraIndex

            self._loras = LoraIndex(self.preset, store_options=self.store_options, model_dir=self.model_dir)
        return self._loras

    @property
    def has_row_extras(self) -> bool:
        """Whether job options add LoRAs or a speed preset to every row."""
        return bool(self.job_loras) or self.speed != "standard"


@dataclass
class ManifestSummary:
    rows: int = 0
    images: int = 0
    shapes: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    templates: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    extra_columns: list[str] = field(default_factory=list)
    templates_used: dict[str, str] = field(default_factory=dict)  # name -> sha256 of its file

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

    def add(self, resolved: ResolvedBatch) -> None:
        import pyarrow as pa

        valid = resolved.valid
        self.rows += resolved.size
        self.images += int(resolved.num_images[valid].sum())
        codes = resolved.width[valid] * 100_000 + resolved.height[valid]
        values, first, counts = np.unique(codes, return_index=True, return_counts=True)
        for position in np.argsort(first, kind="stable"):
            code = int(values[position])
            self.shapes[f"{code // 100_000}x{code % 100_000}"] += int(counts[position])
        mask = pa.array(valid)
        for counter, array in ((self.languages, resolved.language), (self.formats, resolved.format),
                               (self.templates, resolved.template)):
            for item in array.filter(mask).value_counts().to_pylist():  # in order of first appearance
                if item["values"] is not None:
                    counter[item["values"]] += item["counts"]
        self.templates_used.update(resolved.templates_used)

    def merge(self, other: "ManifestSummary") -> None:
        """Add the summary of the rows after these (counters keep their order of first appearance)."""
        self.rows += other.rows
        self.images += other.images
        for mine, theirs in ((self.shapes, other.shapes), (self.languages, other.languages),
                             (self.templates, other.templates), (self.formats, other.formats)):
            mine.update(theirs)
        self.templates_used.update(other.templates_used)


def known_columns(schema, extra: tuple[str, ...] = ()) -> list[str]:
    """The manifest columns qwen-batch reads (pass-through columns are never read)."""
    return [name for name in dict.fromkeys(schema.names) if name in COLUMN_TYPES or name in extra]


def validate_manifest(source: str, context: ResolveContext, *, version: str | None = None,
                      processes: int | None = None, batch_rows: int | None = None) -> ManifestSummary:
    """Check every row; raise ManifestError listing every error, else return a summary.

    `batch_rows` rows are checked at a time; a big manifest on every core, or on `processes`
    processes (see jobs.manifest.parallel). The result does not depend on either."""
    from jobs.manifest.parallel import CHECK_BATCH_ROWS, check_manifest

    use_system_allocator()
    if context.base is None:
        from qwen_worker.lora.spec import base_of

        context.base = base_of(source)
    parquet_file = open_parquet(source, version=version)
    schema = parquet_file.schema_arrow
    errors = check_columns(schema)
    if errors:
        raise ManifestError(errors)
    if parquet_file.metadata.num_rows == 0:
        raise ManifestFileError(f"manifest {source} has no rows")
    summary = ManifestSummary(extra_columns=[n for n in schema.names if n not in COLUMN_TYPES])
    kept: list[tuple[int, str]] = []
    total = 0
    index = KeyIndex()
    for outcome in check_manifest(parquet_file, source, context, version=version, processes=processes,
                                  batch_rows=batch_rows or CHECK_BATCH_ROWS, max_errors=MAX_ERRORS_KEPT):
        total += outcome.errors
        kept.extend(outcome.first[:MAX_ERRORS_KEPT - len(kept)])
        summary.merge(outcome.summary)
        index.add(outcome.keys)
    groups, rows = index.candidates()
    if rows:
        collisions = collision_errors(groups, _ids_and_keys(parquet_file, source, rows))
        total += len(collisions)
        kept = sorted(kept + sorted(collisions)[:MAX_ERRORS_KEPT], key=lambda item: item[0])[:MAX_ERRORS_KEPT]
    if total:
        raise ManifestError([message for _row, message in kept], total)
    return summary


def _ids_and_keys(parquet_file, source: str, rows: set[int]) -> dict[int, tuple[str | None, list[str]]]:
    """row -> (id, image keys) of `rows`, from a second pass over four columns."""
    import pyarrow as pa

    from jobs.manifest.rules import _column, _int64, _np_int

    wanted = np.array(sorted(rows), dtype=np.int64)
    columns = [c for c in ("id", "output_key", "format", "num_images") if c in parquet_file.schema_arrow.names]
    found: dict[int, tuple[str | None, list[str]]] = {}
    for start, batch in iter_batches(parquet_file, source, columns=columns):
        local = wanted[(wanted >= start) & (wanted < start + batch.num_rows)] - start
        if not len(local):
            continue
        take = pa.array(local)
        ids = as_text(_column(batch, "id")).array.take(take)
        keys = image_keys_array(ids, as_text(_column(batch, "output_key")).array.take(take),
                                as_text(_column(batch, "format")).array.take(take).fill_null("png"),
                                _np_int(_int64(_column(batch, "num_images")).take(take), 1))
        for offset, row_id, row_key_list in zip(local.tolist(), ids.to_pylist(), keys.to_pylist()):
            found[start + offset] = (row_id, row_key_list)
    return found


def iter_resolved(parquet_file, source: str, context: ResolveContext) -> Iterator[ResolvedBatch]:
    """Every batch of an (already validated) manifest, resolved with seeds."""
    for start, batch in iter_batches(parquet_file, source, columns=known_columns(parquet_file.schema_arrow)):
        yield resolve_batch(batch, start, context, with_seeds=True)


def render_rows(resolved: ResolvedBatch, offsets) -> list[RenderRow]:
    """RenderRow objects for the (valid) rows at `offsets` of a resolved batch."""
    import pyarrow as pa

    offsets = np.asarray(offsets, dtype=np.int64)
    if not len(offsets):
        return []
    take = pa.array(offsets)
    columns = [resolved.ids.take(take).to_pylist(), resolved.prompt.take(take).to_pylist(),
               resolved.negative_prompt.take(take).to_pylist(), resolved.format.take(take).to_pylist(),
               resolved.keys.take(take).to_pylist()]
    from qwen_worker.textcheck import expected_texts

    extras = resolved.extras
    return [
        RenderRow(row_index=resolved.start + int(offset), id=row_id, prompt=prompt, negative_prompt=negative,
                  width=int(resolved.width[offset]), height=int(resolved.height[offset]),
                  steps=int(resolved.steps[offset]), true_cfg_scale=float(resolved.true_cfg_scale[offset]),
                  seed=int(resolved.seed[offset]), keys=tuple(keys), format=fmt, inputs=extras.inputs[offset],
                  mask=extras.masks[offset], loras=extras.loras[offset], speed=extras.speeds[offset],
                  expected_text=tuple(expected_texts(prompt, extras.texts[offset])))
        for offset, row_id, prompt, negative, fmt, keys in zip(offsets.tolist(), *columns)
    ]


def row_messages(resolved: ResolvedBatch, offset: int) -> list[str]:
    """The error messages of one row of a resolved batch."""
    return [message for row, message in resolved.errors.first(10**9) if row == resolved.start + offset]


def resolve_row(index: int, raw: dict, context: ResolveContext) -> RenderRow:
    """One row (a dict of its columns) resolved like any manifest row; RowErrors listing its problems."""
    import pyarrow as pa

    columns = {name: [value] for name, value in raw.items() if name in COLUMN_TYPES}
    batch = pa.RecordBatch.from_pydict(columns) if columns else pa.RecordBatch.from_pydict({"id": [None]})
    resolved = resolve_batch(batch, index, context, with_seeds=True)
    if not resolved.valid[0]:
        raise RowErrors(row_messages(resolved, 0))
    return render_rows(resolved, [0])[0]
