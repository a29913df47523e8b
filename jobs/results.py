"""results.parquet: one row per manifest row, merged from the ledger at the end of a job.

Written streaming, batch by batch, on whole columns: the manifest's resolved columns, joined with
the ledger by row index. Columns the manifest has that qwen-batch does not know are carried
through unchanged (same Arrow type, never converted); one named like a result column (`status`,
`error`, `keys`, ...) is carried as `manifest.<name>`, so the two never collide.
"""

from __future__ import annotations

import io
import json

import numpy as np

from jobs.ledger import Ledger, outcome_columns
from jobs.manifest import COLUMN_TYPES, iter_resolved
from jobs.manifest.read import iter_batches
from jobs.plan import JobPlan, open_job_manifest, resolve_context
from qwen_worker.stores import Store

RESULTS_KEY = "results.parquet"
RESULTS_STATE_KEY = "_results.json"  # results.parquet and report.html merge the ledger as it is now
PASSTHROUGH_PREFIX = "manifest."


def result_schema():
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
        ("inputs", pa.list_(pa.string())),  # input images (edit models, references), then the mask
        ("loras", pa.list_(pa.string())),  # source:scale of each adapter (the Lightning one included)
        ("speed", pa.string()),
        *outcome_columns(),
    ]


def passthrough_names(names: list[str]) -> dict[str, str]:
    """Manifest column -> its name in results.parquet, for the columns qwen-batch passes through."""
    ours = {name for name, _type in result_schema()}
    renamed = {}
    for name in names:
        if name in COLUMN_TYPES:
            continue
        target = name
        while target in ours or target in renamed.values():
            target = PASSTHROUGH_PREFIX + target
        renamed[name] = target
    return renamed


def write_results(store: Store, plan: JobPlan, ledger: Ledger, template_dirs=()) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet_file = open_job_manifest(plan, store)
    manifest_schema = parquet_file.schema_arrow
    renamed = passthrough_names(manifest_schema.names)
    ours = result_schema()
    schema = pa.schema(ours + [manifest_schema.field(name).with_name(target) for name, target in renamed.items()])
    context = resolve_context(plan, template_dirs, store_options=store.worker_options())
    passthrough = iter_batches(parquet_file, plan.manifest, columns=list(renamed)) if renamed else None
    ledger_table = ledger.table
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, schema) as writer:
        for resolved in iter_resolved(parquet_file, plan.manifest, context):
            rows = np.arange(resolved.start, resolved.start + resolved.size, dtype=np.int64)
            positions, found = ledger.positions(rows)
            settled = ledger_table.take(pa.array(positions)) if len(ledger_table) else None
            found_mask = pa.array(found)

            def from_ledger(name, fallback, type_):
                if settled is None:
                    return pa.array(fallback, type=type_) if fallback is not None else pa.nulls(resolved.size, type_)
                values = settled.column(name).combine_chunks().cast(type_)
                fallback = fallback if fallback is not None else pa.nulls(resolved.size, type_)
                return pc.if_else(found_mask, values, pa.array(fallback, type=type_) if not isinstance(fallback, pa.Array)
                                  else fallback.cast(type_))

            valid = pa.array(resolved.valid)
            columns = {
                "id": resolved.ids,
                "status": from_ledger("status", pa.array(["pending"] * resolved.size), pa.string()),
                "keys": pc.if_else(found_mask, settled.column("keys").combine_chunks(), resolved.keys)
                if settled is not None else resolved.keys,
                "sha256": from_ledger("sha256", pa.array([[]] * resolved.size, pa.list_(pa.string())),
                                      pa.list_(pa.string())),
                "seed": from_ledger("seed", pa.array(resolved.seed), pa.int64()),
                "width": pc.if_else(valid, pa.array(resolved.width, pa.int32()), pa.scalar(None, pa.int32())),
                "height": pc.if_else(valid, pa.array(resolved.height, pa.int32()), pa.scalar(None, pa.int32())),
                "steps": pc.if_else(valid, pa.array(resolved.steps, pa.int32()), pa.scalar(None, pa.int32())),
                "true_cfg_scale": pc.if_else(valid, pa.array(resolved.true_cfg_scale), pa.scalar(None, pa.float64())),
                "format": resolved.format,
                "prompt": pc.if_else(valid, resolved.prompt, pa.scalar(None, pa.string())),
                "negative_prompt": pc.if_else(valid, resolved.negative_prompt, pa.scalar(None, pa.string())),
                "template": resolved.template,
                **_extras_columns(resolved),
            }
            for name, type_ in outcome_columns():
                columns[name] = from_ledger(name, None, type_)
            arrays = [columns[name].cast(type_) for name, type_ in ours]
            if passthrough is not None:
                _start, extra = next(passthrough)
                arrays += [extra.column(name) for name in renamed]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    store.put(RESULTS_KEY, buffer.getvalue())


def _state(plan: JobPlan) -> bytes:
    from importlib.metadata import version

    return json.dumps({"job_id": plan.job_id, "qwen_batch": version("qwen-batch")}, sort_keys=True).encode()


def results_current(store: Store, plan: JobPlan) -> bool:
    """True when results.parquet and report.html were merged from this job's ledger as it still is
    (by this version of qwen-batch): a resume that settled nothing need not merge a million rows again."""
    from jobs.report import REPORT_KEY

    try:
        return store.get(RESULTS_STATE_KEY) == _state(plan) and store.exists(RESULTS_KEY) and store.exists(REPORT_KEY)
    except Exception:  # no marker, or it cannot be read now: merge again (never wrong, only slower)
        return False


def mark_results_current(store: Store, plan: JobPlan) -> None:
    store.put(RESULTS_STATE_KEY, _state(plan), content_type="application/json")


def ledger_changes(store: Store) -> None:
    """Called before a run first writes the ledger: what results.parquet merged is no longer all."""
    store.delete(RESULTS_STATE_KEY)


def read_results(store: Store):
    """results.parquet as a pyarrow Table; KeyError when the job has not written it yet."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.get(RESULTS_KEY)))


def _extras_columns(resolved) -> dict:
    """inputs / loras / speed of each row, as results.parquet shows them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    extras, valid = resolved.extras, resolved.valid
    is_valid = pa.array(valid)
    speed = pc.if_else(is_valid, pa.array(extras.speeds, pa.string()), pa.scalar(None, pa.string()))
    if not any(extras.inputs) and not any(extras.loras) and all(mask is None for mask in extras.masks):
        empty = pc.if_else(is_valid, pa.scalar([], pa.list_(pa.string())), pa.scalar(None, pa.list_(pa.string())))
        return {"inputs": empty, "loras": empty, "speed": speed}  # text-to-image rows without LoRAs (most jobs)
    inputs = [[ref.uri for ref in (*extras.inputs[i], *([extras.masks[i]] if extras.masks[i] else []))] if valid[i]
              else None for i in range(resolved.size)]
    loras = [[ref.describe() for ref in extras.loras[i]] if valid[i] else None for i in range(resolved.size)]
    return {"inputs": pa.array(inputs, pa.list_(pa.string())), "loras": pa.array(loras, pa.list_(pa.string())),
            "speed": speed}
