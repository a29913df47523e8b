"""The ledger: per-shard Parquet files of finished rows, the job's source of truth for resume.

`_ledger/shard-NNNNN.parquet` holds the results of every row of one shard once all of them have
settled (stored, or failed for good). Each record carries the job id, so a ledger left by another
job in the same output is never mistaken for ours.
"""

from __future__ import annotations

import io

from qwen_worker.rows import RowResult, RowStatus
from qwen_worker.stores import Store

LEDGER_PREFIX = "_ledger/"


def ledger_key(shard_index: int) -> str:
    return f"{LEDGER_PREFIX}shard-{shard_index:05d}.parquet"


def outcome_columns() -> list:
    """How a row went (name, Arrow type): shared by the ledger and results.parquet."""
    import pyarrow as pa

    return [
        ("render_s", pa.float64()),
        ("upload_s", pa.float64()),
        ("attempts", pa.int32()),
        ("rendered", pa.bool_()),
        ("worker", pa.string()),
        ("error", pa.string()),
    ]


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("job_id", pa.string()),
            ("shard", pa.int32()),
            ("row_index", pa.int64()),
            ("id", pa.string()),
            ("status", pa.string()),
            ("keys", pa.list_(pa.string())),
            ("sha256", pa.list_(pa.string())),
            ("seed", pa.int64()),
            *outcome_columns(),
            ("error_kind", pa.string()),
        ]
    )


def write_shard_ledger(store: Store, job_id: str, shard_index: int, results: list[RowResult]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for result in sorted(results, key=lambda r: r.row_index):
        record = result.to_record()
        record.update(job_id=job_id, shard=shard_index)
        records.append(record)
    table = pa.Table.from_pylist(records, schema=_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.put(ledger_key(shard_index), buffer.getvalue())


def read_ledger(store: Store, job_id: str) -> dict[int, RowResult]:
    """Every ledger record of `job_id`, by row index."""
    import pyarrow.parquet as pq

    results: dict[int, RowResult] = {}
    for key in sorted(store.list_keys(LEDGER_PREFIX)):
        if not key.endswith(".parquet"):
            continue
        for record in pq.read_table(io.BytesIO(store.get(key))).to_pylist():
            if record["job_id"] == job_id:
                results[record["row_index"]] = RowResult.from_record(record)
    return results


def count_by_status(ledger: dict[int, RowResult]) -> dict[str, int]:
    counts = {status.value: 0 for status in RowStatus}
    for result in ledger.values():
        counts[result.status.value] += 1
    return counts
