"""RenderWorker: loads the pipeline once, then renders shards and stores every image exactly once.

A plain class; the driver turns it into a Ray actor (`ray.remote(RenderWorker)`), one per GPU.
`render_shard` is a generator: it yields the results of each micro-batch as soon as its images
are stored, so the driver can show progress row by row and keep what finished if the actor dies.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Iterator

from qwen_worker.encode import content_type, encode_image, read_provenance
from qwen_worker.errors import QwenBatchError, UserError
from qwen_worker.presets import get_preset
from qwen_worker.render import ImageTask, is_fatal_cuda_error, micro_batches, render_splitting_on_oom
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
        when its embedded provenance is this row's (a crash came before the ledger), "any" keeps
        whatever is there (--resume-anyway), "replace" renders again (--overwrite).
        `check_stored=False` (a job new to its output) skips that look-up: nothing of this job can be
        there yet, and the conditional put still reports a foreign file."""
        self.preset = get_preset(model)
        self.store = open_store(output_uri, overwrite=overwrite or existing == "replace", **(store_options or {}))
        self.manifest_sha256 = manifest_sha256
        self.existing = existing
        self.check_stored = check_stored or existing == "any"
        self._retries_reported = 0
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        from qwen_worker.metrics import WorkerMetrics

        self.metrics = WorkerMetrics(job_id, self.name)
        started = time.perf_counter()
        from qwen_worker.loading import load_pipeline

        self.pipe = load_pipeline(self.preset, model_dir=model_dir, offload=offload, device=device,
                                  images_per_call=images_per_call)
        self.load_s = time.perf_counter() - started

    def ping(self) -> dict:
        """Who this worker is, how long its model took to load, and its offload plan (real models)."""
        plan = getattr(self.pipe, "qwen_batch_offload_plan", None)
        return {"name": self.name, "pid": os.getpid(), "load_s": self.load_s, "offload_plan": plan.to_dict() if plan else None}

    def render_shard(self, rows: list[RenderRow], batch_size: int = 4) -> Iterator[list[RowResult]]:
        """Render and store `rows`; yield the finished rows' results after each micro-batch.
        `batch_size` 0 means auto: as many images per call as this worker's GPU memory fits."""
        pending = {row.row_index: _RowProgress(row) for row in rows}
        for tasks in micro_batches(rows, batch_size or self.auto_batch_size):
            finished = self._render_and_store(tasks, pending)
            if finished:
                yield finished

    def _render_and_store(self, tasks: list[ImageTask], pending: dict) -> list[RowResult]:
        to_render = []
        for task in tasks:
            try:
                stored = self._keepable_stored_image(task)
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
                images = render_splitting_on_oom(self.pipe, to_render)
                render_s = (time.perf_counter() - started) / len(to_render)
            except Exception as exc:  # a broken batch fails its rows, the shard goes on
                if is_fatal_cuda_error(exc):  # a broken CUDA context: let Ray restart this worker
                    print(f"{self.name}: fatal CUDA error, exiting so Ray restarts the worker: {exc}", flush=True)
                    os._exit(70)
                return self._fail(to_render, pending, exc)
            for task, image in zip(to_render, images):
                progress = pending[task.row.row_index]
                progress.render_s += render_s
                try:
                    started = time.perf_counter()
                    data = encode_image(image, task.row.format, self.provenance(task))
                    self.store.put_new(task.key, data, content_type=content_type(task.row.format))
                    progress.upload_s += time.perf_counter() - started
                except Exception as exc:
                    progress.fail(exc)
                    continue
                progress.add(task.index, sha256_hex(data), rendered=True)
        return self._collect(tasks, pending)

    def auto_batch_size(self, row: RenderRow) -> int:
        """Images of `row`'s shape per pipeline call that fit this worker's offload plan."""
        from qwen_worker.offload import DEFAULT_IMAGES_PER_CALL, auto_batch_size

        plan = getattr(self.pipe, "qwen_batch_offload_plan", None)
        if plan is None:  # tiny model: no memory plan
            return DEFAULT_IMAGES_PER_CALL
        return auto_batch_size(plan, preset=self.preset, megapixels=row.width * row.height / 1e6)

    def provenance(self, task: ImageTask) -> dict:
        """What the image embeds about how it was made (no output location: same bytes anywhere)."""
        row = task.row
        return {
            "generator": "qwen-batch",
            "model": self.preset.name,
            "manifest_sha256": self.manifest_sha256,
            "id": row.id,
            "image": task.index,
            "seed": task.seed,
            "prompt": row.prompt,
            "negative_prompt": row.negative_prompt,
            "width": row.width,
            "height": row.height,
            "steps": row.steps,
            "true_cfg_scale": row.true_cfg_scale,
        }

    def _keepable_stored_image(self, task: ImageTask) -> bytes | None:
        """The bytes already stored at the task's key, when the policy says to keep them."""
        if self.existing == "replace" or not self.check_stored:
            return None
        try:
            data = self.store.get(task.key)
        except KeyError:
            return None
        if self.existing == "any":
            return data
        found = read_provenance(data) or {}
        mine = self.provenance(task)
        same = all(found.get(field) == mine[field] for field in ("model", "manifest_sha256", "id", "image", "seed"))
        return data if same else None  # a foreign file: rendering will report the conflict

    def _fail(self, tasks, pending, exc) -> list[RowResult]:
        for task in tasks:
            pending[task.row.row_index].fail(exc)
        return self._collect(tasks, pending)

    def _collect(self, tasks, pending) -> list[RowResult]:
        """Results of the rows that have all their images settled after this batch."""
        results = []
        for row_index in dict.fromkeys(task.row.row_index for task in tasks):
            progress = pending[row_index]
            if progress.settled:
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
        self.user_error = False
        self.failed_images = 0

    def add(self, index: int, sha256: str, *, rendered: bool) -> None:
        self.sha256[index] = sha256
        self.rendered = self.rendered or rendered

    def fail(self, exc: BaseException) -> None:
        self.failed_images += 1
        self.error = _describe(exc)
        self.user_error = isinstance(exc, UserError)

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
            user_error=self.user_error if failed else False,
        )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, QwenBatchError) else f"{type(exc).__name__}: {text}"
