"""The ledger read back: the newest record of each row wins, other jobs' records never count."""

import time

from jobs.ledger import STATE_COLUMNS, compact, read_ledger, shard_table, write_shard_ledger
from qwen_worker.rows import RowResult, RowStatus
from qwen_worker.stores import LocalStore


def result(row_index, status, worker="w"):
    return RowResult(row_index=row_index, id=f"row-{row_index:03d}", status=status, keys=[f"images/row-{row_index:03d}.png"],
                     worker=worker)


def test_the_newest_record_of_each_row_wins_and_other_jobs_never_count(tmp_path):
    store = LocalStore(tmp_path)
    done, failed = RowStatus.DONE, RowStatus.FAILED
    # an older segment: rows 0-3 of shard 0, row 1 failed
    compact(store, [(0, shard_table("qb-a", 0, [result(0, done), result(1, failed), result(2, done), result(3, failed)]))])
    time.sleep(0.01)  # segment names carry the time: this one is newer
    compact(store, [(0, shard_table("qb-a", 0, [result(1, done, worker="second"), result(3, failed, worker="second")]))])
    # a shard file (newer than every segment) of row 3, and another job's records of rows 0-5
    write_shard_ledger(store, "qb-a", 0, [result(3, done, worker="third")])
    write_shard_ledger(store, "qb-b", 1, [result(n, failed) for n in range(6)])

    for columns in (None, STATE_COLUMNS):
        ledger = read_ledger(store, "qb-a", columns=columns)
        assert ledger.rows.tolist() == [0, 1, 2, 3]
        assert ledger.done_mask(6).tolist() == [True, True, True, True, False, False]
    full = read_ledger(store, "qb-a")
    assert [r.worker for r in full.results(0, 6).values()] == ["w", "second", "w", "third"]
    assert read_ledger(store, "qb-b").status.tolist() == ["failed"] * 6
    assert len(read_ledger(store, "qb-none")) == 0
