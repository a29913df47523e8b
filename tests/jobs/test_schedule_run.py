"""`qwen-batch schedule run --once` for real: a due entry is submitted once, a second scheduler
(or a restart) does not submit it again."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import tiny_rows


def schedule_run(file, state, ray_address):
    return subprocess.run([sys.executable, "-m", "jobs", "schedule", "run", str(file), "--state", str(state), "--once"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ray_address})


def test_a_due_entry_is_rendered_once_by_two_schedulers(ray_session, write_manifest, tmp_path):
    write_manifest(tiny_rows(3), name="posters.parquet")
    out = tmp_path / "renders"
    schedule = tmp_path / "marketing.yaml"
    schedule.write_text(
        "entries:\n"
        "  - name: every-minute\n"
        "    cron: '* * * * *'\n"
        "    timezone: Asia/Shanghai\n"
        f"    manifest: {tmp_path}/posters.parquet\n"
        f"    output: {out}/{{date}}-{{time}}\n"
        "    model: tiny\n"
        "    options: {shard_size: 2}\n",
        encoding="utf-8",
    )

    first = schedule_run(schedule, tmp_path / "state", ray_session)
    second = schedule_run(schedule, tmp_path / "state", ray_session)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout.startswith("submitted 1 run(s)\n  sched-every-minute-")
    next_minute = second.stdout.startswith("submitted 1 run(s)")  # the clock turned to the next minute in between
    run_dirs = sorted(out.iterdir())  # named {date}-{time} of their fire: the first scheduler's is the earliest
    assert len(run_dirs) == 1 + next_minute
    run_dir = run_dirs[0]
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == ["row-000.png", "row-001.png", "row-002.png"]
    run_id = first.stdout.split()[-1]
    assert (tmp_path / "state" / "_schedule" / "marketing" / f"{run_id}.json").exists()
    assert run_id not in second.stdout  # claimed by the first scheduler: never submitted twice
    # nothing else was due, unless the clock turned to the next minute in between
    assert second.stdout.startswith("submitted 0 run(s)") or second.stdout.startswith("submitted 1 run(s)\n  sched-every-minute-")
