"""The worker pool of one job: RenderWorker actors, their readiness, and who may get work.

A worker gets work only after its `ready()` check, run on its own node, says it can: model
loaded, output usable from there. A worker that fails it gets none (one line for the user, and an
entry in job.json); a ready worker with `quarantine_after` worker errors in a row is quarantined
for the rest of the job, like Spark's excludeOnFailure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_worker.errors import UserError

# worker states
STARTING, IDLE, BUSY, NOT_READY, QUARANTINED, LOST, RECOVERING = (
    "starting", "idle", "busy", "not ready", "quarantined", "lost", "recovering")  # fmt: skip


@dataclass(eq=False)
class WorkerSlot:
    actor: object
    name: str
    state: str = STARTING
    node_ip: str = ""
    problem: str = ""
    worker_errors_in_a_row: int = 0
    info: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What job.json says of this worker."""
        record = {"name": self.name, "state": self.state, "node_ip": self.node_ip}
        if self.problem:
            record["problem"] = self.problem
        if self.info:
            record["load_s"] = round(self.info.get("load_s", 0.0), 2)
            record["offload_plan"] = self.info.get("offload_plan")
        return record

    @property
    def where(self) -> str:
        return f"worker {self.name}" + (f" on node {self.node_ip}" if self.node_ip else "")


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


def start_workers(plan, options, store) -> list[WorkerSlot]:
    """One RenderWorker actor per GPU (capped by --workers), or --workers CPU actors (default 1),
    spread over the cluster's nodes. They load their model and check their store as they start."""
    import ray

    from qwen_worker.actor import RenderWorker
    from qwen_worker.presets import get_preset

    count, resources = worker_pool(get_preset(plan.model), cluster_gpus(), workers=options.workers, device=options.device)
    remote_class = ray.remote(RenderWorker)
    slots = []
    for n in range(count):
        name = f"qwen-worker-{plan.job_id}-{n}"
        actor = remote_class.options(
            name=name, max_restarts=3, max_task_retries=0, scheduling_strategy="SPREAD", **resources
        ).remote(
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
        slots.append(WorkerSlot(actor, name))
    return slots


def record_workers(store, plan, slots: list[WorkerSlot]) -> None:
    """Write each worker's state (ready, not ready and why, quarantined), node, load time and
    offload plan into job.json, unless the output was claimed by a newer job meanwhile."""
    from jobs.plan import update_job_record

    plan.options["workers"] = sorted((slot.record() for slot in slots), key=lambda w: w["name"])
    try:
        update_job_record(store, plan)
    except Exception:  # bookkeeping only: never turn a finished job into a failure
        pass
