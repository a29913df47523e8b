"""One driver against a simulated fleet: how many rows/s of settlement the driver's scheduling and
bookkeeping core sustains, how its memory grows with the rows and the workers, and how long a resume
of a job whose every row is done takes to say so.

    .venv/bin/python bench/bench_driver.py [--rows 1000000] [--workers 100,1000] [--image-s 0]
                                           [--die 0.0005] [--output DIR|s3://bucket/prefix]

Everything is the real code path of `qwen-batch submit` (validation, claim, manifest copy, the pull
loop, retries, ledger shard files and their compaction, results.parquet, report.html) except the
workers: Ray's `wait`/`get` are replaced in this process by a simulator whose actors are ready at
once and stream each shard's results back one micro-batch (4 rows) at a time, no model, no image.
`--image-s 0` answers as fast as the driver takes results (its ceiling); `--image-s 5` is a GPU fleet
at 5 s per image (then the figure is the driver's CPU use). `--die P`: each micro-batch ends its
actor with probability P (Ray restarts it; its unfinished rows go back to the queue, a retry after
the backoff). The wait picks the stream whose next batch has waited longest, scanning every
reference like ray.wait does; Ray's own per-call cost is not in these figures.

Then the same submit again (every row done) in a fresh process through the CLI: the time until it
says so, and the same in this process phase by phase. Prints one figure per line.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------------
# the simulated fleet
# ---------------------------------------------------------------------------------------------------
class SimRef:
    """What `actor.ready.remote()` returns: ready at once."""

    ready_at = 0.0

    def __init__(self, value):
        self.value = value


class SimStream:
    """What `render_shard.options(num_returns="streaming").remote(rows, ...)` returns: one item (a
    micro-batch of results) at a time, each `batch * image_s` seconds after the previous one."""

    def __init__(self, fleet, worker: str, rows, batch: int):
        self.fleet, self.worker, self.rows, self.batch = fleet, worker, list(rows), batch
        self.ready_at = time.monotonic() + self.fleet.item_s(min(batch, len(self.rows)))

    def __next__(self):
        from qwen_worker.rows import RowResult, RowStatus

        if not self.rows:
            raise StopIteration
        if self.fleet.rng.random() < self.fleet.die:
            self.fleet.deaths += 1
            self.rows = []
            import ray

            raise ray.exceptions.RayActorError(error_msg=f"{self.worker} died (simulated)")
        taken, self.rows = self.rows[:self.batch], self.rows[self.batch:]
        self.ready_at = time.monotonic() + self.fleet.item_s(min(self.batch, len(self.rows)))
        return [RowResult(row_index=row.row_index, id=row.id, status=RowStatus.DONE, keys=list(row.keys),
                          sha256=[FAKE_SHA] * len(row.keys), seed=row.seed, render_s=0.01, upload_s=0.001,
                          worker=self.worker) for row in taken]


FAKE_SHA = "0" * 64


class _Remote:
    def __init__(self, call):
        self.call = call

    def remote(self, *args):
        return self.call(*args)

    def options(self, **_options):
        return self


class SimActor:
    def __init__(self, fleet, name: str, node: int):
        self.name, self.node = name, node
        self.ready = _Remote(lambda: SimRef({"ready": True, "node_ip": f"10.0.{node // 250}.{node % 250}",
                                             "load_s": 0.0, "offload_plan": "sim"}))
        self.render_shard = _Remote(lambda rows, batch, _look_first: SimStream(fleet, name, rows, batch or 4))


class Fleet:
    def __init__(self, image_s: float, die: float, seed: int = 0):
        self.image_s, self.die, self.rng, self.deaths = image_s, die, random.Random(seed), 0

    def item_s(self, images: int) -> float:
        return images * self.image_s

    # ray.wait / ray.get, as the driver calls them
    def wait(self, refs, num_returns=1, timeout=None):
        if num_returns > 1:  # the driver's "and whatever else is ready now" (timeout 0)
            now = time.monotonic()
            ready = [ref for ref in refs if ref.ready_at <= now][:num_returns]
            taken = set(map(id, ready))
            return ready, [ref for ref in refs if id(ref) not in taken]
        best = min(refs, key=lambda ref: ref.ready_at)
        delay = best.ready_at - time.monotonic()
        if delay > 0:
            if timeout is not None and delay > timeout:
                time.sleep(timeout)
                return [], refs
            time.sleep(delay)
        return [best], [ref for ref in refs if ref is not best]

    @staticmethod
    def get(value):
        return value.value if isinstance(value, SimRef) else value


def install(fleet: Fleet, workers: int) -> None:
    """Point the driver at the simulated fleet: Ray's wait/get, and a pool of simulated actors."""
    import ray

    import jobs.runner as runner
    from jobs.pool import PoolSize, WorkerPool, WorkerSlot

    class SimPool(WorkerPool):
        def add(self, count):
            added = []
            for _ in range(max(0, count)):
                name = f"sim-{self._count}"
                added.append(WorkerSlot(SimActor(fleet, name, self._count), name, placed=True,
                                        node_id=f"node-{self._count}"))
                self._count += 1
            self.slots.extend(added)
            return added

        def _read_ray(self):
            return {}

        def stop_all(self, *, wait_s=10.0):
            pass

    def start_pool(plan, options, store, *, cluster, work_units):
        pool = SimPool(plan, options, store, PoolSize(workers, workers, str(workers), exact=True), {"num_cpus": 1}, echo=options.echo)
        pool.add(workers)
        return pool

    ray.wait, ray.get, ray.is_initialized, ray.kill = fleet.wait, fleet.get, lambda: False, lambda *a, **k: None
    runner.start_pool = start_pool
    runner.connect_ray = lambda address=None: False


# ---------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------
def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Phases:
    """Wall time of each step of submit_job (the functions it calls, wrapped by name)."""

    def __init__(self, names):
        import jobs.submit_api as api

        self.seconds: dict[str, float] = {}
        self.spans: dict[str, tuple[float, float]] = {}  # the last call's (start, end), time.monotonic()
        for name in names:
            original = getattr(api, name)
            setattr(api, name, self._timed(name, original))

    def _timed(self, name, original):
        def timed(*args, **kwargs):
            started = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                self.spans[name] = (started, time.monotonic())
                self.seconds[name] = self.seconds.get(name, 0.0) + self.spans[name][1] - started
        return timed


class RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.5):
            self.samples.append((time.monotonic(), rss_mb()))


def write_manifest(path: Path, rows: int) -> None:
    """`rows` plain text-to-image rows (64², 4 steps), written in row groups of 1M."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                        ("steps", pa.int64())])
    prompts = pa.array(["a bilingual travel guide page 香港 Hong Kong", "a luxury perfume advertisement",
                        "官方通知 标题 关于春节放假的通知", "a restaurant menu with prices"])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            index = np.arange(start, start + n)
            ids = pc.utf8_lpad(pa.array(index.astype(str)), 9, "0")
            writer.write_table(pa.table({
                "id": pc.binary_join_element_wise("row-", ids, ""),
                "prompt": prompts.take(pa.array(index % 4)),
                "width": pa.array(np.full(n, 64)), "height": pa.array(np.full(n, 64)), "steps": pa.array(np.full(n, 4)),
            }, schema=schema))


def simulate(args, manifest: Path, output: str, workers: int) -> None:
    from jobs.submit_api import submit_job

    fleet = Fleet(args.image_s, args.die)
    install(fleet, workers)
    phases = Phases(["validate_manifest", "file_sha256", "run_job", "finish_job"])
    before = rss_mb()
    sampler = RssSampler()
    sampler.start()
    cpu0, started = time.process_time(), time.perf_counter()
    outcome = submit_job(str(manifest), output, model="tiny", workers=workers, show_progress=False,
                         echo=lambda _text: None)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    sampler.stop.set()
    rows, run_s = outcome.total, phases.seconds["run_job"]
    tag = f"{rows:,} rows, {workers} workers"
    print(f"[{tag}] outcome: {outcome.done:,} done, {outcome.failed} failed, exit {outcome.exit_code}; "
          f"{fleet.deaths} simulated actor deaths")
    print(f"[{tag}] settlement: {rows / run_s:,.0f} rows/s over the run ({run_s:.1f} s; "
          f"driver CPU {cpu / wall * 100:.0f} % of one core over the whole submit)")
    for name, seconds in phases.seconds.items():
        print(f"[{tag}] phase {name}: {seconds:.2f} s")
    print(f"[{tag}] submit wall: {wall:.1f} s")
    print(f"[{tag}] RSS before submit: {before:.0f} MB; peak over the submit: {max(r for _t, r in sampler.samples):.0f} MB "
          f"(process VmHWM {rss_mb('VmHWM'):.0f} MB)")
    start, end = phases.spans["run_job"]
    during = [r for t, r in sampler.samples if start <= t <= end]
    if during:
        print(f"[{tag}] RSS while rows settle: first {during[0]:.0f} MB, last {during[-1]:.0f} MB, "
              f"most {max(during):.0f} MB")


def resume_in_fresh_process(manifest: Path, output: str) -> float:
    """The same submit again, through the CLI in a new process: seconds until it exits."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [str(Path(sys.executable).with_name("qwen-batch")), "submit", str(manifest), "--output", output,
           "--model", "tiny", "--workers", "1", "--no-progress"]
    started = time.perf_counter()
    done = subprocess.run(cli, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"resume exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def resume_phases(manifest: Path, output: str) -> None:
    """The resume again in this process, phase by phase."""
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from bench.bench_driver import Phases\n"
        "phases = Phases(['validate_manifest', 'file_sha256', 'run_job', 'finish_job'])\n"
        "from jobs.submit_api import submit_job\n"
        "t = time.perf_counter()\n"
        "o = submit_job(%r, %r, model='tiny', workers=1, show_progress=False, echo=lambda _t: None)\n"
        "total = time.perf_counter() - t\n"
        "assert o.skipped == o.total, o\n"
        "print(' '.join(f'{k}={v:.2f}' for k, v in phases.seconds.items()), f'rest={total - sum(phases.seconds.values()):.2f}')\n"
    ) % (str(ROOT), str(manifest), output)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", default="100,1000", help="comma-separated fleet sizes, one run each")
    parser.add_argument("--image-s", type=float, default=0.0, help="simulated seconds per image (0: as fast as taken)")
    parser.add_argument("--die", type=float, default=0.0005, help="chance that a micro-batch ends its actor")
    parser.add_argument("--output", help="where the outputs go (default: a temp dir); an s3:// prefix works too")
    parser.add_argument("--no-resume", action="store_true", help="skip the all-done resume timing")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    sizes = [int(w) for w in args.workers.split(",")]
    if len(sizes) > 1:  # one process per fleet size, so each RSS figure is its own
        for workers in sizes:
            subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--workers", str(workers),
                            "--image-s", str(args.image_s), "--die", str(args.die), *(["--no-resume"] if args.no_resume else []),
                            *(["--output", f"{args.output.rstrip('/')}/w{workers}"] if args.output else [])], check=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        manifest = Path(tmp) / "manifest.parquet"
        started = time.perf_counter()
        write_manifest(manifest, args.rows)
        print(f"manifest: {args.rows:,} rows, {manifest.stat().st_size / 1e6:.1f} MB, written in "
              f"{time.perf_counter() - started:.1f} s")
        output = args.output or str(Path(tmp) / "out")
        simulate(args, manifest, output, sizes[0])
        if not args.no_resume:
            tag = f"{args.rows:,} rows"
            print(f"[{tag}] resume with every row done, fresh CLI process: {resume_in_fresh_process(manifest, output):.1f} s "
                  "until it says so")
            print(f"[{tag}] resume phases (s): {resume_phases(manifest, output)}")


if __name__ == "__main__":
    main()
