"""Small helpers shared by tests (import as `from helpers import ...`)."""


def tiny_rows(count, *, prefix="row", size=32, **extra):
    """`count` small valid rows for the tiny model (32x32, 2 steps)."""
    prompts = ["a red poster", "香港 旅游 指南", "a bottle of perfume", "官方通知 标题", "menu 菜单"]
    return [
        {"id": f"{prefix}-{n:03d}", "prompt": prompts[n % len(prompts)] + f" #{n}", "width": size, "height": size,
         "steps": 2, **extra}
        for n in range(count)
    ]


def ledger_rows(output):
    """The ledger records of the job in a local output (the newest per row), as dicts."""
    import json
    from pathlib import Path

    from jobs.ledger import read_ledger
    from qwen_worker.stores import LocalStore

    job_id = json.loads((Path(output) / "job.json").read_text())["job_id"]
    return read_ledger(LocalStore(output), job_id).table.to_pylist()


def forget_ledger_rows(output, row_indices):
    """Rewrite a local output's ledger files without these rows: a crash came before their ledger write."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in Path(output, "_ledger").glob("*.parquet"):
        table = pq.read_table(path)
        kept = table.filter(pc.invert(pc.is_in(table.column("row_index"), value_set=pa.array(list(row_indices)))))
        pq.write_table(kept, path)
