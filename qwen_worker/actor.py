"""RenderWorker: loads the pipeline once, proves it can work from its node, then renders shards and
stores every image exactly once.

A plain class; the driver turns it into a Ray actor (`ray.remote(RenderWorker)`), one per GPU.
The constructor never raises: what went wrong (the store cannot be opened, the model did not load)
is kept and reported by `ready()`, so the driver can tell the user which worker on which node lacks
what, and give that worker no work. `render_shard` is a generator: it yields the results of each
micro-batch as soon as its images are stored, so the driver can show progress row by row and keep
what finished if the actor dies.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Iterator

from qwen_worker.encode import content_type, encode_image
from qwen_worker.errors import ObjectExistsError, StoreAccessError, WorkerError
from qwen_worker.failures import ErrorKind, classify, describe, is_fatal_cuda_error
from qwen_worker.presets import get_preset
from qwen_worker.provenance import image_provenance, stored_own_image
from qwen_worker.render import ImageTask, micro_batches, render_splitting_on_oom
from qwen_worker.rows import RenderRow, RowResult, RowStatus
from qwen_worker.stores import open_store, sha256_hex


class RenderWorker:
    def __init__(
        self,
        *,
        model: str,
        output_uri: str,
        overwrite: bool = False,
        model_dir: str | None = None,
        offload: str = "auto",
        name: str = "",
        manifest_sha256: str = "",
        existing: str = "ours",
        store_options: dict | None = None,
        job_id: str = "",
        device: str = "auto",
        images_per_call: int = 4,
        check_stored: bool = True,
    ):
        """`existing` says what to do with an image already stored at a row's key: "ours" keeps it
        when its embedded provenance is this row's (a crash came before the ledger, or another copy
        of the row was first), "any" keeps whatever is there (--resume-anyway), "replace" renders
        again (--overwrite). `check_stored=False` (a job new to its output) skips the look-up
        before rendering: nothing of this job can be there yet, and a conflict is still checked."""
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.node_ip = _node_ip()
        self.manifest_sha256 = manifest_sha256
        self.existing = existing
        self.check_stored = check_stored or existing == "any"
        self._retries_reported = 0
        self.load_s = 0.0
        self.pipe = None
        self.problem: str | None = None  # why this worker cannot work (reported by ready())
        self.fits: dict[tuple, int] = {}  # shape key -> images per call that fit after an out-of-memory split
        self.preset = get_preset(model)
        from qwen_worker.metrics import WorkerMetrics

        self.metrics = WorkerMetrics(job_id, self.name)
        try:
            self.store = open_store(output_uri, overwrite=overwrite or existing == "replace", **(store_options or {}))
        except Exception as exc:
            self.store, self.problem = None, f"cannot open the output {output_uri}: {describe(exc)}"
            return
        started = time.perf_counter()
        try:
            from qwen_worker.loading import load_pipeline

            self.pipe = load_pipeline(self.preset, model_dir=model_dir, offload=offload, device=device,
                                      images_per_call=images_per_call)
        except Exception as exc:
            self.problem = f"model {model!r} did not load: {describe(exc)}"
        self.load_s = time.perf_counter() - started

    # ------------------------------------------------------------------ readiness

    def ready(self) -> dict:
        """Prove, from this worker's own node, that it can work: the model loaded, and the output
        is usable (credentials found, destination reachable, a conditional put honoured, a read
        back). Returns who this worker is and `problem` (None when ready)."""
        problem = self.problem
        if problem is None:
            try:
                self.store.check_usable()
            except StoreAccessError as exc:
                problem = self._store_problem(exc)
            except Exception as exc:  # anything else on the store is this node's problem too
                problem = f"cannot use the output {self.store.uri} from node {self.node_ip}: {describe(exc)}"
        return {**self.ping(), "ready": problem is None, "problem": problem}

    def _store_problem(self, exc: StoreAccessError) -> str:
        has_credentials = getattr(self.store, "has_credentials", lambda: True)()
        if not has_credentials:
            return (f"no S3 credentials on node {self.node_ip} for {self.store.uri} (give that node "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance/pod role)")
        return f"{exc} (from node {self.node_ip})"

    def ping(self) -> dict:
        """Who this worker is, how long its model took to load, and its offload plan (real models)."""
        plan = getattr(self.pipe, "qwen_batch_offload_plan", None)
        return {"name": self.name, "pid": os.getpid(), "node_ip": self.node_ip, "load_s": self.load_s,
                "offload_plan": plan.to_dict() if plan else None}

    # ------------------------------------------------------------------ rendering

    def render_shard(self, rows: list[RenderRow], batch_size: int = 4, look_first: bool = False) -> Iterator[list[RowResult]]:
        """Render and store `rows`; yield the finished rows' results after each micro-batch.
        `batch_size` 0 means auto: as many images per call as this worker's GPU memory fits.
        `look_first`: check the store before rendering (a retry, or another copy of a straggler).
        After a worker error (this node cannot store, its GPU broke) the rest of the shard is
        handed back unrendered, as worker failures, instead of rendering what cannot be stored."""
        if self.problem is not None:
            raise WorkerError(self.problem)
        pending = {row.row_index: _RowProgress(row) for row in rows}
        look = look_first or self.check_stored
        for tasks in micro_batches(rows, lambda row: self.images_per_call(row, batch_size)):
            finished = self._render_and_store(tasks, pending, look)
            worker_error = next((r for r in finished if r.error_kind == ErrorKind.WORKER.value), None)
            if worker_error is not None and pending:  # one report: the failed batch and the rest
                handed_back = WorkerError(f"not attempted after a worker error: {worker_error.error}")
                yield finished + [progress.abandon(handed_back, self.name) for progress in pending.values()]
                return
            if finished:
                yield finished

    def _render_and_store(self, tasks: list[ImageTask], pending: dict, look: bool) -> list[RowResult]:
        to_render = []
        for task in tasks:
            try:
                stored = self._keepable_stored_image(task) if look else None
            except Exception as exc:  # this image cannot be checked: its row fails, the batch goes on
                pending[task.row.row_index].fail(exc)
                continue
            if stored is not None:
                pending[task.row.row_index].add(task.index, sha256_hex(stored), rendered=False)
            else:
                to_render.append(task)
        if to_render:
            try:
                started = time.perf_counter()
                images = render_splitting_on_oom(self.pipe, to_render, self.fits)
                render_s = (time.perf_counter() - started) / len(to_render)
            except Exception as exc:  # a broken batch fails its rows, the shard goes on
                if is_fatal_cuda_error(exc):  # a broken CUDA context: let Ray restart this worker
                    print(f"{self.name}: fatal CUDA error, exiting so Ray restarts the worker: {exc}", flush=True)
                    os._exit(70)
                return self._fail(to_render, pending, exc)
            for task, image in zip(to_render, images):
                progress = pending[task.row.row_index]
                progress.render_s += render_s
                started = time.perf_counter()
                try:
                    sha, rendered = self._store_image(task, image)
                except Exception as exc:
                    progress.fail(exc)
                    continue
                finally:
                    progress.upload_s += time.perf_counter() - started
                progress.add(task.index, sha, rendered=rendered)
        return self._collect(tasks, pending)

    def _store_image(self, task: ImageTask, image) -> tuple[str, bool]:
        """Encode and conditionally store one image: (sha256 of what is stored, whether it is
        what we rendered). On a conflict the stored object stays when it carries this row's
        provenance (another copy of the row was first, with other bytes): it is the row's image."""
        data = encode_image(image, task.row.format, self.provenance(task))
        try:
            self.store.put_new(task.key, data, content_type=content_type(task.row.format))
            return sha256_hex(data), True
        except ObjectExistsError:
            if self.existing == "replace":
                raise
            stored = stored_own_image(self.store, task.key, self.provenance(task))
            if stored is None:
                raise
            return sha256_hex(stored), False

    def images_per_call(self, row: RenderRow, batch_size: int) -> int:
        """`batch_size` (0: what this worker's GPU memory fits), capped by what fit after an
        out-of-memory split of this shape."""
        size = batch_size or self.auto_batch_size(row)
        return min(size, self.fits.get(row.shape_key, size))

    def auto_batch_size(self, row: RenderRow) -> int:
        """Images of `row`'s shape per pipeline call that fit this worker's offload plan."""
        from qwen_worker.offload import DEFAULT_IMAGES_PER_CALL, auto_batch_size

        plan = getattr(self.pipe, "qwen_batch_offload_plan", None)
        if plan is None:  # tiny model: no memory plan
            return DEFAULT_IMAGES_PER_CALL
        return auto_batch_size(plan, preset=self.preset, megapixels=row.width * row.height / 1e6)

    def provenance(self, task: ImageTask) -> dict:
        return image_provenance(task.row, task.index, model=self.preset.name, manifest_sha256=self.manifest_sha256)

    def _keepable_stored_image(self, task: ImageTask) -> bytes | None:
        """The bytes already stored at the task's key, when the policy says to keep them."""
        if self.existing == "replace":
            return None
        if self.existing == "any":
            try:
                return self.store.get(task.key)
            except KeyError:
                return None
        return stored_own_image(self.store, task.key, self.provenance(task))  # a foreign file: the put reports it

    def _fail(self, tasks, pending, exc) -> list[RowResult]:
        for task in tasks:
            pending[task.row.row_index].fail(exc)
        return self._collect(tasks, pending)

    def _collect(self, tasks, pending) -> list[RowResult]:
        """Results of the rows that have all their images settled after this batch."""
        results = []
        for row_index in dict.fromkeys(task.row.row_index for task in tasks):
            progress = pending.get(row_index)
            if progress is not None and progress.settled:
                results.append(progress.result(self.name))
                del pending[row_index]
        self._record_metrics(results)
        return results

    def _record_metrics(self, results: list[RowResult]) -> None:
        tags = self.metrics.tags
        for result in results:
            if result.status is RowStatus.FAILED:
                self.metrics.failed.inc(1, tags)
            elif result.rendered:
                self.metrics.rendered.inc(1, tags)
                images = len(result.keys)
                self.metrics.render_seconds.observe(result.render_s / images, tags)
                self.metrics.upload_seconds.observe(result.upload_s / images, tags)
        retries = getattr(self.store, "retries", 0)
        if retries > self._retries_reported:
            self.metrics.upload_retries.inc(retries - self._retries_reported, tags)
            self._retries_reported = retries


class _RowProgress:
    def __init__(self, row: RenderRow):
        self.row = row
        self.sha256: dict[int, str] = {}
        self.rendered = False
        self.render_s = 0.0
        self.upload_s = 0.0
        self.error = ""
        self.error_kind = ""
        self.failed_images = 0

    def add(self, index: int, sha256: str, *, rendered: bool) -> None:
        self.sha256[index] = sha256
        self.rendered = self.rendered or rendered

    def fail(self, exc: BaseException) -> None:
        self.failed_images += 1
        kind = classify(exc)
        # one image's worker error makes the row's failure a worker error (it goes to another worker)
        if kind is ErrorKind.WORKER or not self.error_kind or self.error_kind == ErrorKind.TRANSIENT.value:
            self.error, self.error_kind = describe(exc), kind.value

    def abandon(self, exc: BaseException, worker: str) -> RowResult:
        """The row's result when it is handed back without being finished."""
        self.failed_images = len(self.row.keys) - len(self.sha256)
        self.error, self.error_kind = describe(exc), classify(exc).value
        return self.result(worker)

    @property
    def settled(self) -> bool:
        """Every image of the row was either stored or failed."""
        return len(self.sha256) + self.failed_images == len(self.row.keys)

    def result(self, worker: str) -> RowResult:
        failed = len(self.sha256) < len(self.row.keys)
        return RowResult(
            row_index=self.row.row_index,
            id=self.row.id,
            status=RowStatus.FAILED if failed else RowStatus.DONE,
            keys=list(self.row.keys),
            sha256=[self.sha256.get(i, "") for i in range(len(self.row.keys))],
            seed=self.row.seed,
            render_s=round(self.render_s, 4),
            upload_s=round(self.upload_s, 4),
            rendered=self.rendered,
            worker=worker,
            error=self.error if failed else "",
            error_kind=self.error_kind if failed else "",
        )


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
