"""Progress of a job: a tqdm bar on a terminal (or a notebook widget), a plain line every few seconds
when the output is a log file or a pipe, and `_progress.json` in the output for `status` and for
`submit --wait` against a cluster.

Rows/s and the ETA count from the start of this run and only the rows it settled, so a resume of a
mostly finished job does not show the rate of rows done last week.
"""

from __future__ import annotations

import sys
import time

PROGRESS_KEY = "_progress.json"


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Rows settled of `total`. On a terminal a tqdm bar (tqdm.auto: a widget in Jupyter); otherwise
    one line every `interval` seconds, formatted by tqdm's own meter."""

    def __init__(self, total: int, *, already_done: int = 0, stream=None, enabled: bool = True, interval: float = 10.0):
        self.total = total
        self.done = already_done
        self.failed = 0
        self.started_with = already_done
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interval = interval
        self.started = time.monotonic()
        self._reported: tuple[float, float | None] | None = None  # (rows/s, ETA) a remote driver reported
        self._last_line = 0.0
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=already_done, unit="row", file=self.stream, smoothing=0,
                             dynamic_ncols=True, mininterval=0.2, leave=True)

    @property
    def interactive(self) -> bool:
        return self._bar is not None

    def rate(self) -> float:
        """Rows settled per second since this run started (or what the remote driver reports)."""
        if self._reported is not None:
            return self._reported[0]
        elapsed = time.monotonic() - self.started
        counted = self.done + self.failed - self.started_with
        return counted / elapsed if elapsed > 0 and counted > 0 else 0.0

    def eta_seconds(self) -> float | None:
        if self._reported is not None:
            return self._reported[1]
        rate = self.rate()
        remaining = self.total - self.done - self.failed
        return remaining / rate if rate > 0 else None

    def line(self) -> str:
        from tqdm import tqdm

        rate = self.rate()
        postfix = f"{self.failed} failed" if self.failed else None
        return tqdm.format_meter(n=self.done + self.failed, total=self.total, elapsed=time.monotonic() - self.started,
                                 unit="row", rate=rate if rate > 0 else None, initial=self.started_with,
                                 postfix=postfix, ncols=100)

    def update(self, *, done: int = 0, failed: int = 0, force: bool = False) -> None:
        self.done += done
        self.failed += failed
        if self._bar is not None:
            if failed:
                self._bar.set_postfix_str(f"{self.failed} failed", refresh=False)
            self._bar.update(done + failed)
            return
        now = time.monotonic()
        if self.enabled and (force or now - self._last_line >= self.interval):
            self._last_line = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def show_remote(self, *, done: int, failed: int, rows_per_s: float | None, eta_s: float | None) -> None:
        """Follow a driver that runs elsewhere (a cluster job): its counts, rate and ETA."""
        self._reported = (rows_per_s or 0.0, eta_s)
        self.update(done=done - self.done, failed=failed - self.failed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self.stream.write(self.line() + "\n")
            self.stream.flush()


class ProgressFile:
    """Writes `_progress.json` to the output every `interval` seconds, so `status` (and `submit
    --wait` on a cluster) can show live progress and ETA without access to Ray."""

    def __init__(self, store, job_id: str, bar: ProgressBar, *, interval: float = 5.0):
        self.store, self.job_id, self.bar, self.interval = store, job_id, bar, interval
        self.pool = None  # callable: the worker pool's summary (ready / starting / pending resources)
        self._last = 0.0
        self._pool_seen: dict | None = None

    def write(self, state: str = "running", *, force: bool = False) -> None:
        import datetime as dt
        import json

        now = time.monotonic()
        pool = self.pool() if self.pool is not None else None
        counts = {k: pool[k] for k in ("ready", "starting", "pending", "draining")} if pool else None
        if not force and now - self._last < self.interval and counts == self._pool_seen:
            return  # written at once when the pool changed: `status` shows a wait for nodes as it starts
        self._last, self._pool_seen = now, counts
        eta = self.bar.eta_seconds()
        record = {
            "job_id": self.job_id,
            "state": state,
            "total": self.bar.total,
            "done": self.bar.done,
            "failed": self.bar.failed,
            "rows_per_s": round(self.bar.rate(), 4),
            "eta_s": round(eta, 1) if eta is not None else None,
            "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if pool is not None:
            record["workers"] = pool
        try:
            self.store.put(PROGRESS_KEY, json.dumps(record).encode())
        except Exception:  # progress is best effort: never stop a job for it
            pass
