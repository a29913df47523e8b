"""A terminal progress line: rows done of total, rows/s, ETA, failures. No dependencies."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Redraws one line on a terminal; prints a line every `interval` seconds otherwise."""

    def __init__(self, total: int, *, already_done: int = 0, stream=None, enabled: bool = True, interval: float = 10.0):
        self.total = total
        self.done = already_done
        self.failed = 0
        self.started_with = already_done
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.interval = interval if not self.interactive else 0.2
        self.started = time.monotonic()
        self._first_settled_at: float | None = None  # rate counts from the first row (after start-up)
        self._settled_before_rate = already_done
        self._last_draw = 0.0

    def rate(self) -> float:
        if self._first_settled_at is None:
            return 0.0
        elapsed = time.monotonic() - self._first_settled_at
        counted = self.done + self.failed - self._settled_before_rate
        return counted / elapsed if elapsed > 0 and counted > 0 else 0.0

    def eta_seconds(self) -> float | None:
        rate = self.rate()
        remaining = self.total - self.done - self.failed
        return remaining / rate if rate > 0 else None

    def line(self) -> str:
        settled = self.done + self.failed
        percent = 100.0 * settled / self.total if self.total else 100.0
        width = 24
        filled = int(width * settled / self.total) if self.total else width
        eta = self.eta_seconds()
        parts = [
            f"[{'#' * filled}{'.' * (width - filled)}] {settled}/{self.total} rows ({percent:.0f}%)",
            f"{self.rate():.2f} rows/s",
            f"ETA {format_duration(eta) if eta is not None else '--:--:--'}",
        ]
        if self.failed:
            parts.append(f"{self.failed} failed")
        return " | ".join(parts)

    def update(self, *, done: int = 0, failed: int = 0, force: bool = False) -> None:
        now = time.monotonic()
        if self._first_settled_at is None and done + failed > 0:
            self._first_settled_at = now
            self._settled_before_rate = self.done + self.failed + done + failed
        self.done += done
        self.failed += failed
        if self.enabled and (force or now - self._last_draw >= self.interval):
            self._last_draw = now
            end = "\r" if self.interactive else "\n"
            self.stream.write(self.line() + end)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write(self.line() + "\n")
            self.stream.flush()


PROGRESS_KEY = "_progress.json"


class ProgressFile:
    """Writes `_progress.json` to the output every `interval` seconds, so `status` (and `submit
    --wait` on a cluster) can show live progress and ETA without access to Ray."""

    def __init__(self, store, job_id: str, bar: ProgressBar, *, interval: float = 5.0):
        self.store, self.job_id, self.bar, self.interval = store, job_id, bar, interval
        self._last = 0.0

    def write(self, state: str = "running", *, force: bool = False) -> None:
        import datetime as dt
        import json

        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
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
        try:
            self.store.put(PROGRESS_KEY, json.dumps(record).encode())
        except Exception:  # progress is best effort: never stop a job for it
            pass
