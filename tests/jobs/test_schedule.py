"""Scheduled runs (jobs.schedule): fire times across time zones and DST, placeholders, errors,
catch-up after a restart, and exactly-once submits through claims in a shared state store."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from jobs.cli import cli
from jobs.schedule import (
    MAX_CATCH_UP,
    MAX_SUBMIT_ATTEMPTS,
    ScheduleError,
    Scheduler,
    check_submit_options,
    claim_key,
    due_runs,
    fire_times_after,
    fire_times_until,
    load_schedule,
    next_runs,
    parse_schedule,
    retry_key,
    run_id_for,
    state_key,
    submit_planned_run,
)
from qwen_worker.errors import SystemError_, UserError
from qwen_worker.stores import LocalStore

UTC = timezone.utc


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def entry(**fields) -> dict:
    base = {"name": "weekly-ads", "cron": "0 6 * * MON", "manifest": "m/{date}.parquet", "output": "out/{date}/"}
    base.update(fields)
    return base


def schedule_of(*entries, name="marketing"):
    return parse_schedule({"name": name, "entries": list(entries)})


def fire_times(cron: str, tz: str, after: str, count: int) -> list[str]:
    plan = schedule_of(entry(cron=cron, timezone=tz))
    return [f"{run.fire_time:%Y-%m-%dT%H:%MZ}" for run in next_runs(plan, utc(after), count)]


# ---------------------------------------------------------------------------------------------
# fire times


def test_next_runs_merge_entries_in_fire_time_order_across_time_zones():
    plan = schedule_of(
        entry(name="weekly-ads", cron="0 6 * * MON", timezone="Asia/Shanghai"),
        entry(name="every-15", cron="*/15 * * * *"),
        entry(name="nightly-ny", cron="30 2 * * *", timezone="America/New_York"),
    )
    runs = next_runs(plan, utc("2026-03-08T21:40:00Z"), 5)
    assert [(r.entry.name, f"{r.fire_time:%Y-%m-%dT%H:%MZ}") for r in runs] == [
        ("every-15", "2026-03-08T21:45Z"),
        ("weekly-ads", "2026-03-08T22:00Z"),  # Monday 06:00 in Shanghai
        ("every-15", "2026-03-08T22:00Z"),  # same instant: file order
        ("every-15", "2026-03-08T22:15Z"),
        ("every-15", "2026-03-08T22:30Z"),
    ]
    assert all(r.fire_time.tzinfo == UTC for r in runs)
    assert f"{runs[1].local_time:%Y-%m-%d %H:%M %Z}" == "2026-03-09 06:00 CST"


def test_next_runs_are_strictly_after_the_given_time():
    assert fire_times("0 * * * *", "UTC", "2026-05-01T10:00:00Z", 2) == ["2026-05-01T11:00Z", "2026-05-01T12:00Z"]


@pytest.mark.parametrize(
    "cron, tz, after, expected",
    [
        # America/New_York springs forward on 2026-03-08 at 02:00 EST: 02:30 does not exist and
        # fires when the clock jumps, at 03:00 EDT (07:00Z).
        ("30 2 * * *", "America/New_York", "2026-03-07T00:00Z",
         ["2026-03-07T07:30Z", "2026-03-08T07:00Z", "2026-03-09T06:30Z"]),
        # ... every skipped time collapses into that one instant, no duplicates, nothing lost after
        ("*/30 * * * *", "America/New_York", "2026-03-08T06:15Z",
         ["2026-03-08T06:30Z", "2026-03-08T07:00Z", "2026-03-08T07:30Z", "2026-03-08T08:00Z"]),
        # falls back on 2026-11-01 at 02:00 EDT: 01:30 happens twice and fires once, the first time
        ("30 1 * * *", "America/New_York", "2026-10-31T00:00Z",
         ["2026-10-31T05:30Z", "2026-11-01T05:30Z", "2026-11-02T06:30Z"]),
        # an hourly entry does not fire in the repeated hour (01:00 EST = 06:00Z)
        ("0 * * * *", "America/New_York", "2026-11-01T04:30Z",
         ["2026-11-01T05:00Z", "2026-11-01T07:00Z", "2026-11-01T08:00Z"]),
        # Europe/Berlin: 02:00 CET -> 03:00 CEST on 2026-03-29, 03:00 CEST -> 02:00 CET on 2026-10-25
        ("30 2 * * *", "Europe/Berlin", "2026-03-28T00:00Z",
         ["2026-03-28T01:30Z", "2026-03-29T01:00Z", "2026-03-30T00:30Z"]),
        ("30 2 * * *", "Europe/Berlin", "2026-10-24T00:00Z",
         ["2026-10-24T00:30Z", "2026-10-25T00:30Z", "2026-10-26T01:30Z"]),
    ],
)  # fmt: skip
def test_fire_times_across_dst_transitions(cron, tz, after, expected):
    assert fire_times(cron, tz, after, len(expected)) == expected


@pytest.mark.parametrize("tz", ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "UTC"])
@pytest.mark.parametrize("cron", ["*/20 * * * *", "30 2 * * *", "0 1-3 * * *", "15,45 2,3 * * *"])
@pytest.mark.parametrize("around", ["2026-03-08T12:00Z", "2026-03-29T12:00Z", "2026-10-25T12:00Z",
                                    "2026-11-01T12:00Z", "2026-04-05T12:00Z", "2026-10-04T12:00Z"])  # fmt: skip
def test_backward_fire_times_are_the_forward_ones_reversed(tz, cron, around):
    plan = schedule_of(entry(cron=cron, timezone=tz))
    start, end = utc(around) - timedelta(days=2), utc(around) + timedelta(days=1)
    forward = []
    for instant in fire_times_after(plan.entries[0], start):
        if instant > end:
            break
        forward.append(instant)
    backward = []
    for instant in fire_times_until(plan.entries[0], end):
        if instant <= start:
            break
        backward.append(instant)
    assert forward and forward == sorted(set(forward))
    assert backward[::-1] == forward


def test_placeholders_are_those_of_the_fire_time_in_the_entry_time_zone():
    plan = schedule_of(
        entry(
            name="weekly-ads",
            cron="0 6 * * MON",
            timezone="Asia/Shanghai",
            manifest="s3://briefs/{year}/{month}/{day}/{name}.parquet",
            output="s3://renders/{week}/{date}T{time}-{hour}h{minute}/",
        )
    )
    (run,) = next_runs(plan, utc("2026-03-08T12:00Z"), 1)
    assert run.fire_time == utc("2026-03-08T22:00Z")  # still Sunday in UTC
    assert run.manifest == "s3://briefs/2026/03/09/weekly-ads.parquet"
    assert run.output == "s3://renders/2026-W11/2026-03-09T0600-06h00/"
    assert run.run_id == "sched-weekly-ads-20260308T2200Z"


def test_iso_week_placeholder_carries_its_iso_year_across_new_year():
    plan = schedule_of(entry(cron="0 9 1 1 *", timezone="Europe/Berlin", output="{year}/{week}/{date}"))
    (run,) = next_runs(plan, utc("2026-06-01T00:00Z"), 1)
    assert run.output == "2027/2026-W53/2027-01-01"


def test_local_date_differs_from_the_utc_date():
    plan = schedule_of(entry(cron="0 23 31 12 *", timezone="America/Los_Angeles", output="{date}-{time}"))
    (run,) = next_runs(plan, utc("2026-06-01T00:00Z"), 1)
    assert run.fire_time == utc("2027-01-01T07:00Z") and run.output == "2026-12-31-2300"


def test_literal_braces_and_macros():
    plan = schedule_of(entry(cron="@daily", output="out/{{raw}}/{date}"))
    (run,) = next_runs(plan, utc("2026-06-01T10:00Z"), 1)
    assert run.output == "out/{raw}/2026-06-02" and run.fire_time == utc("2026-06-02T00:00Z")


def test_run_id_is_a_pure_function_of_entry_and_fire_time():
    fire = datetime(2026, 3, 9, 6, 0, tzinfo=timezone(timedelta(hours=8)))
    assert run_id_for("weekly-ads", fire) == "sched-weekly-ads-20260308T2200Z"
    assert run_id_for("weekly-ads", fire.astimezone(UTC)) == run_id_for("weekly-ads", fire)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"cron": "61 * * * *"}, "entry 'weekly-ads': `cron` is not a valid cron expression, got: '61 * * * *'"),
        ({"cron": "0 6 * *"}, "entry 'weekly-ads': `cron` is not a valid cron expression "
                              "(5 fields: minute hour day-of-month month day-of-week), got: '0 6 * *'"),
        ({"cron": "0 0 30 2 *"}, "entry 'weekly-ads': `cron` never fires, got: '0 0 30 2 *'"),
        ({"timezone": "Mars/Base"}, "entry 'weekly-ads': `timezone` is not a known IANA time zone "
                                    "(like Europe/Berlin), got: 'Mars/Base'"),
        ({"output": "s3://r/{dat}/"}, "entry 'weekly-ads': `output` has unknown placeholder {dat} (known: {date}, "
                                      "{time}, {year}, {month}, {day}, {hour}, {minute}, {week}, {name}), "
                                      "got: 's3://r/{dat}/'"),
        ({"manifest": "m/{date:%Y}.parquet"}, "entry 'weekly-ads': `manifest` placeholder {date} takes no format "
                                              "or conversion, got: 'm/{date:%Y}.parquet'"),
        ({"manifest": "m/{date.parquet"}, "entry 'weekly-ads': `manifest` has an unmatched '{' or '}' "
                                          "(write {{ or }} for a literal brace), got: 'm/{date.parquet'"),
        ({"catch_up": "always"}, "entry 'weekly-ads': `catch_up` must be one of once, none, all, got: 'always'"),
        ({"crom": "x"}, "entry 'weekly-ads': unknown field(s) `crom` (expected: `name`, `cron`, `timezone`, "
                        "`manifest`, `output`, `model`, `options`, `catch_up`, `grace_seconds`)"),
        ({"options": {"job-id": "x"}}, "entry 'weekly-ads': `options` may not set 'job-id' (it is set by the entry "
                                       "and the run), got: {'job-id': 'x'}"),
        ({"name": "weekly ads"}, "entry #1: `name` must be letters, digits, '.', '_' or '-' (at most 64, starting "
                                 "with a letter or digit), got: 'weekly ads'"),
    ],
)  # fmt: skip
def test_bad_entries_are_reported_with_entry_field_and_value(fields, message):
    with pytest.raises(ScheduleError, match=f"^{re.escape(message)}$"):
        schedule_of(entry(**fields))


def test_duplicate_entry_names_are_refused():
    with pytest.raises(ScheduleError, match=r"^entry 'weekly-ads': `name` is used by more than one entry$"):
        schedule_of(entry(), entry(cron="@daily"))


def test_load_schedule_from_yaml_uses_the_file_name_by_default(tmp_path):
    path = tmp_path / "posters.yaml"
    path.write_text(
        "entries:\n"
        "  - name: daily\n"
        "    cron: '0 6 * * *'\n"
        "    timezone: Europe/Berlin\n"
        "    manifest: s3://b/{date}.parquet\n"
        "    output: s3://r/{date}/\n"
        "    model: tiny\n"
        "    options: {workers: 2, batch-size: 4}\n"
        "    catch_up: all\n",
        encoding="utf-8",
    )
    plan = load_schedule(path)
    assert plan.name == "posters"
    (daily,) = plan.entries
    assert (daily.timezone, daily.model, daily.catch_up) == ("Europe/Berlin", "tiny", "all")
    assert dict(daily.options) == {"workers": 2, "batch_size": 4}
    path.write_text("entries: [\n", encoding="utf-8")
    with pytest.raises(ScheduleError, match=r"^bad schedule file .*posters\.yaml: YAML error line \d+"):
        load_schedule(path)


def test_submit_options_are_checked_against_the_submit_function():
    def submit_job(manifest, output, *, model="m", workers=None, job_id=None):
        return 0

    check_submit_options(schedule_of(entry(options={"workers": 2})), submit_job)
    with pytest.raises(ScheduleError, match=r"^entry 'weekly-ads': `options` has unknown submit option 'wrkers' \(known: workers\)$"):
        check_submit_options(schedule_of(entry(options={"wrkers": 2})), submit_job)


# ---------------------------------------------------------------------------------------------
# catch-up


DAILY = dict(name="daily", cron="0 6 * * *", manifest="m/{date}.parquet", output="o/{date}/")


@pytest.mark.parametrize(
    "policy, now, expected",
    [
        ("once", "2026-03-04T09:00Z", ["2026-03-04"]),
        ("none", "2026-03-04T09:00Z", []),
        ("none", "2026-03-04T06:04Z", ["2026-03-04"]),  # within the 5-minute grace: on time
        ("all", "2026-03-04T09:00Z", ["2026-03-02", "2026-03-03", "2026-03-04"]),
    ],
)
def test_due_runs_apply_the_catch_up_policy(policy, now, expected):
    plan = schedule_of(dict(DAILY, catch_up=policy))
    runs = due_runs(plan, utc("2026-03-01T06:00:10Z"), utc(now))
    assert [f"{r.fire_time:%Y-%m-%d}" for r in runs] == expected


def test_catch_up_all_is_bounded_to_the_latest_runs():
    plan = schedule_of(dict(DAILY, cron="* * * * *", catch_up="all"))
    now = utc("2026-03-01T12:00:30Z")
    runs = due_runs(plan, now - timedelta(hours=3), now)
    assert len(runs) == MAX_CATCH_UP == 100
    assert runs[0].fire_time == utc("2026-03-01T10:21Z") and runs[-1].fire_time == utc("2026-03-01T12:00Z")


def test_a_scheduler_without_state_looks_back_only_its_grace_period():
    plan = schedule_of(dict(DAILY, catch_up="all"))
    assert due_runs(plan, None, utc("2026-03-04T06:04Z"))[0].fire_time == utc("2026-03-04T06:00Z")
    assert due_runs(plan, None, utc("2026-03-04T06:06Z")) == []


# ---------------------------------------------------------------------------------------------
# the scheduler: claims, state, restart


class Recorder:
    def __init__(self, result=None):
        self.runs = []
        self.result = result

    def __call__(self, run):
        self.runs.append(run)
        return self.result

    @property
    def ids(self):
        return [run.run_id for run in self.runs]


def test_two_schedulers_sharing_a_store_submit_a_fire_time_exactly_once(tmp_path):
    store = LocalStore(tmp_path)
    plan = schedule_of(DAILY)
    now = utc("2026-03-02T06:00:02Z")
    submitted = Recorder()
    second = Scheduler(plan, submitted, store)

    def submit_first(run):
        submitted(run)
        assert second.run_once(now) == []  # the other replica ticks while this submit is under way

    first = Scheduler(plan, submit_first, store)
    assert [r.run_id for r in first.run_once(now)] == ["sched-daily-20260302T0600Z"]
    assert second.run_once(now) == []
    assert submitted.ids == ["sched-daily-20260302T0600Z"]
    claim = json.loads(store.get(claim_key("marketing", "sched-daily-20260302T0600Z")))
    assert claim["status"] == "submitted" and claim["claimed_by"] == first.owner
    assert claim["output"] == "o/2026-03-02/"


def test_a_restarted_scheduler_that_lost_its_state_does_not_submit_again(tmp_path):
    store = LocalStore(tmp_path)
    plan = schedule_of(DAILY)
    submitted = Recorder()
    Scheduler(plan, submitted, store).run_once(utc("2026-03-02T06:00:02Z"))
    (tmp_path / state_key("marketing")).unlink()
    Scheduler(plan, submitted, store).run_once(utc("2026-03-02T06:01:00Z"))
    assert submitted.ids == ["sched-daily-20260302T0600Z"]


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("once", ["sched-daily-20260304T0600Z"]),
        ("none", []),
        ("all", ["sched-daily-20260302T0600Z", "sched-daily-20260303T0600Z", "sched-daily-20260304T0600Z"]),
    ],
)
def test_restart_catch_up_from_the_persisted_last_checked(tmp_path, policy, expected):
    store = LocalStore(tmp_path)
    plan = schedule_of(dict(DAILY, catch_up=policy))
    before = Recorder()
    Scheduler(plan, before, store).run_once(utc("2026-03-01T06:00:10Z"))
    assert before.ids == ["sched-daily-20260301T0600Z"]
    state = json.loads(store.get(state_key("marketing")))
    assert state["last_checked"] == "2026-03-01T06:00:10Z"

    after = Recorder()  # down for three days, then a new process
    Scheduler(plan, after, store).run_once(utc("2026-03-04T09:00Z"))
    assert after.ids == expected
    assert json.loads(store.get(state_key("marketing")))["last_checked"] == "2026-03-04T09:00:00Z"


def test_a_failed_submit_is_recorded_not_retried_and_does_not_stop_other_entries(tmp_path):
    store = LocalStore(tmp_path)
    plan = schedule_of(dict(DAILY, name="broken"), dict(DAILY, name="fine"), dict(DAILY, name="exit3"))
    submitted = []

    def submit(run):
        submitted.append(run.run_id)
        if run.entry.name == "broken":
            raise RuntimeError("cluster unreachable")
        return 3 if run.entry.name == "exit3" else 0

    scheduler = Scheduler(plan, submit, store)
    done = scheduler.run_once(utc("2026-03-02T06:00:05Z"))
    assert [r.entry.name for r in done] == ["fine"]
    broken = json.loads(store.get(claim_key("marketing", "sched-broken-20260302T0600Z")))
    assert broken["status"] == "failed" and broken["error"] == "RuntimeError: cluster unreachable"
    assert json.loads(store.get(claim_key("marketing", "sched-exit3-20260302T0600Z")))["exit_code"] == 3
    (tmp_path / state_key("marketing")).unlink()
    scheduler.run_once(utc("2026-03-02T06:00:30Z"))
    assert len(submitted) == 3


def test_run_forever_wakes_at_each_fire_time_and_submits_each_once(tmp_path):
    clock_now = [utc("2026-03-02T10:59:30Z")]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        clock_now[0] += timedelta(seconds=seconds)

    submitted = Recorder()
    plan = schedule_of(dict(DAILY, cron="0 * * * *"))
    scheduler = Scheduler(plan, submitted, LocalStore(tmp_path), clock=lambda: clock_now[0], sleep=sleep, max_sleep=3600)
    scheduler.run_forever(stop=lambda: clock_now[0] >= utc("2026-03-02T13:30Z"))
    assert submitted.ids == ["sched-daily-20260302T1100Z", "sched-daily-20260302T1200Z", "sched-daily-20260302T1300Z"]
    assert sleeps == [30.0, 3600.0, 3600.0, 3600.0]


def test_submit_planned_run_passes_the_run_id_as_job_id(monkeypatch):
    import jobs.submit_api

    calls = []

    class Outcome:
        exit_code = 3

    def fake_submit_job(manifest, output, **options):
        calls.append((manifest, output, options))
        return Outcome()

    monkeypatch.setattr(jobs.submit_api, "submit_job", fake_submit_job)
    plan = schedule_of(dict(DAILY, options={"workers": 2}), dict(DAILY, name="tiny", model="tiny"))
    first, second = next_runs(plan, utc("2026-03-01T00:00Z"), 2)
    assert submit_planned_run(first) == 3
    submit_planned_run(second)
    assert calls == [
        ("m/2026-03-01.parquet", "o/2026-03-01/",
         {"job_id": "sched-daily-20260301T0600Z", "show_progress": False, "workers": 2}),
        ("m/2026-03-01.parquet", "o/2026-03-01/",
         {"job_id": "sched-tiny-20260301T0600Z", "show_progress": False, "model": "tiny"}),
    ]  # fmt: skip


def test_cli_schedule_next_prints_local_and_utc_times(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "entries:\n"
        "  - {name: nightly, cron: '30 2 * * *', timezone: America/New_York,"
        " manifest: 'm/{date}.parquet', output: 'o/{date}-{time}/'}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(cli, ["schedule", "next", str(path), "--count", "2", "--after", "2026-03-07T12:00Z"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ENTRY", "LOCAL", "TIME", "UTC", "MANIFEST", "OUTPUT"]
    assert lines[1].split() == ["nightly", "2026-03-08", "03:00", "EDT", "(America/New_York)", "2026-03-08",
                                "07:00Z", "m/2026-03-08.parquet", "o/2026-03-08-0300/"]  # fmt: skip
    assert lines[2].split()[1:4] == ["2026-03-09", "02:30", "EDT"]


def test_a_claim_replaced_through_an_overwrite_store_is_not_ours(tmp_path):
    plan = schedule_of(DAILY)
    now = utc("2026-03-02T06:00:02Z")
    submitted = Recorder()
    Scheduler(plan, submitted, LocalStore(tmp_path)).run_once(now)
    (tmp_path / state_key("marketing")).unlink()
    Scheduler(plan, submitted, LocalStore(tmp_path, overwrite=True)).run_once(now)
    assert submitted.ids == ["sched-daily-20260302T0600Z"]


def test_last_checked_never_moves_backwards_for_a_scheduler_with_a_slow_clock(tmp_path):
    store = LocalStore(tmp_path)
    plan = schedule_of(DAILY)
    Scheduler(plan, Recorder(), store).run_once(utc("2026-03-02T07:00Z"))
    Scheduler(plan, Recorder(), store).run_once(utc("2026-03-02T06:30Z"))
    assert json.loads(store.get(state_key("marketing")))["last_checked"] == "2026-03-02T07:00:00Z"


def test_two_schedules_with_the_same_entry_name_sharing_a_state_store_both_submit(tmp_path):
    store = LocalStore(tmp_path)
    now = utc("2026-03-02T06:00:02Z")
    marketing, travel = Recorder(), Recorder()
    Scheduler(schedule_of(DAILY, name="marketing"), marketing, store).run_once(now)
    Scheduler(schedule_of(DAILY, name="travel"), travel, store).run_once(now)
    assert marketing.ids == travel.ids == ["sched-daily-20260302T0600Z"]
    assert json.loads(store.get(claim_key("travel", "sched-daily-20260302T0600Z")))["status"] == "submitted"


class FailsFirst:
    """A submit that fails with `error` (or returns `result`) the first `times` times, then succeeds."""

    def __init__(self, times, error=None, result=None):
        self.times, self.error, self.result, self.runs = times, error, result, []

    def __call__(self, run):
        self.runs.append(run.run_id)
        if len(self.runs) <= self.times:
            if self.error is not None:
                raise self.error
            return self.result
        return 0


@pytest.mark.parametrize("failure", [
    {"error": SystemError_("cannot connect to the Ray cluster at http://head:8265")},
    {"error": ConnectionResetError(104, "Connection reset by peer")},
    {"result": 4},
])
def test_a_transiently_failed_submit_is_retried_with_backoff_exactly_once(tmp_path, failure):
    store = LocalStore(tmp_path)
    plan = schedule_of(DAILY)
    submit = FailsFirst(2, **failure)
    first, second = Scheduler(plan, submit, store), Scheduler(plan, submit, store)
    run_id = "sched-daily-20260302T0600Z"
    assert first.run_once(utc("2026-03-02T06:00:02Z")) == []
    claim = json.loads(store.get(claim_key("marketing", run_id)))
    assert (claim["status"], claim["attempts"], claim["next_try"]) == ("retry", 1, "2026-03-02T06:01:02Z")
    assert second.run_once(utc("2026-03-02T06:00:30Z")) == []  # not yet: the backoff is not over
    assert first.run_once(utc("2026-03-02T06:01:05Z")) == []  # attempt 2 fails too: 2 minutes now
    assert json.loads(store.get(claim_key("marketing", run_id)))["next_try"] == "2026-03-02T06:03:05Z"
    assert [r.run_id for r in second.run_once(utc("2026-03-02T06:03:10Z"))] == [run_id]
    assert first.run_once(utc("2026-03-02T06:10Z")) == [] and second.run_once(utc("2026-03-02T06:10Z")) == []
    assert submit.runs == [run_id] * 3  # the same run id each time: the job resumes, never doubles
    claim = json.loads(store.get(claim_key("marketing", run_id)))
    assert (claim["status"], claim["attempts"], claim["claimed_by"]) == ("submitted", 3, second.owner)
    assert not (tmp_path / retry_key("marketing", run_id)).exists()


def test_a_submit_that_keeps_failing_transiently_gives_up_after_max_attempts(tmp_path):
    store = LocalStore(tmp_path)
    submit = FailsFirst(100, result=4)
    scheduler = Scheduler(schedule_of(DAILY), submit, store)
    now = utc("2026-03-02T06:00:02Z")
    for _ in range(MAX_SUBMIT_ATTEMPTS + 3):
        scheduler.run_once(now)
        now += timedelta(hours=1)
    assert len(submit.runs) == MAX_SUBMIT_ATTEMPTS
    claim = json.loads(store.get(claim_key("marketing", "sched-daily-20260302T0600Z")))
    assert (claim["status"], claim["gave_up"]) == ("failed", f"after {MAX_SUBMIT_ATTEMPTS} attempts")


def test_a_bad_manifest_is_not_retried(tmp_path):
    store = LocalStore(tmp_path)
    submit = FailsFirst(100, error=UserError("row 3 (id 'x'): `width` must be a multiple of 16, got: 1000"))
    scheduler = Scheduler(schedule_of(DAILY), submit, store)
    for minute in (0, 5, 30):
        scheduler.run_once(utc("2026-03-02T06:00:02Z") + timedelta(minutes=minute))
    assert len(submit.runs) == 1
    assert json.loads(store.get(claim_key("marketing", "sched-daily-20260302T0600Z")))["status"] == "failed"


def test_schedule_run_refuses_a_state_store_it_cannot_write(tmp_path, capsys):
    from jobs.cli import main

    schedule_file = tmp_path / "s.yaml"
    schedule_file.write_text(json.dumps({"name": "m", "entries": [DAILY]}), encoding="utf-8")
    (tmp_path / "a-file").write_text("not a directory")
    state = tmp_path / "a-file" / "state"
    with pytest.raises(SystemExit) as exited:
        main(["schedule", "run", str(schedule_file), "--state", str(state), "--once"])
    assert exited.value.code == 1
    assert capsys.readouterr().err == f"error: cannot write to output directory {state}: Not a directory\n"
