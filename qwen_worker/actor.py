"""RenderWorker: loads the model once, proves it can work from its node, then renders shards and
stores every image exactly once.

A plain class; the driver turns it into a Ray actor (`ray.remote(RenderWorker)`), one per GPU.
The constructor never raises: what went wrong (the store cannot be opened, the model did not load)
is kept and reported by `ready()`, so the driver can tell the user which worker on which node lacks
what, and give that worker no work.

`render_shard` is a generator: it yields the results of each micro-batch as soon as its images are
stored. Rendering and storing overlap: while a batch's images are encoded (PNG), hashed once and
stored on a small thread pool, the next batch renders (on a GPU the card stays busy through PNG
encoding of 1-2 MP images and S3 latency; on a CPU the store uses the other core). At most one
rendered batch waits for its stores (bounded memory); a store failure fails only its row.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from qwen_worker.encode import DEFAULT_PNG_COMPRESSION, content_type, encode_image
from qwen_worker.errors import ObjectExistsError, StoreAccessError, UserError, WorkerError
from qwen_worker.failures import ErrorKind, classify, describe, is_fatal_cuda_error
from qwen_worker.presets import get_preset
from qwen_worker.provenance import image_provenance, stored_own_image
from qwen_worker.render import ImageTask, batches_of, micro_batches, render_splitting_on_oom
from qwen_worker.rows import RenderRow, RowResult, RowStatus
from qwen_worker.stores import open_store, sha256_hex

STORE_THREADS = 2
BATCHES_STORING = 1  # rendered batches whose images may wait for the store while the next one renders


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
        png_compression: int = DEFAULT_PNG_COMPRESSION,
        lora_cache_bytes: int | None = None,
        text_check: dict | None = None,
    ):
        """`existing` says what to do with an image already stored at a row's key: "ours" keeps it
        when its embedded provenance is this row's (a crash came before the ledger, or another copy
        of the row was first), "any" keeps whatever is there (--resume-anyway), "replace" renders
        again (--overwrite). `check_stored=False` (a job new to its output) skips the look-up
        before rendering: nothing of this job can be there yet, and a conflict is still checked."""
        from qwen_worker.inputs import InputReader

        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.node_ip = _node_ip()
        self.manifest_sha256 = manifest_sha256
        self.existing = existing
        self.check_stored = check_stored or existing == "any"
        self.png_compression = png_compression
        self.lora_cache_bytes = lora_cache_bytes
        self._retries_reported = 0
        self.load_s = 0.0
        self.model = None
        self.adapters = None  # qwen_worker.lora.cache.AdapterCache, made when a row first asks for a LoRA
        self.problem: str | None = None  # why this worker cannot work (reported by ready())
        self.fits: dict[tuple, int] = {}  # batch key -> images per call that fit after an out-of-memory split
        self.text_check = _TextCheckOptions(**text_check) if text_check is not None else None
        self._best: dict[tuple, _Attempt] = {}  # (row, image) -> best attempt so far while re-rolling
        self._best_lock = threading.Lock()
        self.preset = get_preset(model)
        self.reader = InputReader(store_options, model_dir)
        from qwen_worker.metrics import WorkerMetrics

        self.metrics = WorkerMetrics(job_id, self.name)
        try:
            self.store = open_store(output_uri, overwrite=overwrite or existing == "replace", **(store_options or {}))
        except Exception as exc:
            self.store, self.problem = None, f"cannot open the output {output_uri}: {describe(exc)}"
            return
        started = time.perf_counter()
        try:
            from qwen_worker.models.loading import load_model

            self.model = load_model(self.preset, model_dir=model_dir, offload=offload, device=device,
                                    images_per_call=images_per_call)
        except Exception as exc:
            self.problem = f"model {model!r} did not load: {describe(exc)}"
        self.load_s = time.perf_counter() - started

    @property
    def pipe(self):
        return self.model.pipe if self.model is not None else None

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
        """Who this worker is, how long its model took to load, its offload plan (real models) and
        the LoRA adapters it holds (the driver prefers to give it shards that use them)."""
        plan = self.model.offload_plan if self.model is not None else None
        return {"name": self.name, "pid": os.getpid(), "node_ip": self.node_ip, "load_s": self.load_s,
                "offload_plan": plan.to_dict() if plan else None,
                "loras": self.adapters.holds() if self.adapters is not None else []}

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
        storing: collections.deque = collections.deque()  # (tasks, [(task, future)]) in render order
        size = lambda row: self.images_per_call(row, batch_size)  # noqa: E731
        batches = micro_batches(rows, size)
        with ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="store") as pool:
            while batches is not None:
                rerolls: list[ImageTask] = []
                for tasks in batches:
                    storing.append((tasks, self._render_batch(tasks, pending, look, pool)))
                    while storing and (len(storing) > BATCHES_STORING or all(f.done() for _t, f in storing[0][1])):
                        finished = self._settle(*storing.popleft(), pending, rerolls)
                        if any(r.error_kind == ErrorKind.WORKER.value for r in finished) and (pending or storing):
                            yield self._hand_back(finished, storing, pending)
                            return
                        if finished:
                            yield finished
                while storing:
                    finished = self._settle(*storing.popleft(), pending, rerolls)
                    if any(r.error_kind == ErrorKind.WORKER.value for r in finished) and (pending or storing):
                        yield self._hand_back(finished, storing, pending)
                        return
                    if finished:
                        yield finished
                batches = batches_of(rerolls, size) if rerolls else None  # images whose text read back poorly

    def _hand_back(self, finished: list[RowResult], storing, pending: dict) -> list[RowResult]:
        """After a worker error: what is still being stored settles, the rest goes back unrendered."""
        error = next(r.error for r in finished if r.error_kind == ErrorKind.WORKER.value)
        while storing:
            finished += self._settle(*storing.popleft(), pending, [])
        handed_back = WorkerError(f"not attempted after a worker error: {error}")
        return finished + [progress.abandon(handed_back, self.name) for progress in pending.values()]

    def _render_batch(self, tasks: list[ImageTask], pending: dict, look: bool, pool) -> list:
        """Render the tasks not already stored and hand their images to the store pool; returns
        [(task, future of (sha256, rendered, upload seconds))]."""
        to_render = []
        for task in tasks:
            try:
                stored = self._keepable_stored_image(task) if look else None
            except Exception as exc:  # this image cannot be checked: its row fails, the batch goes on
                pending[task.row.row_index].fail(exc)
                continue
            if stored is not None:
                pending[task.row.row_index].add(task.index, sha256_hex(stored), rendered=False)
            elif look and self._rerolling(task) and task.attempt == 0:
                to_render.append(self._resume_rerolls(task))
            else:
                to_render.append(task)
        try:
            inputs, to_render = self._read_inputs(to_render, pending)
            if not to_render:
                return []
            self._activate(to_render, pending)
            started = time.perf_counter()
            images = render_splitting_on_oom(lambda batch: self.model.render(batch, inputs), to_render, self.fits)
            render_s = (time.perf_counter() - started) / len(to_render)
        except Exception as exc:  # a broken batch fails its rows, the shard goes on
            if is_fatal_cuda_error(exc):  # a broken CUDA context: let Ray restart this worker
                print(f"{self.name}: fatal CUDA error, exiting so Ray restarts the worker: {exc}", flush=True)
                os._exit(70)
            for task in to_render:
                pending[task.row.row_index].fail(exc)
            return []
        stores = []
        for task, image in zip(to_render, images):
            pending[task.row.row_index].render_s += render_s
            stores.append((task, pool.submit(self._finish_image, task, image, pending[task.row.row_index].extra())))
        return stores

    def _read_inputs(self, tasks: list[ImageTask], pending: dict) -> tuple[dict, list[ImageTask]]:
        """The batch's input images ({uri: PIL image}, each read once) and the tasks whose inputs
        could be read; a row whose input is missing or not an image fails alone."""
        from qwen_worker.inputs import open_image

        images: dict = {}
        digests: dict[str, str] = {}
        readable = []
        for task in tasks:
            row, progress = task.row, pending[task.row.row_index]
            try:
                for ref in [*row.inputs, *([row.mask] if row.mask is not None else [])]:
                    if ref.uri not in images:
                        data = self.reader.read(ref.uri)
                        mode = "L" if ref is row.mask else ("RGBA" if self.preset.rgba else "RGB")
                        images[ref.uri], digests[ref.uri] = open_image(data, ref.uri, mode), sha256_hex(data)
                    progress.input_sha256[ref.uri] = digests[ref.uri]
            except Exception as exc:
                progress.fail(exc)
                continue
            readable.append(task)
        return images, readable

    def _activate(self, tasks: list[ImageTask], pending: dict) -> None:
        """Activate the batch's LoRA set and speed (every task of a batch has the same)."""
        row = tasks[0].row
        adapters = []
        for ref in row.loras:
            adapter = self._adapter_cache().get(ref.uri)
            adapters.append((adapter.tensors, ref.scale))
            for task in tasks:
                pending[task.row.row_index].lora_sha256[ref.uri] = adapter.sha256
        self.model.prepare(row.speed, adapters, key=(row.loras, row.speed))

    def _adapter_cache(self):
        if self.adapters is None:
            from qwen_worker.lora.cache import DEFAULT_BUDGET_BYTES, AdapterCache
            from qwen_worker.lora.hooks import linear_layers

            linears = linear_layers(self.model.transformer)
            self.adapters = AdapterCache(lambda uri: self._read_lora(uri, linears), linears,
                                         dtype=self.model.transformer.dtype,
                                         budget_bytes=self.lora_cache_bytes or DEFAULT_BUDGET_BYTES)
        return self.adapters

    def _read_lora(self, uri: str, linears: dict) -> bytes:
        from qwen_worker.lora.builtin import BUILTIN_PREFIX, builtin_lora_bytes

        if uri.startswith(BUILTIN_PREFIX):
            return builtin_lora_bytes(uri[len(BUILTIN_PREFIX):], linears)
        return self.reader.read(uri)

    def _rerolling(self, task: ImageTask) -> bool:
        check = self.text_check
        return check is not None and check.min_score is not None and check.max_rerolls > 0 and bool(task.row.expected_text)

    def _finish_image(self, task: ImageTask, image, extra: dict) -> "_Outcome":
        """(On the store pool.) Read back its text when asked (OCR), then either keep the image as an
        attempt to beat (its text scored below --min-text-score and re-rolls remain) or store the
        best attempt of the image at its key."""
        started = time.perf_counter()
        check = self._check_text(task, image)
        attempt_extra = dict(extra)
        if check is not None:  # the OCR's reading goes into the image: a resume scores it again without OCR
            attempt_extra.update(text_score=None if check.score is None else round(check.score, 4), text_read=check.read)
        if task.attempt:
            attempt_extra.update(attempt=task.attempt, attempt_seed=task.seed)
        data = encode_image(image, task.row.format, self.provenance(task, attempt_extra),
                            png_compression=self.png_compression)
        current = _Attempt(task.attempt, task.seed, check, data)
        if self._rerolling(task):
            with self._best_lock:
                best = self._best.get((task.row.row_index, task.index))
                if best is None or current.better_than(best):
                    best = self._best[(task.row.row_index, task.index)] = current
            if task.attempt < self.text_check.max_rerolls and not best.good_enough(self.text_check.min_score):
                self.store.put(task.attempt_key, data, content_type=content_type(task.row.format))  # resumable
                return _Outcome(reroll=True, seconds=time.perf_counter() - started)
            with self._best_lock:
                self._best.pop((task.row.row_index, task.index), None)
            current = best
        sha, rendered = self._store_final(task, current.data)
        if self._rerolling(task) and not self.text_check.keep_rerolls:
            for attempt in range(task.attempt + 1):
                self.store.delete(ImageTask(task.row, task.index, attempt).attempt_key)
        return _Outcome(sha256=sha, rendered=rendered, seconds=time.perf_counter() - started, check=current.check,
                        seed=current.seed, rerolls=task.attempt)

    def _check_text(self, task: ImageTask, image):
        if self.text_check is None or not task.row.expected_text:
            return None
        from qwen_worker.textcheck import check_image

        return check_image(image, list(task.row.expected_text))

    def _resume_rerolls(self, task: ImageTask) -> ImageTask:
        """A re-rolled image whose job was killed: its attempts kept so far (under rerolls/) count,
        and rendering goes on with the next one instead of starting again."""
        from qwen_worker.encode import read_provenance
        from qwen_worker.provenance import is_own
        from qwen_worker.textcheck import score_text

        expected = self.provenance(task)
        last = None
        for attempt in range(self.text_check.max_rerolls):
            kept = ImageTask(task.row, task.index, attempt)
            try:
                data = self.store.get(kept.attempt_key)
            except KeyError:
                break
            found = read_provenance(data)
            if not is_own(found, expected) or "text_read" not in found:
                break
            attempt_record = _Attempt(attempt, kept.seed, score_text(found["text_read"], list(task.row.expected_text)), data)
            with self._best_lock:
                best = self._best.get((task.row.row_index, task.index))
                if best is None or attempt_record.better_than(best):
                    self._best[(task.row.row_index, task.index)] = attempt_record
            last = attempt
        return task if last is None else ImageTask(task.row, task.index, last + 1)

    def _store_final(self, task: ImageTask, data: bytes) -> tuple[str, bool]:
        """Conditionally store an image's bytes at its key, hashing them once: (sha256 of what is
        stored, whether it is what we rendered). On a conflict the stored object stays when it
        carries this row's provenance (another copy of the row was first, with other bytes); one
        made from an older version of the row's inputs is replaced."""
        from qwen_worker.encode import read_provenance
        from qwen_worker.provenance import is_own, is_stale_own

        digest = sha256_hex(data)
        try:
            self.store.put_new(task.key, data, content_type=content_type(task.row.format), sha256=digest)
            return digest, True
        except ObjectExistsError:
            if self.existing == "replace":
                raise
            stored = self.store.get(task.key)
            found, provenance = read_provenance(stored), self.provenance(task)
            if is_stale_own(found, provenance):  # an input changed since that image was made
                self.store.put(task.key, data, content_type=content_type(task.row.format))
                return digest, True
            if not is_own(found, provenance):
                raise
            return sha256_hex(stored), False

    def _settle(self, tasks: list[ImageTask], stores: list, pending: dict, rerolls: list) -> list[RowResult]:
        """Apply a batch's outcomes to its rows (a re-roll joins `rerolls`); the rows now settled."""
        for task, future in stores:
            progress = pending[task.row.row_index]
            try:
                outcome = future.result()
            except Exception as exc:
                progress.fail(exc)
                continue
            progress.upload_s += outcome.seconds
            if outcome.reroll:
                rerolls.append(ImageTask(task.row, task.index, task.attempt + 1))
                continue
            progress.add(task.index, outcome.sha256, rendered=outcome.rendered)
            progress.add_text(task.index, outcome.check, outcome.seed, outcome.rerolls)
        return self._collect(tasks, pending)

    def images_per_call(self, row: RenderRow, batch_size: int) -> int:
        """`batch_size` (0: what this worker's GPU memory fits), capped by what fit after an
        out-of-memory split of this shape."""
        size = batch_size or self.auto_batch_size(row)
        return min(size, self.fits.get(row.shape_key, size))

    def auto_batch_size(self, row: RenderRow) -> int:
        """Images of `row`'s shape per pipeline call that fit this worker's offload plan (input
        images add their image tokens)."""
        from qwen_worker.offload import DEFAULT_IMAGES_PER_CALL, auto_batch_size

        plan = self.model.offload_plan if self.model is not None else None
        if plan is None:  # tiny models: no memory plan
            return DEFAULT_IMAGES_PER_CALL
        return auto_batch_size(plan, preset=self.preset, megapixels=row.width * row.height / 1e6,
                               input_megapixels=len(row.inputs) * self.preset.input_area / 1e6)

    def provenance(self, task: ImageTask, extra: dict | None = None) -> dict:
        return image_provenance(task.row, task.index, model=self.preset.name, manifest_sha256=self.manifest_sha256,
                                extra=extra)

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


@dataclass(frozen=True)
class _TextCheckOptions:
    min_score: float | None = None
    max_rerolls: int = 0
    keep_rerolls: bool = False


@dataclass(frozen=True)
class _Attempt:
    """One rendering of an image while its text is re-rolled: the best one is stored."""

    attempt: int
    seed: int
    check: object  # qwen_worker.textcheck.TextCheck
    data: bytes

    def good_enough(self, min_score: float) -> bool:
        return self.check is None or self.check.score is None or self.check.score >= min_score

    def better_than(self, other: "_Attempt") -> bool:
        """A higher score wins; on a tie the earlier attempt (the row's own seed first)."""
        mine = -1.0 if self.check is None or self.check.score is None else self.check.score
        theirs = -1.0 if other.check is None or other.check.score is None else other.check.score
        return mine > theirs or (mine == theirs and self.attempt < other.attempt)


@dataclass(frozen=True)
class _Outcome:
    """How one rendered image ended on the store pool: stored (with its text check), or to re-roll."""

    reroll: bool = False
    sha256: str = ""
    rendered: bool = True
    seconds: float = 0.0
    check: object = None
    seed: int | None = None
    rerolls: int = 0


class _RowProgress:
    def __init__(self, row: RenderRow):
        self.row = row
        self.sha256: dict[int, str] = {}
        self.input_sha256: dict[str, str] = {}  # uri -> sha256 of the bytes read
        self.lora_sha256: dict[str, str] = {}
        self.rendered = False
        self.render_s = 0.0
        self.upload_s = 0.0
        self.error = ""
        self.error_kind = ""
        self.failed_images = 0
        self.text: dict[int, object] = {}  # image -> TextCheck of its stored attempt
        self.seeds: dict[int, int] = {}  # image -> the seed its stored image was rendered with
        self.rerolls = 0

    def add_text(self, index: int, check, seed: int | None, rerolls: int) -> None:
        if check is not None:
            self.text[index] = check
        if seed is not None:
            self.seeds[index] = seed
        self.rerolls += rerolls

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

    def extra(self) -> dict:
        """What the embedded provenance adds from this worker: the sha256 of the files it read."""
        extra = {}
        refs = [*self.row.inputs, *([self.row.mask] if self.row.mask is not None else [])]
        if refs:
            extra["inputs_sha256"] = [self.input_sha256.get(ref.uri, "") for ref in refs]
        if self.row.loras:
            extra["loras_sha256"] = [self.lora_sha256.get(ref.uri, "") for ref in self.row.loras]
        return extra

    @property
    def settled(self) -> bool:
        """Every image of the row was either stored or failed."""
        return len(self.sha256) + self.failed_images == len(self.row.keys)

    def result(self, worker: str) -> RowResult:
        failed = len(self.sha256) < len(self.row.keys)
        extra = self.extra()
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
            inputs_sha256=extra.get("inputs_sha256", []),
            loras_sha256=extra.get("loras_sha256", []),
            input_digest=self.row.input_digest(),
            **self.text_columns(),
        )

    def text_columns(self) -> dict:
        """The row's --check-text outcome (empty lists when no image was checked)."""
        if not self.text:
            return {"image_seeds": [self.seeds.get(i, s) for i, s in enumerate(self.row.image_seeds())] if self.seeds else []}
        images = range(len(self.row.keys))
        missing = list(dict.fromkeys(m for check in self.text.values() for m in check.missing))
        return {
            "text_score": [None if i not in self.text or self.text[i].score is None else round(self.text[i].score, 4)
                           for i in images],
            "text_read": [self.text[i].read if i in self.text else "" for i in images],
            "text_missing": missing,
            "image_seeds": [self.seeds.get(i, seed) for i, seed in enumerate(self.row.image_seeds())],
            "rerolls": self.rerolls,
        }


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
