"""The worker pool of one job: RenderWorker actors, their readiness, who may get work, and how many
there are as nodes come and go.

A worker gets work only after its `ready()` check, run on its own node, says it can: model
loaded, output usable from there. A worker that fails it gets none (one line for the user, and an
entry in job.json); a ready worker with `quarantine_after` worker errors in a row is quarantined
for the rest of the job, like Spark's excludeOnFailure.

The pool is elastic, like Ray Data's autoscaling actor pools (min_size/max_size):

- Demand: it asks Ray for as many workers as there is work for, up to `--workers` MAX, at once.
  Those Ray cannot place stay pending; pending actors are the resource demand Ray's autoscaler
  (cluster launcher, KubeRay) scales up for, and Ray places each on a node as the node joins. A
  pending actor's demand ends with the driver, unlike `ray.autoscaler.sdk.request_resources`, whose
  request stays until overridden: a crashed driver would keep the cluster scaled up.
- Nodes leaving: every second the pool reads, from Ray's GCS, where each worker runs and which
  nodes are draining (autoscaler scale-down, `ray drain-node`, a spot preemption notice, a
  `ray start` node's SIGTERM). A worker on a draining node stops taking work; the driver hands
  its unfinished rows to other workers at no cost to their attempts and releases it, so its node
  can leave. A worker whose node vanishes is a lost worker (Ray restarts it elsewhere).
- Releasing: when the queue runs dry, idle and not yet placed workers are released, so the
  autoscaler can remove their nodes before the job's last shards finish; a worker that left this
  way, or with its node, is replaced while rows remain.
- Refused workers (not ready, quarantined) and lost ones (Ray's restarts used up) count against
  MAX. A refused worker's node gets no other worker of the job (new workers ask Ray, through the
  `ray.io/node-id` label, for any other node). Until some worker has been ready a refused worker
  is not replaced at all: the cause may be the job's (model files, the output), not the node's,
  and a job whose every worker is refused stops at once with their reasons.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from qwen_worker.errors import UserError

# worker states
STARTING, IDLE, BUSY, NOT_READY, QUARANTINED, LOST, RECOVERING = (
    "starting", "idle", "busy", "not ready", "quarantined", "lost", "recovering")  # fmt: skip
DRAINING = "draining"  # its node is draining: it finishes its shard (a copy is queued too), gets no more
DRAINED = "drained"  # left with its node (drained); replaced while rows remain
RELEASED = "released"  # given back when there was no more work for it
LIVE = (STARTING, IDLE, BUSY, RECOVERING)  # may still take work
SPENT = (NOT_READY, QUARANTINED, LOST)  # count against MAX: never replaced
ENDED = SPENT + (DRAINED, RELEASED)

AUTO_MAX_WORKERS = 64  # `--workers auto` on a cluster: up to this many, never more than the job's shards
REFRESH_S = 1.0  # how often the pool reads placement and draining nodes from Ray
PENDING_AFTER_S = 3.0  # a worker Ray has not placed for this long waits for resources (before: starting)


# ---------------------------------------------------------------------------------------------------
# --workers: N, MIN-MAX or auto
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolSize:
    """`--workers`: up to `max_workers` workers; rendering starts once `min_ready` are ready (0 and 1
    both mean: with the first ready worker)."""

    min_ready: int
    max_workers: int
    text: str  # as the CLI takes it back (a cluster job's entrypoint)
    exact: bool = False  # N: all N are asked for while work is queued, even beyond the job's shards

    def __str__(self) -> str:
        return self.text


AUTO = PoolSize(0, AUTO_MAX_WORKERS, "auto")
WORKERS_RULE = "must be a number of workers (4), a range MIN-MAX (0-16) or auto"


def parse_workers(value) -> PoolSize | None:
    """`--workers` from the CLI, a schedule or Python: N (exactly N workers, rendering with the first
    ready one), MIN-MAX (up to MAX, rendering once MIN are ready) or auto. UserError otherwise."""
    if value is None or isinstance(value, PoolSize):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"`--workers` {WORKERS_RULE}, got: {value!r}")
    text = str(value).strip().lower()
    if text == "auto":
        return AUTO
    match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
    if match is None:
        raise UserError(f"`--workers` {WORKERS_RULE}, got: {value!r}")
    low, high = int(match.group(1)), match.group(2)
    if high is None:
        if low < 1:
            raise UserError(f"`--workers` must be at least 1, got: {value!r}")
        return PoolSize(1, low, str(low), exact=True)
    high = int(high)
    if high < 1:
        raise UserError(f"`--workers` MAX must be at least 1, got: {value!r}")
    if low > high:
        raise UserError(f"`--workers` MIN must not exceed MAX, got: {value!r}")
    return PoolSize(low, high, f"{low}-{high}")


def resolve_pool_size(workers: PoolSize | None, preset, *, gpus: int, cluster: bool, device: str = "auto") -> PoolSize:
    """The pool size a job runs with. On a cluster `--workers` stands as given (auto by default): the
    autoscaler may add the nodes, even to a cluster that has no GPU yet. In local mode (one machine,
    nothing to add) the default is one worker per GPU present, or 1 CPU worker, and GPU workers never
    outnumber the GPUs."""
    uses_gpus = "num_gpus" in worker_resources(preset, device)
    if uses_gpus and gpus == 0 and not cluster:
        raise UserError(
            f"model {preset.name!r} needs GPUs and this Ray cluster has none "
            "(point --address at a GPU cluster, use --device cpu to render on CPUs very slowly, "
            "or --model tiny to try the pipeline)"
        )
    if cluster:
        return workers or AUTO
    if workers is None or workers is AUTO:
        count = gpus if uses_gpus else 1
        return PoolSize(1, count, str(count), exact=True)
    if uses_gpus and workers.max_workers > gpus:
        return PoolSize(min(workers.min_ready, gpus), gpus, f"{min(workers.min_ready, gpus)}-{gpus}", exact=workers.exact)
    return workers


def worker_resources(preset, device: str = "auto") -> dict:
    """What one RenderWorker asks Ray for: one GPU (GPU presets) or one CPU (the tiny model, --device
    cpu), plus the host RAM the preset needs."""
    use_gpus = preset.needs_cuda and device != "cpu"
    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpus else {"num_cpus": 1}
    if preset.host_memory_gb >= 4:
        resources["memory"] = int(preset.host_memory_gb * 1024**3)
    return resources


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


# ---------------------------------------------------------------------------------------------------
# one worker
# ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class WorkerSlot:
    actor: object
    name: str
    state: str = STARTING
    node_ip: str = ""
    problem: str = ""
    worker_errors_in_a_row: int = 0
    info: dict = field(default_factory=dict)
    node_id: str = ""  # the Ray node it was placed on ("" while pending)
    placed: bool = False  # Ray gave it a node (its process starts there); False: waiting for resources
    asked_at: float = field(default_factory=time.monotonic)
    loras: set = field(default_factory=set)  # LoRA files of the shards it was given (it keeps them loaded)

    def record(self) -> dict:
        """What job.json says of this worker."""
        record = {"name": self.name, "state": self.state, "node_ip": self.node_ip, "node_id": self.node_id}
        if self.problem:
            record["problem"] = self.problem
        if self.info:
            record["load_s"] = round(self.info.get("load_s", 0.0), 2)
            record["offload_plan"] = self.info.get("offload_plan")
        return record

    @property
    def where(self) -> str:
        return f"worker {self.name}" + (f" on node {self.node_ip}" if self.node_ip else "")


# ---------------------------------------------------------------------------------------------------
# the pool
# ---------------------------------------------------------------------------------------------------
class WorkerPool:
    """The job's worker slots, and when to add and release workers (see the module docstring). The
    driver owns dispatch; the pool owns how many workers there are and where they run."""

    def __init__(self, plan, options, store, size: PoolSize, resources: dict, *, echo=lambda _text: None):
        self.plan, self.options, self.store = plan, options, store
        self.size, self.resources, self.echo = size, resources, echo
        self.slots: list[WorkerSlot] = []
        self.placement_known = True  # False when Ray's GCS tables could not be read (pending == starting)
        self.any_ready = False  # some worker of this job has passed its readiness check
        self._count = 0
        self._refreshed = 0.0
        self._gate_open = False
        self._shown = ""  # the last pool line echoed
        self._shown_at = 0.0
        self._shown_key: tuple | None = None  # (pending, draining) when it was echoed

    # ------------------------------------------------------------------ counts

    def with_state(self, *states: str) -> list[WorkerSlot]:
        return [slot for slot in self.slots if slot.state in states]

    def live(self) -> int:
        return len(self.with_state(*LIVE))

    def room(self) -> int:
        """Workers the pool may still add."""
        if self.with_state(NOT_READY, QUARANTINED) and not self.any_ready:
            return 0  # refused before any worker was ready: maybe the job's fault, not the node's
        return self.size.max_workers - len(self.with_state(*SPENT)) - self.live()

    def refused_nodes(self) -> list[str]:
        return sorted({s.node_id for s in self.with_state(NOT_READY, QUARANTINED) if s.node_id})

    def wanted(self, work_units: int, *, queue_dry: bool = False) -> int:
        """Live workers worth having for `work_units` shards in flight or waiting (never above MAX; with
        `--workers N`, all N while work is queued)."""
        most = self.size.max_workers - len(self.with_state(*SPENT))
        return max(0, most if self.size.exact and not queue_dry else min(most, work_units))

    # ------------------------------------------------------------------ growing and shrinking

    def add(self, count: int) -> list[WorkerSlot]:
        """Ask Ray for `count` more workers, spread over the nodes; those it cannot place wait for
        resources (the autoscaler's demand). They load their model and check their store as they start."""
        import ray

        from qwen_worker.actor import RenderWorker

        remote_class = ray.remote(RenderWorker)
        refused = self.refused_nodes()
        placement = {"label_selector": {"ray.io/node-id": f"!in({','.join(refused)})"}} if refused else {}
        added = []
        for _ in range(max(0, count)):
            name = f"qwen-worker-{self.plan.job_id}-{self._count}"
            self._count += 1
            actor = remote_class.options(
                name=name, max_restarts=3, max_task_retries=0, scheduling_strategy="SPREAD", **placement,
                **self.resources,
            ).remote(
                model=self.plan.model,
                output_uri=self.plan.output,
                overwrite=self.options.overwrite,
                model_dir=self.options.model_dir,
                offload=self.options.offload,
                name=name,
                manifest_sha256=self.plan.manifest_sha256,
                existing="replace" if self.options.overwrite else self.plan.options.get("existing", "ours"),
                store_options=self.store.worker_options(),
                job_id=self.plan.job_id,
                device=self.options.device,
                images_per_call=self.options.batch_size or 4,  # the offload plan is sized for this
                check_stored=not self.options.new_output,
                png_compression=self.options.png_compression,
                text_check=self.options.text_check,
            )
            added.append(WorkerSlot(actor, name))
        self.slots.extend(added)
        self._refreshed = 0.0  # read their placement soon
        return added

    def grow(self, work_units: int, *, queue_dry: bool = False) -> list[WorkerSlot]:
        """Add workers up to what `work_units` can use (a node that joins gets one while rows remain)."""
        if work_units <= 0:
            return []
        return self.add(min(self.wanted(work_units, queue_dry=queue_dry) - self.live(), self.room()))

    def shrink(self, work_units: int, *, queue_dry: bool) -> list[WorkerSlot]:
        """Release workers beyond what `work_units` can use: not yet placed ones first, then starting
        ones, then (only when the queue is dry) idle ones. Busy workers are never released."""
        surplus = self.live() - self.wanted(work_units, queue_dry=queue_dry)
        if surplus <= 0:
            return []
        waiting = [s for s in self.with_state(STARTING, RECOVERING)]
        candidates = [s for s in waiting if not s.placed] + [s for s in waiting if s.placed]
        if queue_dry:
            candidates += self.with_state(IDLE)
        released = candidates[:surplus]
        for slot in released:
            self.end(slot, RELEASED)
        return released

    def end(self, slot: WorkerSlot, state: str, problem: str = "") -> None:
        """Stop a worker for good (Ray does not restart it) and keep why."""
        import ray

        if state in (NOT_READY, QUARANTINED) and not slot.node_id:
            self._read_ray()  # learn its node, so that no other worker goes there
        slot.state = state
        if problem:
            slot.problem = problem
        if not ray.is_initialized():
            return  # nothing of Ray's to stop (and never start Ray just for this)
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass

    def stop_all(self, *, wait_s: float = 10.0) -> None:
        """The job is over: stop every worker still running (a straggler's slower copy included) and wait
        until Ray reports them dead, so no worker still writes into the output once the driver returns."""
        import ray

        running = [slot for slot in self.slots if slot.state not in ENDED]
        for slot in running:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        ids = {slot.actor._actor_id.hex() for slot in running}
        deadline = time.monotonic() + wait_s
        while ids and time.monotonic() < deadline:
            placement, _draining = _ray_tables()
            if placement is None:
                return
            ids = {actor_id for actor_id in ids if placement.get(actor_id, ("DEAD",))[0] != "DEAD"}
            if ids:
                time.sleep(0.05)

    # ------------------------------------------------------------------ what Ray says

    def refresh(self, *, force: bool = False) -> list[WorkerSlot]:
        """Read (at most every REFRESH_S) where each worker runs and which nodes are draining; return
        the live workers whose node has just started draining."""
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_S:
            return []
        self._refreshed = now
        draining = self._read_ray()
        leaving = []
        for slot in self.slots:
            if slot.state not in ENDED and slot.placed and slot.node_id in draining and slot.state != DRAINING:
                deadline_ms = draining[slot.node_id]
                slot.problem = "its node is draining" + (
                    f" (it must be gone within {max(0.0, deadline_ms / 1000 - time.time()):.0f} s)" if deadline_ms else "")
                leaving.append(slot)
        return leaving

    def _read_ray(self) -> dict:
        """Update where each worker runs; return {draining node id: deadline in ms since the epoch, 0: none}."""
        placement, draining = _ray_tables()
        self.placement_known = placement is not None
        for slot in self.slots if placement is not None else ():
            if slot.state in ENDED:
                continue
            state, pid, node_id = placement.get(slot.actor._actor_id.hex(), ("", 0, ""))
            slot.placed = state == "ALIVE" or (state == "PENDING_CREATION" and pid != 0)
            if slot.placed and node_id:
                slot.node_id = node_id
        return draining

    # ------------------------------------------------------------------ the start gate

    def gate_open(self, waited_s: float, limit_s: float) -> bool:
        """Rendering starts once MIN workers are ready, or as soon as one is and no other can still
        come (or the first-worker time limit passed)."""
        if self._gate_open:
            return True
        ready = len(self.with_state(IDLE, BUSY))
        coming = len(self.with_state(STARTING, RECOVERING))
        if ready and (ready >= self.size.min_ready or not coming or waited_s > limit_s):
            self._gate_open = True
            if ready < self.size.min_ready:
                self.echo(f"rendering with {ready} ready worker(s): --workers {self.size} asked for "
                          f"{self.size.min_ready} before starting ({pool_line(self.summary())})")
        return self._gate_open

    # ------------------------------------------------------------------ reporting

    def summary(self) -> dict:
        """Workers ready / starting / waiting for resources, for _progress.json and `status`."""
        coming = self.with_state(STARTING, RECOVERING)
        now = time.monotonic()
        pending = [s for s in coming if not s.placed and now - s.asked_at >= PENDING_AFTER_S] if self.placement_known else []
        unit = "GPU" if self.resources.get("num_gpus") else "CPU"
        return {
            "ready": len(self.with_state(IDLE, BUSY)),
            "busy": len(self.with_state(BUSY)),
            "starting": len(coming) - len(pending),
            "pending": len(pending),
            "draining": len(self.with_state(DRAINING)),
            "ended": len(self.with_state(*ENDED)),
            "min": self.size.min_ready,
            "max": self.size.max_workers,
            "unit": unit,
            "per_worker": self.resources.get("num_gpus" if unit == "GPU" else "num_cpus", 1),
        }

    def show(self) -> None:
        """Echo the pool line when the number of workers waiting for resources or draining changed (at
        most every 10 s, at once when the wait starts), so a wait for nodes is never silent."""
        summary = self.summary()
        if not summary["pending"] and not summary["draining"] and not self._shown:
            return
        now = time.monotonic()
        key = (summary["pending"], summary["draining"])
        if key == self._shown_key or (self._shown and now - self._shown_at < 10.0):
            return
        self._shown, self._shown_at, self._shown_key = pool_line(summary), now, key
        self.echo(f"workers: {self._shown}")


def pool_line(summary: dict) -> str:
    """'2 ready (1 busy), 1 starting, waiting for 4 GPUs from the autoscaler, 1 draining'."""
    parts = [f"{summary['ready']} ready" + (f" ({summary['busy']} busy)" if summary.get("busy") else "")]
    if summary.get("starting"):
        parts.append(f"{summary['starting']} starting")
    if summary.get("pending"):
        parts.append(waiting_line(summary))
    if summary.get("draining"):
        parts.append(f"{summary['draining']} draining")
    return ", ".join(parts)


def waiting_line(summary: dict) -> str:
    """'waiting for 4 GPUs from the autoscaler' (the workers Ray has no room for yet)."""
    amount = summary["pending"] * summary.get("per_worker", 1)
    return f"waiting for {amount:g} {summary['unit']}" + ("s" if amount != 1 else "") + " from the autoscaler"


def resources_text(resources: dict) -> str:
    """'1 GPU, 1 CPU and 48 GiB of memory': what one worker asks Ray for."""
    parts = [f"{resources[key]:g} {name}" for key, name in (("num_gpus", "GPU"), ("num_cpus", "CPU")) if key in resources]
    if "memory" in resources:
        parts.append(f"{resources['memory'] / 1024**3:g} GiB of memory")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _ray_tables() -> tuple[dict | None, dict]:
    """({actor id: (state, pid, node id)} of this driver's actors, {draining node id: deadline ms}),
    from Ray's GCS (what Ray Train and Serve read for draining nodes); (None, {}) when unreadable."""
    try:
        import ray
        from ray._private.state import state

        if not ray.is_initialized():
            return None, {}
        job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        table = state.actor_table(None, job_id=job_id)
        placement = {actor_id: (info["State"], info["Pid"], info["Address"]["NodeID"]) for actor_id, info in table.items()}
        draining = dict(state.get_draining_nodes())
    except Exception:
        return None, {}
    return placement, draining


def record_workers(store, plan, slots: list[WorkerSlot]) -> None:
    """Write each worker's state (ready, not ready and why, quarantined, drained), node, load time and
    offload plan into job.json, unless the output was claimed by a newer job meanwhile. Workers that
    never got a node (released while waiting for resources) are left out."""
    from jobs.plan import update_job_record

    records = (slot.record() for slot in slots if slot.node_id or slot.node_ip or slot.state not in ENDED)
    plan.options["workers"] = sorted(records, key=lambda w: w["name"])
    try:
        update_job_record(store, plan)
    except Exception:  # bookkeeping only: never turn a finished job into a failure
        pass


def start_pool(plan, options, store, *, cluster: bool, work_units: int) -> WorkerPool:
    """The job's pool with its first workers asked for: as many as `work_units` shards can use, up to
    `--workers` MAX (on a cluster; one per GPU, or 1 CPU worker, on one machine)."""
    from qwen_worker.presets import get_preset

    preset = get_preset(plan.model)
    size = resolve_pool_size(parse_workers(options.workers), preset, gpus=cluster_gpus(), cluster=cluster,
                             device=options.device)
    pool = WorkerPool(plan, options, store, size, worker_resources(preset, options.device), echo=options.echo)
    pool.grow(work_units)
    return pool
