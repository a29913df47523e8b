"""The driver: start RenderWorker actors on Ray and feed them shards until every row settles.

Pull scheduling: an idle, ready actor takes the next shard, so slow shapes never stall fast ones.
Each actor streams back the results of every micro-batch. What happens to a row that did not
succeed depends on its failure kind (qwen_worker.failures): a row error fails it; a worker error
sends it to another worker without using up an attempt (and counts against the worker, which is
quarantined after a few in a row); a transient error or a lost actor retries it with backoff,
bounded by `max_attempts`. The first success settles a row; a failure settles it only once no other
copy of it (a straggler's, a retry) can still succeed, and never when its image is stored with this
job's provenance. A shard's ledger file is written once all its rows have settled.

How many workers there are is the pool's business (jobs.pool.WorkerPool: it grows with the work and
the nodes that join, and releases workers when the queue runs dry); the driver asks it each turn and
hands a draining node's unfinished rows to other workers, at no cost to their attempts.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from jobs.ledger import COMPACT_EVERY, STATE_COLUMNS, compact, read_ledger, write_shard_ledger
from jobs.manifest import ResolveContext, iter_resolved, render_rows, row_messages
from jobs.plan import JobPlan, open_job_manifest, resolve_context
from jobs.pool import (BUSY, DRAINED, DRAINING, ENDED, IDLE, LOST, NOT_READY, QUARANTINED, RECOVERING, STARTING,
                       WorkerPool, WorkerSlot, pool_line, record_workers, resources_text, start_pool, waiting_line)
from jobs.progress import ProgressBar, ProgressFile
from jobs.results import ledger_changes
from qwen_worker.errors import QwenBatchError
from qwen_worker.failures import ErrorKind
from qwen_worker.provenance import image_provenance, stored_own_image
from qwen_worker.rows import RenderRow, RowResult, RowStatus
from qwen_worker.stores import Store, sha256_hex


LOOKAHEAD_SHARDS = 8  # fresh shards read ahead, so an idle worker can take one whose LoRAs it holds
RECORD_WORKERS_S = 2.0  # job.json's worker list is rewritten at most this often (and when the job ends)


@dataclass
class RunOptions:
    workers: object = None  # --workers: N, "MIN-MAX", "auto" or a PoolSize; None: auto on a cluster, else one
    # per GPU (or 1 CPU actor)
    batch_size: int = 4  # 0: auto, each worker fits it to its GPU memory per image shape
    max_attempts: int = 3
    retry_backoff_s: float = 1.0
    overwrite: bool = False
    model_dir: str | None = None
    offload: str = "auto"
    device: str = "auto"  # cpu: real presets on CPU workers (slow; DF11 decoded by our codec)
    show_progress: bool = True
    template_dirs: tuple[str, ...] = ()
    speculate: bool = True  # re-dispatch the last in-flight shards to idle workers
    new_output: bool = False  # the job was just created in its output: no stored image can be ours
    quarantine_after: int = 3  # worker errors in a row that quarantine a worker
    ready_timeout_s: float = 1800.0  # --first-worker-timeout: no worker ready by then, the job stops (exit 4)
    png_compression: int = 1  # zlib level of PNG images (fast by default)
    affinity: bool = True  # hand a worker the shards whose LoRAs it holds, when there is a choice
    text_check: dict | None = None  # --check-text: {"min_score", "max_rerolls", "keep_rerolls"} (qwen_worker.actor)
    echo: Callable[[str], None] = field(default=lambda _text: None, repr=False)


@dataclass
class JobOutcome:
    job_id: str
    output: str
    total: int
    done: int
    failed: int
    rendered: int  # rows rendered by this run
    skipped: int  # rows already done before this run started
    failed_ids: list[str] = field(default_factory=list)
    speculative: int = 0  # straggler shards also handed to an idle worker
    not_ready: list[str] = field(default_factory=list)  # workers that failed readiness (one line each)
    quarantined: list[str] = field(default_factory=list)
    recovered: int = 0  # rows reported failed by a copy but found stored with this job's provenance

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 and self.done == self.total else 3


@dataclass
class ShardWork:
    shard_index: int
    rows: list[RenderRow]
    attempt: int = 1
    ready_at: float = 0.0
    look_first: bool = False  # a retry or a second copy: check the store before rendering
    avoid: frozenset = frozenset()  # workers whose worker error sent these rows back
    unresolved: list = field(default_factory=list)  # (row index, id, error) of rows that cannot be rendered

    def loras(self) -> set[str]:
        """The LoRA files the shard's rows use (what a worker must load to render it)."""
        return {ref.uri for row in self.rows for ref in row.loras}


class _ShardState:
    """One shard's rows so far: final results, live copies per row (queued or in flight), and
    failures waiting for another copy of their row to finish."""

    def __init__(self, expected: set[int], results: dict[int, RowResult]):
        self.expected = expected
        self.results = results
        self.copies: collections.Counter[int] = collections.Counter()
        self.tentative: dict[int, tuple[RenderRow, RowResult]] = {}

    @property
    def complete(self) -> bool:
        return self.expected.issubset(self.results)


def connect_ray(address: str | None = None) -> bool:
    """Connect to Ray: an existing cluster (`address`), the one this process already joined, or a new
    local single-node instance. Returns True when this call started Ray (so it should shut it down)."""
    from jobs.ray_auth import auth_problem, enable_token_auth_for_driver

    if address:
        enable_token_auth_for_driver()  # before Ray is imported, where possible
        # Ray's own autoscaler lines ("No available node types can fulfill ...") would interleave with the
        # pool's "waiting for N GPUs from the autoscaler"; RAY_SCHEDULER_EVENTS=1 brings them back.
        os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
    import ray

    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        except Exception as exc:
            problem = auth_problem(exc, address)
            if problem is not None:
                raise problem from None
            raise QwenBatchError(
                f"cannot connect to the Ray cluster at {address} ({_first_line(exc)}); check that it is running and "
                "reachable from here (with token authentication, the token must be set here too)"
            ) from None
    else:
        ray.init(address="local", logging_level="WARNING", include_dashboard=True, dashboard_host="127.0.0.1")
    return True


def plan_work(plan: JobPlan, context: ResolveContext, ledger, done: np.ndarray, states: dict,
              parquet_file) -> Iterator[ShardWork]:
    """Shards with their rows not yet done, streaming the manifest once (resolved batch by batch)."""
    pending: dict[int, tuple[list[RenderRow], list]] = {}  # shard -> (rows, unresolved) not yet complete

    def flush(shard_index: int):
        rows, unresolved = pending.pop(shard_index)
        start, stop = plan.shard_range(shard_index)
        known = {i: r for i, r in ledger.results(start, stop, status=RowStatus.DONE).items() if done[i]}
        states[shard_index] = _ShardState(set(range(start, stop)), known)
        return ShardWork(shard_index, rows, unresolved=unresolved)

    for resolved in iter_resolved(parquet_file, plan.manifest, context):
        todo = ~done[resolved.start: resolved.start + resolved.size]
        for row in render_rows(resolved, np.flatnonzero(todo & resolved.valid)):
            pending.setdefault(plan.shard_of_row(row.row_index), ([], []))[0].append(row)
        for offset in np.flatnonzero(todo & ~resolved.valid):  # e.g. a template changed since validation
            row_index = resolved.start + int(offset)
            entry = pending.setdefault(plan.shard_of_row(row_index), ([], []))
            entry[1].append((row_index, resolved.ids[int(offset)].as_py() or "", "; ".join(row_messages(resolved, int(offset)))))
        complete_before = plan.shard_of_row(resolved.start + resolved.size)  # shards ending in this batch
        for shard_index in sorted(s for s in pending if s < complete_before):
            yield flush(shard_index)
    for shard_index in sorted(pending):
        yield flush(shard_index)


INPUT_COLUMNS = {"image", "images", "mask"}


def changed_inputs(plan: JobPlan, context, ledger, parquet_file) -> np.ndarray:
    """Rows the ledger has as done whose input images are another version now (the digest of
    their files' versions differs from the one they were rendered with)."""
    changed = np.zeros(plan.rows, dtype=bool)
    for resolved in iter_resolved(parquet_file, plan.manifest, context):
        rows = np.arange(resolved.start, resolved.start + resolved.size, dtype=np.int64)
        rendered_with = ledger.input_digests(rows)
        for offset in np.flatnonzero(resolved.valid):
            before = rendered_with[int(offset)]
            if before is not None and before != resolved.extras.input_digest(int(offset)):
                changed[resolved.start + int(offset)] = True
    return changed


def run_job(plan: JobPlan, store: Store, options: RunOptions, *, address: str | None = None) -> JobOutcome:
    """Render every row of `plan` not yet done; return counts once every row has settled."""
    import ray

    ledger = read_ledger(store, plan.job_id, columns=STATE_COLUMNS)  # enough to know what is done
    done = ledger.done_mask(plan.rows)
    context = resolve_context(plan, options.template_dirs, model_dir=options.model_dir,
                              store_options=store.worker_options())
    parquet_file = open_job_manifest(plan, store) if done.any() else None
    if parquet_file is not None and INPUT_COLUMNS & set(parquet_file.schema_arrow.names):
        done &= ~changed_inputs(plan, context, ledger, parquet_file)  # an input file changed since: render again
    already_done = int(done.sum())
    progress = ProgressBar(plan.rows, already_done=already_done, enabled=options.show_progress)
    outcome = JobOutcome(plan.job_id, plan.output, plan.rows, already_done, 0, 0, already_done)
    if already_done == plan.rows:
        progress.close()
        return outcome

    parquet_file = parquet_file or open_job_manifest(plan, store)
    if already_done:  # the rows of shards partly done carry their whole records into the shard's ledger file
        ledger = read_ledger(store, plan.job_id)
    owns_ray = connect_ray(address)
    progress_file = ProgressFile(store, plan.job_id, progress)
    slots: list[WorkerSlot] = []
    pool = None
    state = "failed"
    try:
        shards_todo = len(np.unique(np.flatnonzero(~done) // plan.shard_size))
        pool = start_pool(plan, options, store, cluster=address is not None, work_units=shards_todo)
        slots = pool.slots
        progress_file.pool = pool.summary
        progress_file.write(force=True)
        from qwen_worker.metrics import DriverMetrics

        metrics = DriverMetrics(plan.job_id)
        if already_done:
            metrics.skipped.inc(already_done, metrics.tags)
        states: dict[int, _ShardState] = {}
        driver = _Driver(plan, store, options, pool, plan_work(plan, context, ledger, done, states, parquet_file), states,
                         progress, outcome, progress_file, metrics, shards_todo=shards_todo)
        driver.run()
        state = "finished"
    finally:
        if pool is not None:  # first: a stopped job (SIGTERM from `cancel`) has seconds before it is killed
            pool.stop_all()
        if slots:
            progress_file.write(state, force=True)
            record_workers(store, plan, slots)
        if owns_ray:
            ray.shutdown()
    progress.close()
    return outcome


class _Driver:
    """The dispatch loop of one run (see the module docstring)."""

    def __init__(self, plan, store, options: RunOptions, pool: WorkerPool, fresh_work, states, progress, outcome,
                 progress_file, metrics, *, shards_todo: int = 0):
        self.plan, self.store, self.options, self.pool, self.slots = plan, store, options, pool, pool.slots
        self.fresh_work, self.states, self.progress, self.outcome = fresh_work, states, progress, outcome
        self.progress_file, self.metrics = progress_file, metrics
        self.retry_queue: collections.deque[ShardWork] = collections.deque()
        self.in_flight: dict = {}  # stream -> (slot, ShardWork, row indices this copy reported)
        self.waiting: dict = {}  # ready() ref -> slot (starting, or restarted by Ray)
        self.speculated: set[int] = set()
        self.written: list = []  # (shard index, table) of shard files not yet compacted
        self.manifest_read = False
        self.lookahead: list[ShardWork] = []  # fresh shards read from the manifest, not yet handed out
        self.shards_left = shards_todo  # fresh shards not yet read from the manifest (at most)
        self.started = time.monotonic()
        self.ever_ready = False
        self.workers_changed = False  # job.json's worker list is behind
        self.ledger_written = False
        self.workers_recorded = float("-inf")
        for slot in self.slots:
            self.waiting[slot.actor.ready.remote()] = slot

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        import ray

        while True:
            self.dispatch_idle()
            self.metrics.in_flight.set(sum(len(w.rows) - len(seen) for _s, w, seen in self.in_flight.values()),
                                       self.metrics.tags)
            self.progress_file.write()
            if self.manifest_read and not self.states and not self.retry_queue:
                self.compact()
                return  # every row has settled (a straggler's slower copy may still run: it is killed)
            self.adjust_pool()
            self.check_workers_left()
            refs = list(self.in_flight) + list(self.waiting)
            if not refs:
                time.sleep(0.05)  # what is left is waiting out its backoff
                continue
            ready, rest = ray.wait(refs, num_returns=1, timeout=1.0)
            if ready and rest:  # and whatever else is ready now: one turn of bookkeeping for all of them
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                if ref in self.waiting:
                    self.on_ready_answer(ref)
                elif ref in self.in_flight:  # (not a stream of a worker quarantined meanwhile)
                    self.on_stream_item(ref)
            self.record_workers()

    def idle_slots(self) -> list[WorkerSlot]:
        return [slot for slot in self.slots if slot.state == IDLE]

    def dispatch_idle(self) -> None:
        if not self.pool.gate_open(time.monotonic() - self.started, self.options.ready_timeout_s):
            return  # --workers MIN: not enough workers ready yet
        speculate = self.options.speculate
        for slot in self.idle_slots():
            work = self.next_work(slot)
            if work is None:
                if speculate and not self.retry_queue:
                    speculate = self.speculate(slot)  # none to copy for this one: none for the next either
                continue
            self.dispatch(slot, work)

    def next_work(self, slot: WorkerSlot) -> ShardWork | None:
        """A retry whose backoff is over (rows a worker error sent back go to another worker when
        there is one), else the next fresh shard."""
        now = time.monotonic()
        usable = {s.name for s in self.slots if s.state in (STARTING, IDLE, BUSY, RECOVERING)} if self.retry_queue else set()
        for _ in range(len(self.retry_queue)):
            work = self.retry_queue.popleft()
            work.rows = [r for r in work.rows if not self.is_settled(work.shard_index, r.row_index)]
            if not work.rows:
                continue  # e.g. a draining worker's copy finished them first
            if work.ready_at <= now and (slot.name not in work.avoid or usable <= work.avoid):
                return work
            self.retry_queue.append(work)
        while not self.manifest_read and len(self.lookahead) < LOOKAHEAD_SHARDS:
            work = next(self.fresh_work, None)
            if work is None:
                self.manifest_read = True
                break
            self.shards_left = max(0, self.shards_left - 1)
            self.fail_unresolved(work)
            if work.rows:
                self.lookahead.append(work)
        if not self.lookahead:
            return None
        work = self.by_affinity(slot)
        self.lookahead.remove(work)
        self.add_copies(work)
        slot.loras.update(work.loras())
        return work

    def by_affinity(self, slot: WorkerSlot) -> ShardWork:
        """Of the next fresh shards, the first whose LoRAs this worker holds most of (it switches
        adapters without loading them); the oldest when no shard uses LoRAs."""
        best, best_score = self.lookahead[0], -1
        if not self.options.affinity:
            return best
        for work in self.lookahead:
            loras = work.loras()
            score = len(loras & slot.loras) - len(loras - slot.loras)
            if score > best_score:
                best, best_score = work, score
        return best

    def fail_unresolved(self, work: ShardWork) -> None:
        """Rows of a fresh shard that could not even be resolved fail now, as row errors."""
        for row_index, row_id, error in work.unresolved:
            row = RenderRow(row_index=row_index, id=str(row_id), prompt="", negative_prompt="", width=0, height=0,
                            steps=0, true_cfg_scale=0.0, seed=0, keys=())
            result = _failed(row, error)
            result.error_kind = ErrorKind.ROW.value
            self.settle(work, row, result)

    def add_copies(self, work: ShardWork) -> None:
        state = self.states[work.shard_index]
        for row in work.rows:
            state.copies[row.row_index] += 1

    def dispatch(self, slot: WorkerSlot, work: ShardWork) -> None:
        stream = slot.actor.render_shard.options(num_returns="streaming").remote(
            work.rows, self.options.batch_size, work.look_first)
        slot.state = BUSY
        self.in_flight[stream] = (slot, work, set())

    def speculate(self, slot: WorkerSlot) -> bool:
        """Nothing left to hand out and a worker idle: give it a copy of the oldest in-flight
        shard's unsettled rows (once per shard). The copy looks at the store first and keeps an
        image of this row stored by the other copy; the first success of each row wins. False
        when no shard is left to copy."""
        for _slot, work, seen in list(self.in_flight.values()):
            if work.shard_index in self.speculated:
                continue
            rows = self.unsettled(work, seen)
            if rows:
                self.speculated.add(work.shard_index)
                self.outcome.speculative += 1
                copy = ShardWork(work.shard_index, rows, work.attempt, look_first=True)
                self.add_copies(copy)
                self.dispatch(slot, copy)
                return True
        return False

    # ------------------------------------------------------------------ workers

    def record_workers(self, *, changed: bool = False) -> None:
        """Keep job.json's worker list current: at once after a quiet spell, else at most every
        RECORD_WORKERS_S (a thousand workers released one by one must not rewrite it a thousand
        times); run_job writes the final list when the job ends."""
        self.workers_changed |= changed
        now = time.monotonic()
        if self.workers_changed and now - self.workers_recorded >= RECORD_WORKERS_S:
            record_workers(self.store, self.plan, self.slots)
            self.workers_changed, self.workers_recorded = False, now

    def on_ready_answer(self, ref) -> None:
        import ray

        slot = self.waiting.pop(ref)
        if slot.state in ENDED:
            return  # released or drained while it started
        try:
            info = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            if slot.state == STARTING:
                self.not_ready(slot, f"the worker process died while starting: {_first_line(exc)}")
            elif isinstance(exc, ray.exceptions.ActorDiedError):  # restarts used up
                slot.state, slot.problem = LOST, _first_line(exc)
            else:  # restarting (after a fatal CUDA error, a node loss): ask again
                time.sleep(0.2)
                self.waiting[slot.actor.ready.remote()] = slot
            return
        except Exception as exc:
            self.not_ready(slot, _first_line(exc))
            return
        slot.info, slot.node_ip = info, info.get("node_ip", "")
        if not info["ready"]:
            self.not_ready(slot, info["problem"])
            return
        slot.state, slot.problem = IDLE, ""
        self.ever_ready = self.pool.any_ready = True

    def not_ready(self, slot: WorkerSlot, problem: str) -> None:
        line = f"{slot.where} is not ready and gets no work: {problem}"
        self.outcome.not_ready.append(line)
        self.options.echo(line)
        self.pool.end(slot, NOT_READY, problem)
        self.record_workers(changed=True)

    def quarantine(self, slot: WorkerSlot, last_error: str) -> None:
        slot.state = QUARANTINED
        slot.problem = f"{slot.worker_errors_in_a_row} worker errors in a row, the last: {last_error}"
        line = f"{slot.where} is quarantined for the rest of the job: {slot.problem}"
        self.outcome.quarantined.append(line)
        self.options.echo(line)
        for stream, (owner, work, seen) in list(self.in_flight.items()):
            if owner is slot:  # its unfinished rows go to other workers, at no cost to their attempts
                del self.in_flight[stream]
                self.requeue(work, self.unsettled_copy_rows(work, seen), consume_attempt=False, avoid=slot)
        self.pool.end(slot, QUARANTINED)
        self.record_workers(changed=True)

    # ------------------------------------------------------------------ the pool: growing, draining, releasing

    def work_units(self) -> int:
        """Shards in flight or waiting for a worker: what the pool sizes itself to."""
        fresh = len(self.lookahead) + (0 if self.manifest_read else self.shards_left)
        return sum(1 for s in self.slots if s.state == BUSY) + len(self.retry_queue) + fresh

    def adjust_pool(self) -> None:
        """Hand back the work of workers whose node started draining, add workers while rows wait
        (nodes that joined get them), release those there is no work for, and show the pool."""
        for slot in self.pool.refresh():
            self.on_draining(slot)
        units, dry = self.work_units(), self.manifest_read and not self.retry_queue and not self.lookahead
        for slot in self.pool.grow(units, queue_dry=dry):
            self.waiting[slot.actor.ready.remote()] = slot
        released = self.pool.shrink(units, queue_dry=dry)
        if released:
            self.record_workers(changed=True)
        self.pool.show()

    def on_draining(self, slot: WorkerSlot) -> None:
        """The worker's node is draining (scale-down, preemption notice): it takes no more work. A busy
        one keeps rendering its shard while a copy of the rows it has not reported goes back to the
        queue, first in line and at no cost to their attempts (the first success wins); it is released
        when its shard ends. Any other is released now, so the node can leave."""
        self.options.echo(f"{slot.where} stops taking work: {slot.problem}; its unfinished rows go back to the "
                          "queue (no attempt counted)")
        if slot.state != BUSY:
            self.pool.end(slot, DRAINED)
            self.record_workers(changed=True)
            return
        slot.state = DRAINING
        for owner, work, seen in list(self.in_flight.values()):
            rows = self.unsettled(work, seen) if owner is slot else []
            if rows:
                self.speculated.add(work.shard_index)  # this copy is its second one
                copy = ShardWork(work.shard_index, rows, work.attempt, look_first=True, avoid=work.avoid | {slot.name})
                self.add_copies(copy)
                self.retry_queue.appendleft(copy)

    def drained(self, slot: WorkerSlot, stream, work: ShardWork, seen: set[int]) -> None:
        """A draining worker's shard ended (finished, or the worker went with its node): its copy of the
        rows ends here, the queued copy carries the rest; the worker is released."""
        del self.in_flight[stream]
        self.unsettled_copy_rows(work, seen)  # its copies end; the rows it never reported are queued already
        state = self.states.get(work.shard_index)
        if state is not None:
            self.settle_tentative(work, state)
        self.pool.end(slot, DRAINED)
        self.record_workers(changed=True)

    def check_workers_left(self) -> None:
        pool = self.pool
        if not self.ever_ready and time.monotonic() - self.started > self.options.ready_timeout_s:
            summary, limit = pool.summary(), f"{self.options.ready_timeout_s:g}"
            if summary["pending"]:
                raise QwenBatchError(
                    f"no worker became ready within {limit} s: {waiting_line(summary)} (no node has room for a worker "
                    f"asking {resources_text(pool.resources)}; let the cluster's autoscaler add such nodes, or raise "
                    "--first-worker-timeout)")
            raise QwenBatchError(f"no worker became ready within {limit} s ({pool_line(summary)}: loading the model "
                                 "took longer; raise --first-worker-timeout)")
        if pool.live() or pool.with_state(DRAINING) or (pool.room() > 0 and self.work_units() > 0):
            return  # working, or the pool adds workers for what is left
        problems = "; ".join(f"{s.where}: {s.state}" + (f" ({s.problem})" if s.problem else "")
                             for s in self.slots if s.state in (NOT_READY, QUARANTINED, LOST))
        if not self.ever_ready:
            raise QwenBatchError(f"no worker is ready, nothing was rendered: {problems}")
        raise QwenBatchError(f"no worker left; stored rows are kept, run the same submit again to resume: {problems}")

    # ------------------------------------------------------------------ results

    def on_stream_item(self, stream) -> None:
        import ray

        slot, work, seen = self.in_flight[stream]
        try:
            results = ray.get(next(stream))
        except StopIteration:  # the shard is finished on this actor
            if slot.state == DRAINING:
                self.drained(slot, stream, work, seen)
                return
            del self.in_flight[stream]
            self.release(slot)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayTaskError) as exc:
            if slot.state == DRAINING:  # whatever ended it (its node left at the deadline): the queued copy has its rows
                self.drained(slot, stream, work, seen)
            else:
                self.on_stream_error(slot, stream, work, seen, exc)
            return
        self.on_results(slot, work, seen, results)

    def on_stream_error(self, slot: WorkerSlot, stream, work: ShardWork, seen: set[int], exc: Exception) -> None:
        import ray

        del self.in_flight[stream]
        if isinstance(exc, ray.exceptions.ActorDiedError):  # gone for good (restarts used up, node lost)
            slot.state = LOST
            slot.problem = _first_line(exc)
            self.requeue(work, self.unsettled_copy_rows(work, seen), error=f"worker lost: {_first_line(exc)}")
        elif isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            # Ray is restarting it: only its unfinished rows go back
            self.requeue(work, self.unsettled_copy_rows(work, seen), error=f"worker lost: {_first_line(exc)}")
            slot.state = RECOVERING
            self.waiting[slot.actor.ready.remote()] = slot
        else:  # the shard call itself raised
            cause = exc.cause if exc.cause is not None else exc
            from qwen_worker.failures import classify, describe

            kind = classify(cause)
            rows = self.unsettled_copy_rows(work, seen)
            if kind is ErrorKind.WORKER:
                slot.worker_errors_in_a_row += 1
                self.requeue(work, rows, consume_attempt=False, avoid=slot)
                self.after_worker_error(slot, describe(cause))
            else:
                self.requeue(work, rows, error=describe(cause))
                self.release(slot)

    def release(self, slot: WorkerSlot) -> None:
        if slot.state == BUSY:
            slot.state = IDLE

    def after_worker_error(self, slot: WorkerSlot, error: str) -> None:
        if slot.worker_errors_in_a_row >= self.options.quarantine_after and slot.state not in (QUARANTINED, LOST):
            self.quarantine(slot, error)
        else:
            self.release(slot)

    def on_results(self, slot: WorkerSlot, work: ShardWork, seen: set[int], results: list[RowResult]) -> None:
        rows = {row.row_index: row for row in work.rows}
        worker_error = None
        for result in results:
            seen.add(result.row_index)
            state = self.states.get(work.shard_index)
            if state is not None:
                state.copies[result.row_index] -= 1
            row = rows[result.row_index]
            if result.status is RowStatus.DONE:
                self.settle(work, row, result)
                slot.worker_errors_in_a_row = 0
            elif slot.state == DRAINING and result.error_kind != ErrorKind.ROW.value:
                continue  # its node is leaving: the copy queued when it started draining carries this row
            elif result.error_kind == ErrorKind.WORKER.value:
                worker_error = result.error
                self.requeue(work, [row], consume_attempt=False, avoid=slot)
            elif result.error_kind == ErrorKind.ROW.value:
                self.fail_when_no_other_copy(work, row, result)
            else:
                self.requeue(work, [row], error=result.error, failed=result)
        if worker_error is not None:
            slot.worker_errors_in_a_row += 1
            if slot.worker_errors_in_a_row >= self.options.quarantine_after:
                self.quarantine(slot, worker_error)
        state = self.states.get(work.shard_index)
        if slot.state == DRAINING and state is not None:
            self.settle_tentative(work, state)  # failures that waited for this copy

    def is_settled(self, shard_index: int, row_index: int) -> bool:
        state = self.states.get(shard_index)
        return state is None or row_index in state.results

    def unsettled(self, work: ShardWork, seen: set[int]) -> list[RenderRow]:
        """Rows of `work` with no result from this copy and none from another (a straggler's)."""
        return [r for r in work.rows if r.row_index not in seen and not self.is_settled(work.shard_index, r.row_index)]

    def unsettled_copy_rows(self, work: ShardWork, seen: set[int]) -> list[RenderRow]:
        """The rows this copy never reported, which it now never will (its copies end here)."""
        state = self.states.get(work.shard_index)
        rows = [r for r in work.rows if r.row_index not in seen]
        if state is not None:
            for row in rows:
                state.copies[row.row_index] -= 1
        return [r for r in rows if not self.is_settled(work.shard_index, r.row_index)]

    def requeue(self, work: ShardWork, rows: list[RenderRow], *, error: str = "", consume_attempt: bool = True,
                failed: RowResult | None = None, avoid: WorkerSlot | None = None) -> None:
        """Give `rows` another copy: at once and at no cost to their attempts after a worker error,
        else after a backoff, while attempts remain (a row out of attempts fails)."""
        rows = [row for row in rows if not self.is_settled(work.shard_index, row.row_index)]
        if not rows:
            return
        if consume_attempt and work.attempt >= self.options.max_attempts:
            for row in rows:
                result = failed if failed is not None and failed.row_index == row.row_index else _failed(row, "")
                result.error = f"gave up after {work.attempt} attempts: {error or result.error}"
                self.fail_when_no_other_copy(work, row, result)
            return
        attempt = work.attempt + 1 if consume_attempt else work.attempt
        delay = self.options.retry_backoff_s * (2 ** (work.attempt - 1)) if consume_attempt else 0.0
        avoided = work.avoid | {avoid.name} if avoid is not None else work.avoid
        retry = ShardWork(work.shard_index, rows, attempt, time.monotonic() + delay, look_first=True, avoid=avoided)
        self.add_copies(retry)
        self.retry_queue.append(retry)

    def fail_when_no_other_copy(self, work: ShardWork, row: RenderRow, result: RowResult) -> None:
        """A failure settles its row only when no other copy of it is queued or in flight."""
        state = self.states.get(work.shard_index)
        if state is None or row.row_index in state.results:
            return
        if state.copies[row.row_index] > 0:
            state.tentative[row.row_index] = (row, result)
            return
        self.settle(work, row, self.confirm_failure(row, result))

    def confirm_failure(self, row: RenderRow, result: RowResult) -> RowResult:
        """A row whose every image is stored with this job's provenance is done, whatever a copy
        reported (its success was lost, or another copy's put won with other bytes)."""
        digests = []
        try:
            for index, key in enumerate(row.keys):
                expected = image_provenance(row, index, model=self.plan.model, manifest_sha256=self.plan.manifest_sha256)
                data = stored_own_image(self.store, key, expected)
                if data is None:
                    return result
                digests.append(sha256_hex(data))
        except Exception:  # cannot look: the failure stands, a resume checks again
            return result
        self.outcome.recovered += 1
        return RowResult(row_index=row.row_index, id=row.id, status=RowStatus.DONE, keys=list(row.keys),
                         sha256=digests, seed=row.seed, rendered=False, worker=result.worker)

    def settle(self, work: ShardWork, row: RenderRow, result: RowResult) -> None:
        if self.is_settled(work.shard_index, result.row_index):
            return  # another copy already settled this row: the first success wins
        result.attempts = work.attempt
        state = self.states[work.shard_index]
        state.tentative.pop(result.row_index, None)
        state.results[result.row_index] = result
        if result.status is RowStatus.DONE:
            self.outcome.done += 1
            self.outcome.rendered += int(result.rendered)
            self.progress.update(done=1)
        else:
            self.outcome.failed += 1
            self.outcome.failed_ids.append(result.id)
            self.progress.update(failed=1)
        self.settle_tentative(work, state)
        if state.complete and work.shard_index in self.states:
            if not self.ledger_written:  # results.parquet no longer merges the whole ledger
                ledger_changes(self.store)
                self.ledger_written = True
            table = write_shard_ledger(self.store, self.plan.job_id, work.shard_index, list(state.results.values()))
            del self.states[work.shard_index]
            self.written.append((work.shard_index, table))
            if len(self.written) >= COMPACT_EVERY:
                self.compact()

    def compact(self) -> None:
        """Merge the shard files written so far into one segment (bookkeeping: never fatal)."""
        try:
            compact(self.store, self.written)
        except Exception:
            pass
        self.written = []

    def settle_tentative(self, work: ShardWork, state: _ShardState) -> None:
        """Failures that were waiting for other copies whose copies have all ended."""
        for row_index, (row, result) in list(state.tentative.items()):
            if state.copies[row_index] <= 0 and row_index not in state.results:
                del state.tentative[row_index]
                self.settle(work, row, self.confirm_failure(row, result))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _failed(row: RenderRow, error: str) -> RowResult:
    return RowResult(
        row_index=row.row_index, id=row.id, status=RowStatus.FAILED, keys=list(row.keys), seed=row.seed,
        rendered=False, error=error, error_kind=ErrorKind.TRANSIENT.value,
    )
