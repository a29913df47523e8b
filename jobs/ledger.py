"""The ledger: Parquet files of finished rows, the job's source of truth for resume.

`_ledger/shard-NNNNN.parquet` holds the results of every row of one shard once all of them have
settled (stored, or failed for good). As a job runs, the driver compacts finished shard files
into `_ledger/segment-<time>-<id>.parquet` (one per COMPACT_EVERY shards), so a 1M-row job keeps
about 500 files instead of 31,000; files are fetched in parallel. A row in several files (a shard
re-run after a resume, a compaction cut short) counts as the newest: shard files are newer than
segments, later segments newer than earlier ones. Each record carries the job id, so a ledger left
by another job in the same output is never mistaken for ours.
"""

from __future__ import annotations

import io
import time
import uuid

import numpy as np

from qwen_worker.rows import RowResult, RowStatus
from qwen_worker.stores import Store

LEDGER_PREFIX = "_ledger/"
COMPACT_EVERY = 64  # finished shard files per segment


def ledger_key(shard_index: int) -> str:
    return f"{LEDGER_PREFIX}shard-{shard_index:05d}.parquet"


def segment_key() -> str:
    return f"{LEDGER_PREFIX}segment-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"


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
        ("error_kind", pa.string()),
        ("inputs_sha256", pa.list_(pa.string())),  # each input image (and mask) as the worker read it
        ("loras_sha256", pa.list_(pa.string())),  # each LoRA file as the worker loaded it
        ("text_score", pa.list_(pa.float64())),  # --check-text: per image, the stored attempt's score
        ("text_read", pa.list_(pa.string())),  # per image, what the OCR read
        ("text_missing", pa.list_(pa.string())),  # expected strings missing from the row's images
        ("image_seeds", pa.list_(pa.int64())),  # per image, the seed of what is stored (a re-roll's differs)
        ("rerolls", pa.int32()),
    ]


def ledger_schema():
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
            ("input_digest", pa.string()),  # versions of the row's input files (a resume re-renders on a change)
        ]
    )


def shard_table(job_id: str, shard_index: int, results: list[RowResult]):
    import pyarrow as pa

    records = []
    for result in sorted(results, key=lambda r: r.row_index):
        record = result.to_record()
        record.update(job_id=job_id, shard=shard_index)
        records.append(record)
    return pa.Table.from_pylist(records, schema=ledger_schema())


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_shard_ledger(store: Store, job_id: str, shard_index: int, results: list[RowResult]):
    """Write one finished shard's file; returns its table (for compaction)."""
    table = shard_table(job_id, shard_index, results)
    store.put(ledger_key(shard_index), _parquet_bytes(table))
    return table


def compact(store: Store, written: list[tuple[int, object]]) -> None:
    """Merge finished shard files (index, table) into one segment, then delete them. A crash in
    between leaves both, which reads the same."""
    import pyarrow as pa

    if not written:
        return
    store.put(segment_key(), _parquet_bytes(pa.concat_tables([table for _index, table in written])))
    for shard_index, _table in written:
        store.delete(ledger_key(shard_index))


class Ledger:
    """Every ledger record of one job, one per row (the newest), as an Arrow table sorted by row."""

    def __init__(self, table):
        self.table = table
        self.rows = np.asarray(table.column("row_index").to_numpy(zero_copy_only=False), dtype=np.int64)
        self.status = np.asarray(table.column("status").to_numpy(zero_copy_only=False))

    def __len__(self) -> int:
        return len(self.rows)

    def done_mask(self, total: int) -> np.ndarray:
        mask = np.zeros(total, dtype=bool)
        done = self.rows[(self.status == RowStatus.DONE.value) & (self.rows < total)]
        mask[done] = True
        return mask

    def input_digests(self, row_indices: np.ndarray) -> list[str | None]:
        """The input digest each row was rendered with (None: not in the ledger)."""
        positions, found = self.positions(row_indices)
        digests = self.table.column("input_digest").to_pylist() if len(self.table) else []
        return [digests[int(p)] or "" if f else None for p, f in zip(positions, found)]

    def counts(self) -> dict[str, int]:
        values, counts = np.unique(self.status.astype(str), return_counts=True)
        found = dict(zip(values.tolist(), counts.tolist()))
        return {status.value: int(found.get(status.value, 0)) for status in RowStatus}

    def positions(self, row_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in the table, found) for each row index."""
        positions = np.searchsorted(self.rows, row_indices)
        positions = np.minimum(positions, max(len(self.rows) - 1, 0))
        found = (self.rows[positions] == row_indices) if len(self.rows) else np.zeros(len(row_indices), dtype=bool)
        return positions, found

    def results(self, start: int, stop: int, *, status: RowStatus | None = None) -> dict[int, RowResult]:
        """RowResults of the rows in [start, stop) (of one status), by row index."""
        low, high = np.searchsorted(self.rows, start), np.searchsorted(self.rows, stop)
        found = {}
        for record in self.table.slice(low, high - low).to_pylist():
            if status is None or record["status"] == status.value:
                found[record["row_index"]] = RowResult.from_record(record)
        return found

    def failed_rows(self) -> list[dict]:
        import pyarrow.compute as pc

        failed = self.table.filter(pc.equal(self.table.column("status"), RowStatus.FAILED.value))
        return [{"row_index": r["row_index"], "id": r["id"], "error": r["error"]}
                for r in failed.select(["row_index", "id", "error"]).to_pylist()]


STATE_COLUMNS = ("job_id", "row_index", "status", "input_digest")  # what a resume needs to know which rows are done


def read_ledger(store: Store, job_id: str, *, columns: tuple[str, ...] | None = None) -> Ledger:
    """Every ledger record of `job_id` (files fetched in parallel), the newest per row. `columns`:
    read only these (e.g. STATE_COLUMNS: which rows are done, at a fraction of the cost; such a
    Ledger cannot give whole RowResults)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    keys = [key for key in store.list_keys(LEDGER_PREFIX) if key.endswith(".parquet")]
    segments = sorted(key for key in keys if key.rsplit("/", 1)[-1].startswith("segment-"))
    shards = sorted(key for key in keys if key.rsplit("/", 1)[-1].startswith("shard-"))
    schema = ledger_schema()
    if columns is not None:
        wanted = set(columns) | {"job_id", "row_index", "status"}
        schema = pa.schema([field for field in schema if field.name in wanted])
    tables = []
    for _key, data in store.get_many(segments + shards):
        parquet_file = pq.ParquetFile(io.BytesIO(data))
        table = parquet_file.read(columns=[name for name in schema.names if name in parquet_file.schema_arrow.names])
        for name in schema.names:  # files of an older version lack newer columns
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
        tables.append(table.select(schema.names).cast(schema))
    if not tables:
        return Ledger(schema.empty_table())
    table = pa.concat_tables(tables)  # (no copy: the files' tables become its chunks)
    del tables
    ours = np.flatnonzero(pc.fill_null(pc.equal(table.column("job_id"), job_id), False).to_numpy())
    rows = table.column("row_index").to_numpy()
    order = ours[np.argsort(rows[ours], kind="stable")]  # by row; a row's records stay in file order
    by_row = rows[order]
    newest = np.ones(len(order), dtype=bool)
    newest[:-1] = by_row[:-1] != by_row[1:]  # the last record of each row is its newest
    return Ledger(table.take(pa.array(order[newest])))  # one copy of what is kept
