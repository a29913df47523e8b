"""Scheduled runs: a YAML file of cron entries, each submitting a manifest at its fire times.

```yaml
name: marketing            # optional; default: the file name without extension
entries:
  - name: weekly-ads
    cron: "0 6 * * MON"    # minute hour day-of-month month day-of-week (or @daily, @weekly, …)
    timezone: Asia/Shanghai            # IANA name; default UTC
    manifest: s3://briefs/ads/{year}/{week}.parquet
    output: s3://renders/ads/{date}/
    model: qwen-image-df11             # optional
    options: {workers: 4}              # optional, passed to the submit as keyword options
    catch_up: once                     # once (default) | none | all
    grace_seconds: 300                 # optional: how late a fire time may be and still count as on time
```

Placeholders in `manifest` and `output` are those of the FIRE time, in the entry's time zone:
{date} 2026-03-08, {time} 0630, {year} 2026, {month} 03, {day} 08, {hour} 06, {minute} 30,
{week} 2026-W10 (ISO 8601 week, with its ISO year, so it is right across New Year), {name} the
entry name. `{{` and `}}` stand for literal braces.

Time zones and DST: a cron entry is read in its local wall-clock time.
- A local time that does not exist (the hour skipped when clocks spring forward, e.g. 02:30 on
  2026-03-08 in America/New_York) fires at the instant the clock jumps (03:00 local); several
  skipped times collapse into that one run.
- A local time that happens twice (clocks fall back, e.g. 01:30 on 2026-11-01 in New York) fires
  once, at its first occurrence (daylight time). As in classic cron, the repeated hour does not
  fire a second time, so a "*/15 * * * *" entry has a 75-minute gap across the change.

Catch-up (what a scheduler that was down, or a slow tick, does with fire times it finds past):
- once (default): submit only the latest of them; the earlier ones are dropped.
- none: submit only fire times that are at most `grace_seconds` late; drop the rest.
- all: submit every one of them, oldest first, at most the latest MAX_CATCH_UP (100).
A scheduler that has never run (no state yet) looks back `grace_seconds` only.

Exactly once: every run has an id derived from its entry and fire time
(`sched-<entry>-<YYYYMMDDTHHMMZ>`, also used as the submission's job id). Before submitting, the
scheduler claims the run by creating `_schedule/<schedule>/<run_id>.json` in its state store with a
create-if-absent put (the schedule's name in the key: two schedule files sharing a state store and
an entry name never take each other's runs); a run already claimed (by another scheduler, or this
one before a restart) is not submitted again. A scheduler that dies between its claim and its
submit leaves a claim with status "claimed": that run is not retried by anyone (at most once), and
the claim shows it.

A submit that fails for a transient reason (the cluster or the store unreachable, a system error,
exit code 4) is retried with backoff, up to MAX_SUBMIT_ATTEMPTS: the claim says "retry" and a
marker `_schedule/<schedule>/retry/<run_id>.json` lists it; whichever scheduler first takes the
claim over (a compare-and-swap on it) submits again. The submit stays exactly-once because the job
id is the run id: a resubmit resumes that job (or finds it already running) instead of starting
another. A bad manifest or option (exit 1), or rows that failed (exit 3), are not retried.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import re
import socket
import string
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from zoneinfo import ZoneInfo

from croniter import croniter
from croniter import CroniterBadDateError

from qwen_worker.errors import ObjectExistsError, SystemError_, UserError

log = logging.getLogger(__name__)

UTC = timezone.utc
PLACEHOLDERS = ("date", "time", "year", "month", "day", "hour", "minute", "week", "name")
CATCH_UP_POLICIES = ("once", "none", "all")
MAX_CATCH_UP = 100
DEFAULT_GRACE = timedelta(minutes=5)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CRON_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_ENTRY_FIELDS = ("name", "cron", "timezone", "manifest", "output", "model", "options", "catch_up", "grace_seconds")
_SCHEDULE_FIELDS = ("name", "entries")
_RESERVED_OPTIONS = ("manifest", "output", "model", "job_id")


class ScheduleError(UserError):
    """A schedule file is wrong; the message names the entry, the field and the value."""


# ---------------------------------------------------------------------------------------------
# the schedule


@dataclass(frozen=True)
class Entry:
    name: str
    cron: str  # 5 fields (macros expanded)
    timezone: str
    manifest: str  # may hold placeholders
    output: str  # may hold placeholders
    model: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    catch_up: str = "once"
    grace: timedelta = DEFAULT_GRACE

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class Schedule:
    name: str
    entries: tuple[Entry, ...]
    source: str = ""

    def entry(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise ScheduleError(f"unknown entry {name!r} (known: {', '.join(e.name for e in self.entries)})")


@dataclass(frozen=True)
class PlannedRun:
    entry: Entry
    fire_time: datetime  # aware, UTC
    manifest: str  # placeholders resolved
    output: str
    run_id: str

    @property
    def local_time(self) -> datetime:
        return self.fire_time.astimezone(self.entry.tz)

    @property
    def model(self) -> str | None:
        return self.entry.model

    @property
    def options(self) -> dict:
        return dict(self.entry.options)

    def to_record(self) -> dict:
        return {
            "run_id": self.run_id,
            "entry": self.entry.name,
            "fire_time": _iso(self.fire_time),
            "local_time": self.local_time.isoformat(),
            "manifest": self.manifest,
            "output": self.output,
            "model": self.model,
            "options": self.options,
        }


def run_id_for(entry_name: str, fire_time: datetime) -> str:
    """`sched-<entry>-<YYYYMMDDTHHMMZ>`: the same entry and fire time always give the same id."""
    return f"sched-{entry_name}-{fire_time.astimezone(UTC):%Y%m%dT%H%MZ}"


def placeholder_values(entry_name: str, local: datetime) -> dict[str, str]:
    iso_year, iso_week, _ = local.isocalendar()
    return {
        "date": f"{local:%Y-%m-%d}",
        "time": f"{local:%H%M}",
        "year": f"{local:%Y}",
        "month": f"{local:%m}",
        "day": f"{local:%d}",
        "hour": f"{local:%H}",
        "minute": f"{local:%M}",
        "week": f"{iso_year:04d}-W{iso_week:02d}",
        "name": entry_name,
    }


def plan_run(entry: Entry, fire_time: datetime) -> PlannedRun:
    values = placeholder_values(entry.name, fire_time.astimezone(entry.tz))
    return PlannedRun(
        entry=entry,
        fire_time=fire_time.astimezone(UTC),
        manifest=entry.manifest.format(**values),
        output=entry.output.format(**values),
        run_id=run_id_for(entry.name, fire_time),
    )


# ---------------------------------------------------------------------------------------------
# loading and checking


def load_schedule(path: str | Path) -> Schedule:
    from jobs.yaml_files import read_yaml

    path = Path(path)
    data = read_yaml(path, "schedule", ScheduleError)
    return parse_schedule(data, default_name=path.stem, source=str(path))


def parse_schedule(data: Any, *, default_name: str = "schedule", source: str = "schedule") -> Schedule:
    if not isinstance(data, dict):
        raise ScheduleError(f"{source}: expected a mapping with `entries:`, got: {type(data).__name__}")
    unknown = [k for k in data if k not in _SCHEDULE_FIELDS]
    if unknown:
        raise ScheduleError(f"{source}: unknown field(s) {_ticks(unknown)} (expected: {_ticks(_SCHEDULE_FIELDS)})")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ScheduleError(
            f"{source}: `name` must be letters, digits, '.', '_' or '-' (at most 64), got: {name!r}"
            + ("" if "name" in data else " (from the file name; set `name:` in the file)")
        )
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise ScheduleError(f"{source}: `entries` must be a non-empty list, got: {raw_entries!r}")
    entries = []
    seen = set()
    for index, raw in enumerate(raw_entries, start=1):
        entry = _parse_entry(raw, index)
        if entry.name in seen:
            raise ScheduleError(f"entry {entry.name!r}: `name` is used by more than one entry")
        seen.add(entry.name)
        entries.append(entry)
    return Schedule(name=name, entries=tuple(entries), source=source)


def _parse_entry(raw: Any, index: int) -> Entry:
    if not isinstance(raw, dict):
        raise ScheduleError(f"entry #{index}: expected a mapping, got: {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ScheduleError(
            f"entry #{index}: `name` must be letters, digits, '.', '_' or '-' (at most 64, "
            f"starting with a letter or digit), got: {name!r}"
        )
    label = f"entry {name!r}"

    def bad(field_name: str, rule: str, value: Any) -> ScheduleError:
        return ScheduleError(f"{label}: `{field_name}` {rule}, got: {value!r}")

    unknown = [k for k in raw if k not in _ENTRY_FIELDS]
    if unknown:
        raise ScheduleError(f"{label}: unknown field(s) {_ticks(unknown)} (expected: {_ticks(_ENTRY_FIELDS)})")
    for required in ("cron", "manifest", "output"):
        if required not in raw:
            raise ScheduleError(f"{label}: `{required}` is required")

    cron = _check_cron(raw["cron"], bad)

    tz_name = raw.get("timezone", "UTC")
    if not isinstance(tz_name, str):
        raise bad("timezone", "is not a known IANA time zone", tz_name)
    try:
        ZoneInfo(tz_name)
    except Exception:  # ZoneInfoNotFoundError, ValueError for odd keys, OSError for directories
        raise bad("timezone", "is not a known IANA time zone (like Europe/Berlin)", tz_name) from None

    templates = {}
    for key in ("manifest", "output"):
        value = raw[key]
        if not isinstance(value, str) or not value.strip():
            raise bad(key, "must be a non-empty path or s3:// URI", value)
        _check_placeholders(value, key, bad)
        templates[key] = value

    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise bad("model", "must be a model name", model)

    options = _check_options(raw.get("options") or {}, bad)

    catch_up = raw.get("catch_up", "once")
    if catch_up not in CATCH_UP_POLICIES:
        raise bad("catch_up", f"must be one of {', '.join(CATCH_UP_POLICIES)}", catch_up)

    grace = raw.get("grace_seconds", int(DEFAULT_GRACE.total_seconds()))
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
        raise bad("grace_seconds", "must be a whole number of seconds >= 0", grace)

    return Entry(
        name=name,
        cron=cron,
        timezone=tz_name,
        manifest=templates["manifest"],
        output=templates["output"],
        model=model,
        options=options,
        catch_up=catch_up,
        grace=timedelta(seconds=grace),
    )


def _check_cron(value: Any, bad) -> str:
    rule = "is not a valid cron expression"
    if not isinstance(value, str):
        raise bad("cron", rule, value)
    expression = CRON_MACROS.get(value.strip().lower(), value.strip())
    if len(expression.split()) != 5:
        raise bad("cron", rule + " (5 fields: minute hour day-of-month month day-of-week)", value)
    try:
        valid = croniter.is_valid(expression)
    except Exception:
        valid = False
    if not valid:
        raise bad("cron", rule, value)
    try:
        croniter(expression, datetime(2000, 1, 1)).get_next(datetime)
    except (CroniterBadDateError, ValueError, KeyError):
        raise bad("cron", "never fires", value) from None
    return expression


def _check_placeholders(value: str, key: str, bad) -> None:
    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError:
        raise bad(key, "has an unmatched '{' or '}' (write {{ or }} for a literal brace)", value) from None
    for _literal, field_name, format_spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS:
            raise bad(key, f"has unknown placeholder {{{field_name}}} (known: {known})", value)
        if format_spec or conversion:
            raise bad(key, f"placeholder {{{field_name}}} takes no format or conversion", value)


def _check_options(options: Any, bad) -> dict:
    if not isinstance(options, dict):
        raise bad("options", "must be a mapping of submit option -> value", options)
    checked = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if not name.isidentifier():
            raise bad("options", f"has an option name that is not a word: {key!r}", options)
        if name in _RESERVED_OPTIONS:
            raise bad("options", f"may not set {key!r} (it is set by the entry and the run)", options)
        scalar = (str, int, float, bool, type(None))
        if not (isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))):
            raise bad("options", f"option {key!r} must be a string, number, boolean or list", options)
        checked[name] = value
    return checked


def _ticks(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


# ---------------------------------------------------------------------------------------------
# fire times


def _local_to_utc(naive: datetime, tz: ZoneInfo) -> datetime:
    """The instant a cron fire at local wall time `naive` happens (see the module doc on DST)."""
    first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == naive:
        return first  # exists; for an ambiguous time, fold=0 is its first occurrence
    # nonexistent: the clock jumped over it. Find the jump: between the two readings of `naive`.
    second = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    lo, hi = min(first, second), max(first, second)
    offset_before = lo.astimezone(tz).utcoffset()
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(tz).utcoffset() == offset_before:
            lo = mid
        else:
            hi = mid
    return hi.replace(microsecond=0)


def _offsets_around(tz: ZoneInfo, instant: datetime) -> list[timedelta]:
    return [(instant + timedelta(hours=h)).astimezone(tz).utcoffset() for h in (-50, -26, 0, 26, 50)]


def _require_aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got: {value!r}")
    return value.astimezone(UTC)


def fire_times_after(entry: Entry, after: datetime) -> Iterator[datetime]:
    """Fire times of `entry` strictly after `after`, ascending, aware UTC (endless)."""
    after = _require_aware(after, "after")
    tz = entry.tz
    # Local wall times map to instants monotonically (see _local_to_utc), so start from the
    # earliest local time that could map after `after` and skip what maps before it.
    start = after.replace(tzinfo=None) + min(_offsets_around(tz, after))
    iterator = croniter(entry.cron, start)
    last = after
    while True:
        try:
            local = iterator.get_next(datetime)
        except CroniterBadDateError:
            return
        instant = _local_to_utc(local, tz)
        if instant > last:
            yield instant
            last = instant


def fire_times_until(entry: Entry, until: datetime) -> Iterator[datetime]:
    """Fire times of `entry` at or before `until`, newest first, aware UTC (endless)."""
    until = _require_aware(until, "until")
    tz = entry.tz
    start = until.replace(tzinfo=None) + max(_offsets_around(tz, until)) + timedelta(minutes=1)
    iterator = croniter(entry.cron, start)
    last = None
    while True:
        try:
            local = iterator.get_prev(datetime)
        except CroniterBadDateError:
            return
        instant = _local_to_utc(local, tz)
        if instant <= until and (last is None or instant < last):
            yield instant
            last = instant


def next_runs(schedule: Schedule, after: datetime, count: int) -> list[PlannedRun]:
    """The next `count` runs of all entries after `after`, in fire-time order (ties: file order)."""
    def stream(index: int, entry: Entry):
        for instant in fire_times_after(entry, after):
            yield instant, index, entry

    streams = [stream(index, entry) for index, entry in enumerate(schedule.entries)]
    merged = heapq.merge(*streams, key=lambda item: (item[0], item[1]))
    return [plan_run(entry, instant) for instant, _index, entry in itertools.islice(merged, max(count, 0))]


def due_runs(schedule: Schedule, last_checked: datetime | None, now: datetime) -> list[PlannedRun]:
    """Runs whose fire time is in (last_checked, now], after each entry's catch-up policy,
    oldest first. With no `last_checked` (never ran) the window is each entry's grace period."""
    now = _require_aware(now, "now")
    if last_checked is not None:
        last_checked = _require_aware(last_checked, "last_checked")
    due: list[tuple[datetime, int, PlannedRun]] = []
    for index, entry in enumerate(schedule.entries):
        window_start = last_checked if last_checked is not None else now - entry.grace
        times: list[datetime] = []
        for instant in fire_times_until(entry, now):
            if instant <= window_start:
                break
            if entry.catch_up == "none" and instant < now - entry.grace:
                break
            if entry.catch_up == "all" and len(times) == MAX_CATCH_UP:
                log.warning(
                    "entry %r: more than %d missed fire times since %s; submitting only the latest %d",
                    entry.name, MAX_CATCH_UP, _iso(window_start), MAX_CATCH_UP,
                )
                break
            times.append(instant)
            if entry.catch_up == "once":
                break
        due.extend((instant, index, plan_run(entry, instant)) for instant in times)
    due.sort(key=lambda item: (item[0], item[1]))
    return [run for _instant, _index, run in due]


# ---------------------------------------------------------------------------------------------
# the scheduler loop

CLAIM_PREFIX = "_schedule"
MAX_SUBMIT_ATTEMPTS = 5
SUBMIT_RETRY_DELAY_S = 60.0  # doubles with each attempt, at most MAX_SUBMIT_RETRY_DELAY_S
MAX_SUBMIT_RETRY_DELAY_S = 1800.0


def claim_key(schedule_name: str, run_id: str) -> str:
    return f"{CLAIM_PREFIX}/{schedule_name}/{run_id}.json"


def retry_key(schedule_name: str, run_id: str) -> str:
    return f"{CLAIM_PREFIX}/{schedule_name}/retry/{run_id}.json"


def is_transient_submit_failure(exc: BaseException) -> bool:
    """A submit that may succeed when tried again: a system error of ours (exit 4: the cluster or
    the store unreachable, storage 5xx after retries) or the network itself; not a user error."""
    from qwen_worker.errors import QwenBatchError

    if isinstance(exc, UserError):
        return False
    return isinstance(exc, (QwenBatchError, OSError, TimeoutError))


def state_key(schedule_name: str) -> str:
    return f"{CLAIM_PREFIX}/state-{schedule_name}.json"


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _outcome_claimed(outcome: Any) -> bool:
    """put_new's outcome: CREATED, or ALREADY_STORED (identical bytes = our own retried write,
    since every claim carries this scheduler's unique token) mean the claim is ours."""
    if outcome is True:
        return True
    return getattr(outcome, "value", outcome) in ("created", "already_stored")


class Scheduler:
    """Submits the due runs of a schedule, each exactly once across restarts and replicas.

    `submit(run)` submits one run (returning None or an exit code; non-zero or an exception
    counts as a failed submit, recorded in the claim; a transient one, exit code 4 or a system
    error, is retried with backoff). `state_store` is a qwen_worker.stores.Store.
    `clock()` returns an aware datetime; `sleep(seconds)` waits.
    """

    def __init__(
        self,
        schedule: Schedule,
        submit: Callable[[PlannedRun], Any],
        state_store: Any,
        *,
        clock: Callable[[], datetime] = _utcnow,
        sleep: Callable[[float], None] = time.sleep,
        max_sleep: float = 60.0,
    ):
        self.schedule = schedule
        self.submit = submit
        self.store = state_store
        self.clock = clock
        self.sleep = sleep
        self.max_sleep = max_sleep
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    # state -------------------------------------------------------------------------------
    def last_checked(self) -> datetime | None:
        key = state_key(self.schedule.name)
        try:
            raw = self.store.get(key)
        except KeyError:
            return None
        try:
            return _parse_iso(json.loads(raw)["last_checked"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"scheduler state {key} is unreadable; delete it to start afresh") from None

    def _save_last_checked(self, now: datetime) -> None:
        previous = self.last_checked()
        if previous is not None and previous > now:
            now = previous  # another scheduler got further; never move backwards
        record = {
            "schedule": self.schedule.name,
            "last_checked": _iso(now),
            "updated_by": self.owner,
            "updated_at": _iso(_utcnow()),
        }
        self.store.put(state_key(self.schedule.name), _json_bytes(record))

    # claims ------------------------------------------------------------------------------
    def claim(self, run: PlannedRun) -> bool:
        """True when this scheduler now owns `run` (nobody claimed it before)."""
        record = {**run.to_record(), "status": "claimed", "claimed_by": self.owner, "claimed_at": _iso(_utcnow())}
        try:
            outcome = self.store.put_new(claim_key(self.schedule.name, run.run_id), _json_bytes(record))
        except ObjectExistsError:
            return False
        return _outcome_claimed(outcome)

    def _record(self, run: PlannedRun, status: str, **extra: Any) -> None:
        key = claim_key(self.schedule.name, run.run_id)
        try:
            record = json.loads(self.store.get(key))
        except (KeyError, ValueError):
            record = run.to_record()
        record.update(status=status, updated_at=_iso(_utcnow()), **extra)
        self.store.put(key, _json_bytes(record))

    # the loop ----------------------------------------------------------------------------
    def run_once(self, now: datetime | None = None) -> list[PlannedRun]:
        """Submit what is due at `now` (default: the clock), and the retries of transiently failed
        submits whose backoff is over; returns the runs this call submitted."""
        now = _require_aware(now if now is not None else self.clock(), "now")
        submitted = []
        for run in due_runs(self.schedule, self.last_checked(), now):
            if not self.claim(run):
                log.info("run %s already claimed elsewhere; not submitting", run.run_id)
                continue
            if self._submit(run, 1, now):
                submitted.append(run)
        for run, attempt in self._take_due_retries(now):
            if self._submit(run, attempt, now):
                submitted.append(run)
        self._save_last_checked(now)
        return submitted

    def _submit(self, run: PlannedRun, attempt: int, now: datetime) -> bool:
        """Submit one claimed run; record how it went in its claim. True when submitted."""
        log.info("submitting %s (attempt %d): %s -> %s", run.run_id, attempt, run.manifest, run.output)
        try:
            result = self.submit(run)
        except Exception as exc:  # a failed submit must not stop the other entries
            error = f"{type(exc).__name__}: {exc}"
            log.error("submit of %s failed: %s", run.run_id, error)
            if is_transient_submit_failure(exc):
                self._retry_later(run, attempt, now, error=error)
            else:
                self._record(run, "failed", error=error, attempts=attempt)
                self._forget_retry(run)
            return False
        if isinstance(result, int) and not isinstance(result, bool) and result != 0:
            log.error("submit of %s failed with exit code %d", run.run_id, result)
            if result == 4:  # a system failure stopped it: the same job id resumes it
                self._retry_later(run, attempt, now, exit_code=result)
            else:
                self._record(run, "failed", exit_code=result, attempts=attempt)
                self._forget_retry(run)
            return False
        self._record(run, "submitted", attempts=attempt)
        self._forget_retry(run)
        return True

    def _retry_later(self, run: PlannedRun, attempt: int, now: datetime, **why: Any) -> None:
        if attempt >= MAX_SUBMIT_ATTEMPTS:
            self._record(run, "failed", attempts=attempt, gave_up=f"after {attempt} attempts", **why)
            self._forget_retry(run)
            return
        delay = min(SUBMIT_RETRY_DELAY_S * 2 ** (attempt - 1), MAX_SUBMIT_RETRY_DELAY_S)
        next_try = _iso(now + timedelta(seconds=delay))
        log.warning("will submit %s again at %s (attempt %d of %d)", run.run_id, next_try, attempt + 1,
                    MAX_SUBMIT_ATTEMPTS)
        self._record(run, "retry", attempts=attempt, next_try=next_try, **why)
        self.store.put(retry_key(self.schedule.name, run.run_id), _json_bytes({"run_id": run.run_id,
                                                                               "next_try": next_try}))

    def _forget_retry(self, run: PlannedRun) -> None:
        self.store.delete(retry_key(self.schedule.name, run.run_id))

    def _take_due_retries(self, now: datetime) -> list[tuple[PlannedRun, int]]:
        """Runs waiting for a retry whose time has come and whose claim this scheduler took over
        (a compare-and-swap: of several schedulers, one retries each run)."""
        entries = {entry.name: entry for entry in self.schedule.entries}
        taken = []
        for key in sorted(self.store.list_keys(f"{CLAIM_PREFIX}/{self.schedule.name}/retry/")):
            run_id = key.rsplit("/", 1)[-1].removesuffix(".json")
            try:
                data, version = self.store.get_versioned(claim_key(self.schedule.name, run_id))
                record = json.loads(data)
            except (KeyError, ValueError):
                continue
            entry = entries.get(record.get("entry"))
            if record.get("status") != "retry" or entry is None or _parse_iso(record["next_try"]) > now:
                continue
            attempt = int(record.get("attempts", 1)) + 1
            record.update(status="claimed", claimed_by=self.owner, claimed_at=_iso(_utcnow()), attempts=attempt)
            if self.store.put_versioned(claim_key(self.schedule.name, run_id), _json_bytes(record), expected=version):
                taken.append((plan_run(entry, _parse_iso(record["fire_time"])), attempt))
        return taken

    def seconds_until_next(self, now: datetime) -> float:
        upcoming = next_runs(self.schedule, now, 1)
        if not upcoming:
            return self.max_sleep
        return min(self.max_sleep, max((upcoming[0].fire_time - now).total_seconds(), 0.0))

    def run_forever(self, *, stop: Callable[[], bool] = lambda: False) -> None:
        """Tick at every fire time (and at least every `max_sleep` seconds) until `stop()`.
        Storage and other system errors are logged and retried at the next tick."""
        while not stop():
            now = self.clock()
            try:
                self.run_once(now)
            except SystemError_ as exc:
                log.warning("scheduler tick failed, retrying: %s", exc)
            self.sleep(max(self.seconds_until_next(self.clock()), 0.05))


def _json_bytes(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False, sort_keys=True, indent=1).encode()


def submit_planned_run(run: PlannedRun) -> int:
    """Submit one planned run through jobs.submit_api.submit_job, with the run id as its job id.
    Blocks until the job ends (the driver runs in this process); returns its exit code."""
    try:
        from jobs.submit_api import submit_job
    except ImportError as exc:
        raise UserError(f"scheduled submits need jobs.submit_api, which is not available: {exc}") from None
    import os

    from jobs.cluster_jobs import is_jobs_api_address, submit_to_cluster

    options = {"show_progress": False, **run.options}
    if run.model is not None:
        options["model"] = run.model
    address = options.get("address") or os.environ.get("RAY_ADDRESS")
    if is_jobs_api_address(address):  # hand it to the cluster and return: the scheduler does not wait
        options.pop("show_progress")
        options["address"] = address
        return submit_to_cluster(run.manifest, run.output, wait=False, echo=log.info, **options)
    outcome = submit_job(run.manifest, run.output, job_id=run.run_id, **options)
    return getattr(outcome, "exit_code", outcome)


def check_submit_options(schedule: Schedule, submit_function: Callable) -> None:
    """Fail before the first tick when an entry's `options` names an option `submit_function`
    does not take (a typo would otherwise only show as a failed submit at fire time)."""
    import inspect

    parameters = inspect.signature(submit_function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for entry in schedule.entries:
        for option in entry.options:
            if option not in known:
                raise ScheduleError(
                    f"entry {entry.name!r}: `options` has unknown submit option {option!r} "
                    f"(known: {', '.join(k for k in known if k not in _RESERVED_OPTIONS)})"
                )


__all__ = [
    "CATCH_UP_POLICIES",
    "Entry",
    "MAX_CATCH_UP",
    "PLACEHOLDERS",
    "PlannedRun",
    "Schedule",
    "ScheduleError",
    "Scheduler",
    "claim_key",
    "retry_key",
    "due_runs",
    "fire_times_after",
    "fire_times_until",
    "load_schedule",
    "next_runs",
    "parse_schedule",
    "placeholder_values",
    "plan_run",
    "run_id_for",
    "state_key",
    "check_submit_options",
    "submit_planned_run",
]
