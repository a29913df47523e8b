"""Checking a big manifest's batches on every core.

Validation is columnar, except for template rows (a Jinja2 render each, in Python), and a manifest
of a million rows keeps one core busy for seconds: helper processes check batches beside the
caller. Work goes out one batch (`batch_rows` rows of one row group) at a time: a process claims
the next batch by creating its claim file (O_EXCL, so exactly one process gets each), and reads
only the row groups of the batches it claims. A slower process (one that started later, or whose
batches hold more template rows) simply claims fewer.

What validation keeps of a batch (`BatchOutcome`: its error count, its first errors, its summary,
its key hashes) goes from a helper to a file beside the claims as soon as the batch is checked; the
caller merges all outcomes in row order, so the result is the one a single process gives. Helpers
are `python -c` processes, not multiprocessing's (which would import the caller's __main__ again);
the caller checks what a helper that cannot start, or dies, did not deliver.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from jobs.manifest.read import iter_group, open_parquet, use_system_allocator
from qwen_worker.errors import QwenBatchError, SystemError_, UserError

CHECK_BATCH_ROWS = 32768  # rows checked at a time: 1M rows peak at 205 MB on one process (219 MB with 65536)
PARALLEL_MIN_ROWS = 200_000  # below this, starting a helper (~0.3 s) costs more than it saves
MAX_PROCESSES = 4
_log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    number: int  # the batch's place in the file
    errors: int  # all its errors, counted
    first: list  # [(row, message)]: its first errors (a process keeps at most `max_errors` in all)
    summary: Any  # ManifestSummary of the batch
    keys: tuple  # jobs.manifest.keys.key_hashes of the batch
    checked_by: int  # the process (pid) that checked it


def plan_batches(metadata, batch_rows: int) -> list[tuple[int, int, int]]:
    """(row group, batch number within it, first row) of every batch of the file."""
    batches, first = [], 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        for number in range(-(-rows // batch_rows)):
            batches.append((group, number, first + number * batch_rows))
        first += rows
    return batches


def process_count(rows: int, batches: int, processes: int | None) -> int:
    """How many processes check a manifest of `rows` rows: every core (at most MAX_PROCESSES) for a
    big one, one for a small one, `processes` when the caller says."""
    if processes is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        processes = min(cores, MAX_PROCESSES) if rows >= PARALLEL_MIN_ROWS else 1
    return max(1, min(processes, batches))


class _BatchReader:
    """Reads the batches a process claims: in order, opening a row group only when it gets one of
    its batches (batches it skips inside a row group are decoded, not checked)."""

    def __init__(self, parquet_file, source: str, columns: list[str], batch_rows: int):
        self.parquet_file, self.source, self.columns, self.batch_rows = parquet_file, source, columns, batch_rows
        self.group, self.batches, self.next_number = -1, iter(()), 0

    def read(self, group: int, number: int):
        if group != self.group or number < self.next_number:
            self.group, self.next_number = group, 0
            self.batches = _exact(iter_group(self.parquet_file, self.source, group, columns=self.columns,
                                             batch_size=self.batch_rows), self.batch_rows)
        for batch in self.batches:
            self.next_number += 1
            if self.next_number - 1 == number:
                return batch
        raise RuntimeError(f"row group {group} has no batch {number}")  # the plan and the file disagree: a bug


def _exact(batches, size: int):
    """The batches cut and joined to `size` rows each (the last may be shorter): the plan counts on
    it, whatever sizes the reader returns (it may return less, e.g. past 2 GB of text)."""
    import pyarrow as pa

    pending, rows = [], 0
    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        while rows >= size:
            joined = pending[0] if len(pending) == 1 else pa.concat_batches(pending)
            yield joined.slice(0, size)
            rest = joined.slice(size)
            pending, rows = ([rest] if rest.num_rows else []), rest.num_rows
    if rows:
        yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)


def check_batches(parquet_file, source: str, context, batches: list, claim: Callable[[], int | None], *,
                  batch_rows: int, max_errors: int,
                  deliver: Callable[[BatchOutcome], None] | None = None) -> list[BatchOutcome]:
    """Check the batches `claim` hands out (their numbers, ascending; None when none are left); their
    outcomes returned, or each given to `deliver` as soon as it is known."""
    from jobs.manifest import ManifestSummary, known_columns
    from jobs.manifest.keys import key_hashes
    from jobs.manifest.rules import resolve_batch

    reader = _BatchReader(parquet_file, source, known_columns(parquet_file.schema_arrow), batch_rows)
    outcomes: list[BatchOutcome] = []
    kept = 0
    while (number := claim()) is not None:
        group, within, start = batches[number]
        resolved = resolve_batch(reader.read(group, within), start, context)
        first = resolved.errors.first(max_errors - kept)  # later batches of this process come after these
        kept += len(first)
        summary = ManifestSummary()
        summary.add(resolved)
        outcome = BatchOutcome(number, resolved.errors.count, first, summary, key_hashes(resolved), os.getpid())
        del resolved  # before the next batch is read, not after
        if deliver is None:
            outcomes.append(outcome)
        else:
            deliver(outcome)
    return outcomes


def check_manifest(parquet_file, source: str, context, *, version: str | None, processes: int | None,
                   batch_rows: int = CHECK_BATCH_ROWS, max_errors: int) -> list[BatchOutcome]:
    """Every batch of the manifest checked, on one process or several; outcomes in row order."""
    batches = plan_batches(parquet_file.metadata, batch_rows)
    count = process_count(parquet_file.metadata.num_rows, len(batches), processes)
    options = {"batch_rows": batch_rows, "max_errors": max_errors}
    try:
        claims = Path(tempfile.mkdtemp(prefix="qwen-batch-validate-")) if count > 1 else None
    except OSError:  # no temp dir to share claims in: one process
        claims = None
    if claims is None:
        return check_batches(parquet_file, source, context, batches, _handing_out(range(len(batches))), **options)
    helpers: list[_Helper] = []
    try:
        try:
            job = pickle.dumps({"source": source, "version": version, "context": _portable_context(context),
                                "claims": str(claims), "batches": batches, "caller": os.getpid(), **options})
        except Exception:  # a context that does not pickle (a library caller's own): the caller does it all
            job = None
        for _ in range(count - 1 if job is not None else 0):
            helper = _Helper.start(job)
            if helper is not None:
                helpers.append(helper)
        outcomes = check_batches(parquet_file, source, context, batches, _claimer(claims, len(batches)), **options)
        for helper in helpers:
            helper.finish()
        mine = {outcome.number for outcome in outcomes}
        outcomes.extend(_delivered(claims, [number for number in range(len(batches)) if number not in mine]))
    finally:
        for helper in helpers:
            helper.stop()
        shutil.rmtree(claims, ignore_errors=True)
    if len(outcomes) < len(batches):  # some were claimed by a helper that died
        done = {outcome.number for outcome in outcomes}
        missing = [number for number in range(len(batches)) if number not in done]
        outcomes.extend(check_batches(parquet_file, source, context, batches, _handing_out(missing), **options))
    return sorted(outcomes, key=lambda outcome: outcome.number)


def _handing_out(numbers) -> Callable[[], int | None]:
    """Claims for a process alone: these batch numbers, in order."""
    numbers = iter(numbers)
    return lambda: next(numbers, None)


def _claimer(claims: Path, total: int) -> Callable[[], int | None]:
    """Claim the next batch no process has claimed: the first to create its file gets it."""
    state = {"next": 0}

    def claim() -> int | None:
        while state["next"] < total:
            number = state["next"]
            state["next"] += 1
            try:
                os.close(os.open(claims / str(number), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return number
            except FileExistsError:
                continue
        return None

    return claim


def _deliver_to(claims: Path) -> Callable[[BatchOutcome], None]:
    """A helper's outcomes go to files beside the claims, each as soon as it is known (written whole,
    then renamed), so the caller has them when the helper stops, even if it stops by dying."""
    def deliver(outcome: BatchOutcome) -> None:
        part = claims / f"{outcome.number}.part"
        part.write_bytes(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(part, claims / f"{outcome.number}.outcome")

    return deliver


def _delivered(claims: Path, numbers: list[int]) -> list[BatchOutcome]:
    """The helpers' outcomes of these batches (those they delivered)."""
    found = []
    for number in numbers:
        path = claims / f"{number}.outcome"
        try:
            found.append(pickle.loads(path.read_bytes()))
        except FileNotFoundError:
            continue
        path.unlink()  # a temp dir in memory (tmpfs) would hold it twice otherwise
    return found


def _portable_context(context):
    """The ResolveContext without what it has loaded (templates, file lookups), for a helper."""
    return replace(context, _library=None, _inputs=None, _loras=None, render_cache={})


# --------------------------------------------------------------------------------------------
# helpers


@dataclass
class _Helper:
    process: subprocess.Popen
    stderr: Any

    @classmethod
    def start(cls, job: bytes) -> "_Helper | None":
        """A helper at work on `job` (pickled), or None when none can start here (the caller does its share)."""
        package_root = str(Path(__file__).resolve().parents[2])
        # the package's root replaces '' (the working directory) on sys.path, as for the caller's console script
        code = f"import sys; sys.path[0] = {package_root!r}; from jobs.manifest.parallel import main; main()"
        stderr = tempfile.TemporaryFile()
        try:
            process = subprocess.Popen([sys.executable or "python3", "-c", code], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=stderr)
        except OSError:  # no interpreter to start (an embedded Python), no processes left
            stderr.close()
            return None
        helper = cls(process, stderr)
        try:
            process.stdin.write(job)
            process.stdin.close()
        except OSError:  # it died at once
            helper.stop()
            return None
        return helper

    def finish(self) -> None:
        """Wait for the helper to stop; the user error it met is raised again here (one that died
        has delivered what it finished; the caller checks the rest)."""
        data = self.process.stdout.read()
        self.process.wait()
        try:
            kind, value = pickle.loads(data)
        except Exception:  # it died before answering
            self.stderr.seek(0)
            said = [line for line in self.stderr.read().decode(errors="replace").splitlines() if line.strip()]
            _log.warning("a validation helper stopped early (exit %s%s); its batches were checked here",
                         self.process.returncode, f": {said[-1].strip()}" if said else "")
            return
        if kind == "error":
            raise value

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.stderr):
            try:
                stream.close()
            except OSError:  # a pipe to a process that died with data unread
                pass


def main() -> None:
    """A helper: check the batches it claims of the job read from stdin, delivering each outcome to
    the claims folder; then pickle ("ok", None), or the user error it met, to stdout."""
    job = pickle.loads(sys.stdin.buffer.read())
    try:
        use_system_allocator()
        claims = Path(job["claims"])
        claim = _while_caller_lives(_claimer(claims, len(job["batches"])), job["caller"], claims)
        first = claim()
        if first is not None:  # open the manifest only when there is work left for this helper
            parquet_file = open_parquet(job["source"], version=job["version"])
            check_batches(parquet_file, job["source"], job["context"], job["batches"], _then(first, claim),
                          batch_rows=job["batch_rows"], max_errors=job["max_errors"], deliver=_deliver_to(claims))
        answer = ("ok", None)
    except QwenBatchError as exc:
        answer = ("error", _portable_error(exc))
    sys.stdout.buffer.write(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()


def _while_caller_lives(claim: Callable[[], int | None], caller: int, claims: Path) -> Callable[[], int | None]:
    """Claims that stop, and clean up, once the caller is gone (killed: its `finally` never ran)."""
    def claiming() -> int | None:
        if os.getppid() != caller:
            shutil.rmtree(claims, ignore_errors=True)
            sys.exit(0)
        return claim()

    return claiming


def _then(first: int, claim: Callable[[], int | None]) -> Callable[[], int | None]:
    """`first`, then what `claim` hands out."""
    pending = [first]
    return lambda: pending.pop() if pending else claim()


def _portable_error(exc: QwenBatchError) -> QwenBatchError:
    """The error itself when it survives pickling with its message, else one of the same kind (a
    user error or a system error: the exit code stays) saying it."""
    try:
        if str(pickle.loads(pickle.dumps(exc))) == str(exc):
            return exc
    except Exception:
        pass
    for kind in (UserError, SystemError_):
        if isinstance(exc, kind):
            return kind(str(exc))
    return QwenBatchError(str(exc))

