"""results.parquet: one row per manifest row, merged from the ledger at the end of a job.

Written by streaming the manifest batch by batch; columns the manifest has that qwen-batch does
not know are carried through unchanged (same Arrow type).
"""

from __future__ import annotations

import io

from jobs.ledger import outcome_columns
from jobs.manifest import COLUMN_TYPES, READ_BATCH_ROWS, ResolveContext, RowErrors, resolve_row
from jobs.plan import JobPlan, open_job_manifest
from qwen_worker.presets import get_preset
from qwen_worker.rows import RowResult
from qwen_worker.stores import Store

RESULTS_KEY = "results.parquet"


def _result_schema():
    import pyarrow as pa

    return [
        ("id", pa.string()),
        ("status", pa.string()),
        ("keys", pa.list_(pa.string())),
        ("sha256", pa.list_(pa.string())),
        ("seed", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("steps", pa.int32()),
        ("true_cfg_scale", pa.float64()),
        ("format", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("template", pa.string()),
        *outcome_columns(),
    ]


def _record(row, result: RowResult | None, template: str | None) -> dict:
    record = {
        "id": row.id,
        "status": result.status.value if result else "pending",
        "keys": list(row.keys),
        "sha256": result.sha256 if result else [],
        "seed": row.seed,
        "width": row.width,
        "height": row.height,
        "steps": row.steps,
        "true_cfg_scale": row.true_cfg_scale,
        "format": row.format,
        "prompt": row.prompt,
        "negative_prompt": row.negative_prompt,
        "template": template,
    }
    for name, _type in outcome_columns():
        record[name] = getattr(result, name) if result else None
    return record


def _unresolved(index: int, raw: dict):
    from qwen_worker.rows import RenderRow

    return RenderRow(row_index=index, id=str(raw.get("id") or ""), prompt=raw.get("prompt") or "",
                     negative_prompt=raw.get("negative_prompt") or "", width=0, height=0, steps=0,
                     true_cfg_scale=0.0, seed=0, keys=())


def write_results(store: Store, plan: JobPlan, ledger: dict[int, RowResult], template_dirs=()) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_file = open_job_manifest(plan, store)
    names = parquet_file.schema_arrow.names
    passthrough = [name for name in names if name not in COLUMN_TYPES]
    ours = _result_schema()
    schema = pa.schema(ours + [parquet_file.schema_arrow.field(name) for name in passthrough])
    context = ResolveContext(preset=get_preset(plan.model), job_seed=plan.seed, template_dirs=tuple(template_dirs))
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, schema) as writer:
        index = 0
        for batch in parquet_file.iter_batches(batch_size=READ_BATCH_ROWS):
            records = []
            for raw in batch.to_pylist():
                try:
                    row = resolve_row(index, {k: v for k, v in raw.items() if v is not None}, context)
                except RowErrors:  # failed as a row error (its ledger entry says why)
                    row = _unresolved(index, raw)
                records.append(_record(row, ledger.get(index), raw.get("template")))
                index += 1
            columns = {name: pa.array([r[name] for r in records], type=type_) for name, type_ in ours}
            for name in passthrough:
                columns[name] = batch.column(name)
            writer.write_table(pa.table(columns, schema=schema))
    store.put(RESULTS_KEY, buffer.getvalue())


def read_results(store: Store):
    """results.parquet as a pyarrow Table; KeyError when the job has not written it yet."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.get(RESULTS_KEY)))
