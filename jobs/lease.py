"""One driver per job at a time: a lease object in the output, renewed by a heartbeat.

`_lease.json` names the driver holding the output (a random id, host, pid, job id) and when its
lease expires. A second driver of the same output (two submits, a scheduler and a person) finds
a live lease and stops with one line; a driver that crashed stops renewing, so its lease expires
(at once when the holder was a process on this host that no longer exists) and a resume takes
over. Every write is a compare-and-swap, so two drivers can never both believe they hold it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from qwen_worker.errors import JobBusyError

LEASE_KEY = "_lease.json"
DEFAULT_TTL_S = 30.0


CLAIM_WAIT_S = 20.0  # how long a driver waits out a submit that holds the lease only to claim the output


class DriverLease:
    def __init__(self, store, job_id: str, *, ttl_s: float = DEFAULT_TTL_S, clock=time.time, purpose: str = "run"):
        """`purpose`: "run" for a driver that renders, "claim" for a submit that only claims the
        output (a cluster submit); a driver finding a claim waits for it instead of giving up."""
        self.store, self.job_id, self.ttl_s, self.clock = store, job_id, ttl_s, clock
        self.holder = {"driver": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id,
                       "purpose": purpose}
        self.version: str | None = None
        self.lost = False  # set when another driver took the lease over (ours had expired)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = self.clock()
        return json.dumps({**self.holder, "renewed": now, "expires": now + self.ttl_s, "ttl_s": self.ttl_s}).encode()

    def acquire(self) -> "DriverLease":
        """Take the lease, or raise JobBusyError naming the live holder."""
        claim_deadline = time.monotonic() + CLAIM_WAIT_S
        for _ in range(5 + int(CLAIM_WAIT_S / 0.25)):
            try:
                data, version = self.store.get_versioned(LEASE_KEY)
            except KeyError:
                version = self.store.put_versioned(LEASE_KEY, self._record(), expected=None)
                if version:
                    return self._held(version)
                continue
            current = _parse(data)
            if current and not self._expired(current):
                if current.get("purpose") == "claim" and time.monotonic() < claim_deadline:
                    time.sleep(0.25)  # a submit claiming the output: it lets go within a second
                    continue
                raise JobBusyError(self._busy_message(current), job_id=current.get("job_id"))
            version = self.store.put_versioned(LEASE_KEY, self._record(), expected=version)
            if version:
                return self._held(version)
        raise JobBusyError(f"could not take the driver lease of {self.store.uri}: another driver keeps taking it")

    def _held(self, version: str) -> "DriverLease":
        self.version = version
        self._thread = threading.Thread(target=self._heartbeat, name="qwen-batch-lease", daemon=True)
        self._thread.start()
        return self

    def _expired(self, record: dict) -> bool:
        if self.clock() > float(record.get("expires", 0)):
            return True
        # a driver of this host whose process is gone crashed: no need to wait out its lease
        return record.get("host") == self.holder["host"] and not _pid_alive(record.get("pid"))

    def _busy_message(self, record: dict) -> str:
        age = max(0.0, self.clock() - float(record.get("renewed", 0)))
        left = max(0.0, float(record.get("expires", 0)) - self.clock())
        what = "this job" if record.get("job_id") == self.job_id else f"job {record.get('job_id')}"
        return (
            f"{what} is already being run in {self.store.uri} by another driver (host {record.get('host')}, "
            f"pid {record.get('pid')}, heartbeat {age:.0f} s ago): not starting a second one. If that driver "
            f"is gone, its lease expires in {left:.0f} s; run the same submit again then to resume"
        )

    def _heartbeat(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                version = self.store.put_versioned(LEASE_KEY, self._record(), expected=self.version)
                if not version:
                    self.lost = True
                    return
                self.version = version
            except Exception:  # a store hiccup: try again next beat, the lease has slack
                continue

    def release(self) -> None:
        """Stop renewing and remove the lease (only when it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.version is None or self.lost:
            return
        try:
            data, version = self.store.get_versioned(LEASE_KEY)
            if (_parse(data) or {}).get("driver") == self.holder["driver"]:
                self.store.delete(LEASE_KEY)
        except Exception:  # it expires by itself
            pass

    def __enter__(self) -> "DriverLease":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
