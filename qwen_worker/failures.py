"""The three kinds of failure, decided in one place.

- ROW: the row itself is wrong (bad prompt, template, params, input file, an image of someone else
  at its key, a UserError raised for it). Failed at once, never retried.
- WORKER: this worker cannot do the work (store access from its node, credentials, CUDA/driver,
  model load, host out of memory). The rows go back to the queue for another worker without using
  up their attempts; the worker is counted against and quarantined after a few in a row.
- TRANSIENT: anything that may pass (throttling, 5xx, resets, S3 409 ConditionalRequestConflict,
  CUDA out of memory for a single image, an actor or node lost, an unknown exception). Retried
  with backoff, bounded per row by --max-attempts.
"""

from __future__ import annotations

import enum

from qwen_worker.errors import ObjectExistsError, StoreAccessError, SystemError_, UserError, WorkerError


class ErrorKind(str, enum.Enum):
    ROW = "row"
    WORKER = "worker"
    TRANSIENT = "transient"


_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "CredentialRetrievalError",
                      "NoRegionError", "EndpointConnectionError", "ConnectTimeoutError")  # fmt: skip
_FATAL_CUDA_MARKERS = ("CUDA error", "cudaError", "CUBLAS_STATUS", "CUDA driver", "no CUDA GPUs are available",
                       "NVIDIA driver")  # fmt: skip


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out of memory (torch's OutOfMemoryError or its message)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return "CUDA out of memory" in str(exc)


def is_fatal_cuda_error(exc: BaseException) -> bool:
    """A CUDA error after which the process's CUDA context cannot be trusted (illegal access,
    device-side assert, launch failure): the worker must exit so Ray restarts it fresh."""
    text = str(exc)
    return not is_out_of_memory(exc) and any(marker in text for marker in ("CUDA error", "cudaError", "CUBLAS_STATUS"))


def classify(exc: BaseException) -> ErrorKind:
    """Which kind of failure `exc` is (see the module docstring)."""
    if isinstance(exc, (StoreAccessError, WorkerError, MemoryError)):
        return ErrorKind.WORKER
    if type(exc).__name__ in _CREDENTIAL_ERRORS:  # botocore's, when raised outside our store
        return ErrorKind.WORKER
    if not is_out_of_memory(exc) and any(marker in str(exc) for marker in _FATAL_CUDA_MARKERS):
        return ErrorKind.WORKER
    if isinstance(exc, (ObjectExistsError, UserError)):
        return ErrorKind.ROW
    if isinstance(exc, SystemError_):
        return ErrorKind.TRANSIENT
    return ErrorKind.TRANSIENT


def describe(exc: BaseException) -> str:
    """One line for a ledger or a log: our own messages as they are, others with their type."""
    from qwen_worker.errors import QwenBatchError

    text = " ".join((str(exc) or type(exc).__name__).split())
    return text if isinstance(exc, QwenBatchError) else f"{type(exc).__name__}: {text}"
