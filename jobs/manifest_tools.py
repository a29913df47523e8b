"""Make Parquet manifests: from a CSV or JSON Lines file, or a sample one per template.

Manifest columns (DESIGN.md): id, prompt, template, params (a JSON object string),
negative_prompt, width, height, aspect_ratio, steps, true_cfg_scale, seed, language, num_images,
format, output_key. They are always all written, null where a row does not set them, with fixed
Arrow types (strings as string, integers as int64, true_cfg_scale as float64). Other input columns
pass through unchanged, or, with `template=NAME`, become that template's params: a CSV with the
columns `id,title,price` and `--template product-poster` gives rows whose `params` is
{"title": …, "price": …}. Every templated row is rendered once here, so a missing or misspelt
param is reported now, with its line, not when the job runs.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.templates import Template, TemplateError, TemplateLibrary, load_library, parse_params
from qwen_worker.errors import UserError

MANIFEST_COLUMNS: dict[str, pa.DataType] = {
    "id": pa.string(),
    "prompt": pa.string(),
    "template": pa.string(),
    "params": pa.string(),
    "negative_prompt": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "aspect_ratio": pa.string(),
    "steps": pa.int64(),
    "true_cfg_scale": pa.float64(),
    "seed": pa.int64(),
    "language": pa.string(),
    "num_images": pa.int64(),
    "format": pa.string(),
    "output_key": pa.string(),
    "image": pa.string(),
    "images": pa.list_(pa.string()),
    "mask": pa.string(),
    "lora": pa.list_(pa.string()),
    "speed": pa.string(),
    "text": pa.list_(pa.string()),
}
MAX_REPORTED_ERRORS = 20
MAX_SAMPLE_ROWS = 100_000


class ManifestInputError(UserError):
    """The input file cannot become a manifest; the message lists every bad row."""


# ---------------------------------------------------------------------------------------------
# reading inputs: each record is (where, {column: value}) with `where` like "line 3"


def read_csv_records(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a CSV file with a header line (UTF-8, a BOM from spreadsheets is fine).
    Values stay strings; empty cells become None."""
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    records = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if not header:
                raise ManifestInputError(f"{path}: empty file, expected a header line with at least `id`")
            columns = [c.strip() for c in header]
            _check_header(path, columns)
            for row in reader:
                where = f"line {reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                if len(row) != len(columns):
                    raise ManifestInputError(
                        f"{path} {where}: expected {len(columns)} cells like the header, got: {len(row)}"
                    )
                records.append((where, {c: (v if v != "" else None) for c, v in zip(columns, row)}))
        except csv.Error as exc:
            raise ManifestInputError(f"{path} line {reader.line_num}: bad CSV: {exc}") from None
        except UnicodeDecodeError:
            raise ManifestInputError(f"{path}: not UTF-8 text (save the CSV as UTF-8)") from None
    return records


def _check_header(path: Path, columns: list[str]) -> None:
    if "" in columns:
        raise ManifestInputError(f"{path}: header has an empty column name (column {columns.index('') + 1})")
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise ManifestInputError(f"{path}: duplicate column(s) {', '.join(duplicates)} in the header")


def read_jsonl_records(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a JSON Lines file: one JSON object per line; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ManifestInputError(f"{path}: not UTF-8 text") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ManifestInputError(f"{path} line {number}: not valid JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise ManifestInputError(f"{path} line {number}: expected a JSON object, got: {type(value).__name__}")
        records.append((f"line {number}", value))
    return records


# ---------------------------------------------------------------------------------------------
# building the table


class _RowError(Exception):
    pass


def _as_int(column: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _RowError(f"`{column}` must be an integer, got: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _RowError(f"`{column}` must be an integer, got: {value!r}")


def _as_float(column: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _RowError(f"`{column}` must be a number, got: {value!r}") from None
    else:
        raise _RowError(f"`{column}` must be a number, got: {value!r}")
    if not math.isfinite(number):
        raise _RowError(f"`{column}` must be a finite number, got: {value!r}")
    return number


def _as_str(column: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _RowError(f"`{column}` must be a string, got: {type(value).__name__} {value!r}")


def _coerce(column: str, value: Any) -> Any:
    kind = MANIFEST_COLUMNS[column]
    if kind == pa.int64():
        return _as_int(column, value)
    if kind == pa.float64():
        return _as_float(column, value)
    if column == "params":
        return parse_params(value)  # a dict here; serialised after the template check
    if kind == pa.list_(pa.string()):
        return _as_list(column, value)
    return _as_str(column, value)


def _as_list(column: str, value: Any) -> list[str]:
    """A list column from JSONL (a list) or CSV (a JSON list, or items separated by ';')."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise _RowError(f"`{column}` must be a JSON list of strings or items separated by ';', got: {value!r}") from None
        else:
            return [item.strip() for item in text.split(";") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise _RowError(f"`{column}` must be a list of strings (or text: a JSON list, or items separated by ';'), got: {value!r}")


def build_manifest(
    records: Iterable[tuple[str, dict]],
    *,
    template: str | None = None,
    library: TemplateLibrary | None = None,
    source: str = "input",
) -> pa.Table:
    """The manifest table for `records` ((where, row) pairs from a reader).

    With `template`, every column that is not a manifest column becomes a param of that template
    (merged with a `params` column if there is one). Any row naming a template is rendered once to
    check its params. Errors for ALL rows are collected and raised together as ManifestInputError."""
    records = list(records)
    if template is not None or any(row.get("template") for _, row in records):
        library = library or load_library()
    if template is not None:
        library.get(template)  # unknown template: fail once, before any row

    rows: list[dict] = []
    errors: list[str] = []
    seen_ids: dict[str, str] = {}
    extra_columns: list[str] = []
    for where, record in records:
        row_id = record.get("id")
        label = f"{where} (id {row_id!r})" if isinstance(row_id, str) and row_id.strip() else where
        try:
            row, extras = _build_row(record, template=template, library=library)
            if row["id"] in seen_ids:
                raise _RowError(f"`id` must be unique, got: {row['id']!r} (also on {seen_ids[row['id']]})")
            seen_ids[row["id"]] = where
        except (_RowError, TemplateError) as exc:
            errors.append(f"{label}: {exc}")
            continue
        for name in extras:
            if name not in extra_columns:
                extra_columns.append(name)
        row.update(extras)
        rows.append(row)

    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = len(errors) - len(shown)
        lines = "\n  ".join(shown + ([f"… and {more} more"] if more else []))
        raise ManifestInputError(f"{source}: {len(errors)} bad row(s), nothing written:\n  {lines}")
    if not rows:
        raise ManifestInputError(f"{source}: no rows")
    return rows_to_table(rows, extra_columns)


def _build_row(record: dict, *, template: str | None, library: TemplateLibrary | None) -> tuple[dict, dict]:
    record = {str(k).strip(): v for k, v in record.items()}
    row: dict[str, Any] = {name: None for name in MANIFEST_COLUMNS}
    extras: dict[str, Any] = {}
    for column, value in record.items():
        if value is None:
            continue
        if column in MANIFEST_COLUMNS:
            row[column] = _coerce(column, value)
        else:
            extras[column] = value

    if row["id"] is None or not str(row["id"]).strip():
        raise _RowError("`id` is required")
    if template is not None:
        if row["template"] not in (None, template):
            raise _RowError(f"`template` is {row['template']!r} but --template is {template!r}")
        row["template"] = template
        params = dict(row["params"] or {})
        for name, value in extras.items():
            if name in params:
                raise _RowError(f"param `{name}` is given both as a column and inside `params`")
            params[name] = value
        row["params"] = params
        extras = {}

    if row["template"] is not None:
        if row["prompt"] is not None:
            raise _RowError("give either `prompt` or `template` + `params`, not both")
        tmpl = library.get(row["template"])
        tmpl.render(row["params"] or {})  # raises TemplateError naming the broken rule
        _apply_template_defaults(row, tmpl)
    elif row["prompt"] is None:
        raise _RowError("`prompt` (or `template` + `params`) is required")
    elif row["params"] is not None:
        raise _RowError("`params` needs a `template`")
    if row["params"] is not None:
        row["params"] = json.dumps(row["params"], ensure_ascii=False)
    return row, extras


def _apply_template_defaults(row: dict, template: Template) -> None:
    """A templated row gets the template's language, negative prompt and aspect ratio unless it
    sets them (or sets width/height, which replace the aspect ratio)."""
    for column, value in template.row_defaults().items():
        if row[column] is not None:
            continue
        if column == "aspect_ratio" and (row["width"] is not None or row["height"] is not None):
            continue
        row[column] = value


def rows_to_table(rows: Sequence[dict], extra_columns: Sequence[str] = ()) -> pa.Table:
    """Arrow table with every manifest column (fixed types) then the pass-through columns."""
    arrays, names = [], []
    for name, kind in MANIFEST_COLUMNS.items():
        arrays.append(pa.array([row.get(name) for row in rows], type=kind))
        names.append(name)
    for name in extra_columns:
        values = [row.get(name) for row in rows]
        try:
            array = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            array = pa.array([_as_text(v) for v in values], type=pa.string())
        if pa.types.is_null(array.type):
            array = array.cast(pa.string())
        arrays.append(array)
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def write_manifest(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    if str(path).startswith("s3://"):
        raise UserError(f"write the manifest to a local path, then copy it: {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def convert_to_manifest(
    in_path: str | Path,
    out_path: str | Path,
    *,
    input_format: str,
    template: str | None = None,
    template_dirs: Sequence[str | Path] = (),
) -> pa.Table:
    """CSV ("csv") or JSON Lines ("jsonl") file -> Parquet manifest at `out_path`."""
    readers = {"csv": read_csv_records, "jsonl": read_jsonl_records}
    if input_format not in readers:
        raise UserError(f"input format must be csv or jsonl, got: {input_format!r}")
    records = readers[input_format](in_path)
    library = load_library(template_dirs) if (template or template_dirs) else None
    table = build_manifest(records, template=template, library=library, source=str(in_path))
    write_manifest(table, out_path)
    return table


# ---------------------------------------------------------------------------------------------
# sample manifests


def sample_rows(template: Template, rows: int) -> list[dict]:
    """`rows` example rows for `template`: ids `<name>-0001`…, params cycling through the
    template's example values, a seed derived from the id. Same arguments, same rows."""
    if not 1 <= rows <= MAX_SAMPLE_ROWS:
        raise UserError(f"`rows` must be between 1 and {MAX_SAMPLE_ROWS}, got: {rows}")
    out = []
    for index in range(rows):
        row_id = f"{template.name}-{index + 1:04d}"
        row = {name: None for name in MANIFEST_COLUMNS}
        row.update(
            id=row_id,
            template=template.name,
            params=json.dumps(template.sample_params(index), ensure_ascii=False),
            seed=zlib.crc32(row_id.encode()) & 0x7FFFFFFF,
            **template.row_defaults(),
        )
        out.append(row)
    return out


def sample_manifest(scenario: str, rows: int, *, library: TemplateLibrary | None = None) -> pa.Table:
    library = library or load_library()
    return rows_to_table(sample_rows(library.get(scenario), rows))


__all__ = [
    "MANIFEST_COLUMNS",
    "ManifestInputError",
    "build_manifest",
    "convert_to_manifest",
    "read_csv_records",
    "read_jsonl_records",
    "rows_to_table",
    "sample_manifest",
    "sample_rows",
    "write_manifest",
]
