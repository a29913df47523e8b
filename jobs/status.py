"""Job status from what is stored in the output (job.json + ledger); needs no Ray."""

from __future__ import annotations

from jobs.ledger import read_ledger
from jobs.plan import JOB_RECORD_KEY, JobPlan
from qwen_worker.errors import UserError
from qwen_worker.rows import RowStatus
from qwen_worker.stores import open_store


def job_status(dest: str) -> dict:
    store = open_store(dest)
    try:
        plan = JobPlan.from_json(store.get(JOB_RECORD_KEY))
    except KeyError:
        raise UserError(f"no job found in {dest} (it has no {JOB_RECORD_KEY})") from None
    ledger = read_ledger(store, plan.job_id)
    live = _live_progress(store, plan.job_id)
    counts = ledger.counts()
    done, failed = counts[RowStatus.DONE.value], counts[RowStatus.FAILED.value]
    return {
        "job_id": plan.job_id,
        "output": plan.output,
        "model": plan.model,
        "manifest": plan.manifest_source,
        "total": plan.rows,
        "done": done,
        "failed": failed,
        "pending": plan.rows - done - failed,
        "live": live,
        "failed_rows": ledger.failed_rows(),
    }


def _live_progress(store, job_id: str) -> dict | None:
    """The driver's last `_progress.json` for this job (rows settled in shards not yet in the
    ledger, rate, ETA, state), or None."""
    import json

    from jobs.progress import PROGRESS_KEY

    try:
        record = json.loads(store.get(PROGRESS_KEY))
    except (KeyError, ValueError):
        return None
    return record if record.get("job_id") == job_id else None
