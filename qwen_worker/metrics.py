"""Prometheus metrics through Ray (`ray.util.metrics`), exported by every Ray node as `ray_<name>`.

Created only inside a Ray process; elsewhere (unit tests, bare loops) every call is a no-op.
cluster/grafana-dashboard.json plots these names.
"""

from __future__ import annotations

RENDER_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
UPLOAD_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

METRIC_NAMES = (
    "qwen_batch_rows_rendered",
    "qwen_batch_rows_failed",
    "qwen_batch_rows_skipped",
    "qwen_batch_render_seconds",
    "qwen_batch_upload_seconds",
    "qwen_batch_rows_in_flight",
    "qwen_batch_upload_retries",
)


def _ray_ready() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


class _Noop:
    def inc(self, *args, **kwargs):
        pass

    observe = set = inc


class WorkerMetrics:
    """The worker's metrics, tagged with the job id and the worker's name."""

    def __init__(self, job_id: str, worker: str):
        self.tags = {"job_id": job_id, "worker": worker}
        if not _ray_ready():
            self.rendered = self.failed = self.render_seconds = self.upload_seconds = self.upload_retries = _Noop()
            return
        from ray.util.metrics import Counter, Histogram

        keys = ("job_id", "worker")
        self.rendered = Counter("qwen_batch_rows_rendered", "Rows rendered and stored", tag_keys=keys)
        self.failed = Counter("qwen_batch_rows_failed", "Rows that failed an attempt", tag_keys=keys)
        self.render_seconds = Histogram(
            "qwen_batch_render_seconds", "Render time per image (s)", boundaries=RENDER_BUCKETS, tag_keys=keys
        )
        self.upload_seconds = Histogram(
            "qwen_batch_upload_seconds", "Encode + upload time per image (s)", boundaries=UPLOAD_BUCKETS, tag_keys=keys
        )
        self.upload_retries = Counter("qwen_batch_upload_retries", "Storage requests retried", tag_keys=keys)


class DriverMetrics:
    """The driver's metrics, tagged with the job id."""

    def __init__(self, job_id: str):
        self.tags = {"job_id": job_id}
        if not _ray_ready():
            self.skipped = self.in_flight = _Noop()
            return
        from ray.util.metrics import Counter, Gauge

        self.skipped = Counter("qwen_batch_rows_skipped", "Rows already stored when the job (re)started", tag_keys=("job_id",))
        self.in_flight = Gauge("qwen_batch_rows_in_flight", "Rows handed to workers and not yet settled", tag_keys=("job_id",))
