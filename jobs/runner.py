"""The driver: start RenderWorker actors on Ray and feed them shards until every row settles.

Pull scheduling: an idle actor takes the next shard, so slow shapes never stall fast ones. Each
actor streams back the results of every micro-batch; rows whose actor died (or that failed for a
system reason) go back to the queue with backoff, bounded by `max_attempts` per row. A shard's
ledger file is written once all its rows have settled.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Iterator

from jobs.ledger import read_ledger, write_shard_ledger
from jobs.manifest import ResolveContext, iter_raw_rows, open_parquet, resolve_row
from jobs.plan import JobPlan
from jobs.progress import ProgressBar, ProgressFile
from qwen_worker.errors import QwenBatchError, UserError
from qwen_worker.presets import get_preset
from qwen_worker.rows import RenderRow, RowResult, RowStatus
from qwen_worker.stores import Store


@dataclass
class RunOptions:
    workers: int | None = None  # None: one per GPU, or 1 CPU actor when there is no GPU
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

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 and self.done == self.total else 3


@dataclass
class ShardWork:
    shard_index: int
    rows: list[RenderRow]
    attempt: int = 1
    ready_at: float = 0.0


class _ShardState:
    """Results of one shard so far; complete when every row has a final result."""

    def __init__(self, expected: set[int], results: dict[int, RowResult]):
        self.expected = expected
        self.results = results

    @property
    def complete(self) -> bool:
        return self.expected.issubset(self.results)


def connect_ray(address: str | None = None) -> bool:
    """Connect to Ray: an existing cluster (`address`), the one this process already joined, or a new
    local single-node instance. Returns True when this call started Ray (so it should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    else:
        ray.init(logging_level="WARNING", include_dashboard=True, dashboard_host="127.0.0.1")
    return True


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def worker_pool(preset, gpus: int, *, workers: int | None, device: str = "auto") -> tuple[int, dict]:
    """How many RenderWorker actors to start and what each asks Ray for: one GPU each (capped by
    --workers) plus the host RAM the preset needs, or --workers CPU actors (default 1)."""
    use_gpus = preset.needs_cuda and device != "cpu"
    if use_gpus and gpus == 0:
        raise UserError(
            f"model {preset.name!r} needs GPUs and this Ray cluster has none "
            "(point --address at a GPU cluster, use --device cpu to render on CPUs very slowly, "
            "or --model tiny to try the pipeline)"
        )
    count = min(workers or gpus, gpus) if use_gpus else (workers or 1)
    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpus else {"num_cpus": 1}
    if preset.host_memory_gb >= 4:
        resources["memory"] = int(preset.host_memory_gb * 1024**3)
    return count, resources


def start_workers(plan: JobPlan, options: RunOptions, store: Store) -> list:
    """One RenderWorker actor per GPU (capped by --workers), or --workers CPU actors (default 1)."""
    import ray

    from qwen_worker.actor import RenderWorker

    count, resources = worker_pool(get_preset(plan.model), cluster_gpus(), workers=options.workers, device=options.device)
    remote_class = ray.remote(RenderWorker)
    actors = []
    for n in range(count):
        name = f"qwen-worker-{plan.job_id}-{n}"
        actors.append(
            remote_class.options(name=name, max_restarts=3, max_task_retries=0, **resources).remote(
                model=plan.model,
                output_uri=plan.output,
                overwrite=options.overwrite,
                model_dir=options.model_dir,
                offload=options.offload,
                name=name,
                manifest_sha256=plan.manifest_sha256,
                existing="replace" if options.overwrite else plan.options.get("existing", "ours"),
                store_options=store.worker_options(),
                job_id=plan.job_id,
                device=options.device,
                images_per_call=options.batch_size or 4,  # the offload plan is sized for this
                check_stored=not options.new_output,
            )
        )
    return actors


def record_workers(store: Store, plan: JobPlan, actors: list, timeout_s: float = 5.0) -> None:
    """Add each live worker's name, model load time and offload plan to job.json (plans differ per
    machine: free VRAM and host RAM decide them)."""
    import ray

    from jobs.plan import JOB_RECORD_KEY

    refs = [actor.ping.remote() for actor in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    workers = []
    for ref in ready:
        try:
            info = ray.get(ref)
        except Exception:  # a dead worker has nothing to report
            continue
        workers.append({"name": info["name"], "load_s": round(info["load_s"], 2), "offload_plan": info["offload_plan"]})
    plan.options["workers"] = sorted(workers, key=lambda w: w["name"])
    try:
        store.put(JOB_RECORD_KEY, plan.to_json())
    except Exception:  # bookkeeping only: never turn a finished job into a failure
        pass


def plan_work(plan: JobPlan, context: ResolveContext, ledger: dict[int, RowResult], states: dict) -> Iterator[ShardWork]:
    """Shards with their rows not yet done, streaming the manifest once."""
    shard_rows: list[RenderRow] = []
    current = 0

    def flush(shard_index: int, rows: list[RenderRow]):
        start, stop = plan.shard_range(shard_index)
        if not rows:  # every row of the shard is done: its ledger file is already written
            return None
        known = {i: ledger[i] for i in range(start, stop) if i in ledger and ledger[i].status is RowStatus.DONE}
        states[shard_index] = _ShardState(set(range(start, stop)), known)
        return ShardWork(shard_index, rows)

    parquet_file = open_parquet(plan.manifest)
    for index, raw in iter_raw_rows(parquet_file):
        shard_index = plan.shard_of_row(index)
        if shard_index != current:
            work = flush(current, shard_rows)
            if work:
                yield work
            current, shard_rows = shard_index, []
        done = index in ledger and ledger[index].status is RowStatus.DONE
        if not done:
            shard_rows.append(resolve_row(index, raw, context))
    work = flush(current, shard_rows)
    if work:
        yield work


def run_job(plan: JobPlan, store: Store, options: RunOptions, *, address: str | None = None) -> JobOutcome:
    """Render every row of `plan` not yet done; return counts once every row has settled."""
    import ray

    ledger = read_ledger(store, plan.job_id)
    already_done = sum(1 for r in ledger.values() if r.status is RowStatus.DONE)
    context = ResolveContext(preset=get_preset(plan.model), job_seed=plan.seed, template_dirs=options.template_dirs)
    progress = ProgressBar(plan.rows, already_done=already_done, enabled=options.show_progress)
    outcome = JobOutcome(plan.job_id, plan.output, plan.rows, already_done, 0, 0, already_done)
    if already_done == plan.rows:
        progress.close()
        return outcome

    owns_ray = connect_ray(address)
    progress_file = ProgressFile(store, plan.job_id, progress)
    actors: list = []
    state = "failed"
    try:
        actors = start_workers(plan, options, store)
        progress_file.write(force=True)
        from qwen_worker.metrics import DriverMetrics

        metrics = DriverMetrics(plan.job_id)
        if already_done:
            metrics.skipped.inc(already_done, metrics.tags)
        _drive(plan, store, options, actors, plan_work(plan, context, ledger, states := {}), states, progress, outcome,
               progress_file, metrics)
        state = "finished"
    finally:
        if actors:
            progress_file.write(state, force=True)
            record_workers(store, plan, actors)
        for actor in actors:
            ray.kill(actor)
        if owns_ray:
            ray.shutdown()
    progress.close()
    return outcome


def _drive(plan, store, options, actors, fresh_work, states, progress, outcome, progress_file, metrics) -> None:
    import ray

    retry_queue: collections.deque[ShardWork] = collections.deque()
    idle = list(actors)
    in_flight: dict = {}  # generator -> (actor, ShardWork, settled row indices)
    speculated: set[int] = set()  # shards also handed to a second worker (stragglers)

    manifest_read = False  # every shard of the manifest has been handed out once

    def next_work() -> ShardWork | None:
        nonlocal manifest_read
        now = time.monotonic()
        for _ in range(len(retry_queue)):
            work = retry_queue.popleft()
            if work.ready_at <= now:
                return work
            retry_queue.append(work)
        work = next(fresh_work, None)
        manifest_read = work is None
        return work

    def is_settled(shard_index: int, row_index: int) -> bool:
        state = states.get(shard_index)
        return state is None or row_index in state.results

    def settle(work: ShardWork, result: RowResult) -> None:
        if is_settled(work.shard_index, result.row_index):
            return  # a straggler's copy already settled this row: the first result wins
        result.attempts = work.attempt
        state = states[work.shard_index]
        state.results[result.row_index] = result
        if result.status is RowStatus.DONE:
            outcome.done += 1
            outcome.rendered += int(result.rendered)
            progress.update(done=1)
        else:
            outcome.failed += 1
            outcome.failed_ids.append(result.id)
            progress.update(failed=1)
        if state.complete:
            write_shard_ledger(store, plan.job_id, work.shard_index, list(state.results.values()))
            del states[work.shard_index]

    def retry_or_fail(work: ShardWork, rows: list[RenderRow], error: str) -> None:
        rows = [row for row in rows if not is_settled(work.shard_index, row.row_index)]
        if not rows:
            return
        if work.attempt >= options.max_attempts:
            for row in rows:
                settle(work, _failed(row, f"gave up after {work.attempt} attempts: {error}"))
            return
        delay = options.retry_backoff_s * (2 ** (work.attempt - 1))
        retry_queue.append(ShardWork(work.shard_index, rows, work.attempt + 1, time.monotonic() + delay))

    def dispatch(actor, work: ShardWork) -> None:
        generator = actor.render_shard.options(num_returns="streaming").remote(work.rows, options.batch_size)
        in_flight[generator] = (actor, work, set())

    def unsettled(work: ShardWork, seen: set[int]) -> list[RenderRow]:
        """Rows of `work` with no result from this copy and none from another (a straggler's)."""
        return [r for r in work.rows if r.row_index not in seen and not is_settled(work.shard_index, r.row_index)]

    def speculate() -> bool:
        """Nothing left to hand out and a worker idle: give it a copy of the oldest in-flight shard's
        unsettled rows (once per shard). Rendering is deterministic and puts are conditional, so
        both copies write the same bytes once; the first result of each row wins."""
        for _actor, work, seen in list(in_flight.values()):
            rows = unsettled(work, seen)
            if work.shard_index not in speculated and rows:
                speculated.add(work.shard_index)
                outcome.speculative += 1
                dispatch(idle.pop(), ShardWork(work.shard_index, rows, work.attempt))
                return True
        return False

    recovering: dict = {}  # ping -> actor: a restarted actor gets work again once it answers

    def recover(actor) -> None:
        recovering[actor.ping.remote()] = actor

    def check_workers_left() -> None:
        if not idle and not in_flight and not recovering:
            raise QwenBatchError("every worker died; stored rows are kept, run the same submit again to resume")

    while True:
        while idle and (work := next_work()) is not None:
            dispatch(idle.pop(), work)
        while idle and not retry_queue and options.speculate and speculate():
            pass
        metrics.in_flight.set(sum(len(w.rows) - len(seen) for _a, w, seen in in_flight.values()), metrics.tags)
        progress_file.write()
        if manifest_read and not states and not retry_queue:
            break  # every row has settled (a straggler's slower copy may still be running: it is killed)
        if not in_flight and not recovering:
            if not retry_queue:
                break  # every row has settled
            time.sleep(0.05)  # what is left is waiting out its backoff
            continue
        ready, _ = ray.wait(list(in_flight) + list(recovering), num_returns=1, timeout=1.0)
        for ref in ready:
            if ref in recovering:
                actor = recovering.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except ray.exceptions.ActorDiedError:
                    check_workers_left()
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    time.sleep(0.2)  # still restarting
                    recover(actor)
                continue
            generator = ref
            actor, work, seen = in_flight[generator]
            try:
                results = ray.get(next(generator))
            except StopIteration:  # the shard is finished on this actor
                del in_flight[generator]
                idle.append(actor)
                continue
            except ray.exceptions.ActorDiedError as exc:  # gone for good (restarts used up)
                del in_flight[generator]
                retry_or_fail(work, unsettled(work, seen), f"worker lost: {_first_line(exc)}")
                check_workers_left()
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                del in_flight[generator]  # Ray is restarting it: only its unsettled rows go back
                retry_or_fail(work, unsettled(work, seen), f"worker lost: {_first_line(exc)}")
                recover(actor)
                continue
            except ray.exceptions.RayTaskError as exc:  # the shard call itself raised
                del in_flight[generator]
                retry_or_fail(work, unsettled(work, seen), _first_line(exc.cause or exc))
                idle.append(actor)
                continue
            retry_rows = []
            for result in results:
                seen.add(result.row_index)
                if result.status is RowStatus.FAILED and not result.user_error and work.attempt < options.max_attempts:
                    retry_rows.append(next(r for r in work.rows if r.row_index == result.row_index))
                else:
                    settle(work, result)
            if retry_rows:
                retry_or_fail(work, retry_rows, "row failed")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _failed(row: RenderRow, error: str) -> RowResult:
    return RowResult(
        row_index=row.row_index, id=row.id, status=RowStatus.FAILED, keys=list(row.keys), seed=row.seed,
        rendered=False, error=error,
    )
