"""The one exception root of qwen-batch, shared by the driver (`jobs`) and the worker.

User errors are the user's to fix (a bad row, a missing bucket): never retried, reported in one
line. System errors (storage 5xx, lost actors, CUDA OOM) are retried with backoff. Which of the
three failure kinds (row / worker / transient) an exception is, is decided in one place:
`qwen_worker.failures.classify`.
"""


class QwenBatchError(Exception):
    """Root of every error qwen-batch raises on purpose."""

    exit_code = 4


class UserError(QwenBatchError):
    """Something the user can fix: bad input, bad option, unreachable or forbidden destination."""

    exit_code = 1


class SystemError_(QwenBatchError):
    """A transient or infrastructure failure worth retrying (storage 5xx, lost actor, OOM)."""

    exit_code = 4


class StorageError(SystemError_):
    """A storage operation failed after its retries."""


class ObjectExistsError(UserError):
    """An object already exists at a key with content different from what we would write."""


class StoreAccessError(UserError):
    """The store cannot be used from here: no or wrong credentials, access denied, missing bucket,
    unreachable endpoint, a directory that cannot be written. On the driver the user must fix it
    (exit 1); on a worker it is that worker's (node's) problem, never its rows'."""


class WorkerError(SystemError_):
    """This worker cannot render: its model did not load, its GPU or driver is broken, its host is
    out of memory. Its rows go to another worker."""


class JobBusyError(SystemError_):
    """Another driver holds this job's output (its lease is alive); `job_id` is the job it runs."""

    def __init__(self, message: str, job_id: str | None = None):
        super().__init__(message)
        self.job_id = job_id
