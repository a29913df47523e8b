"""Row / worker / transient: every failure is attributed in one place (qwen_worker.failures)."""

import pytest

from qwen_worker.errors import ObjectExistsError, StorageError, StoreAccessError, UserError, WorkerError
from qwen_worker.failures import ErrorKind, classify, describe


@pytest.mark.parametrize(
    "exc, kind",
    [
        (UserError("`params`: template 'x': missing param(s) `title`"), ErrorKind.ROW),
        (ObjectExistsError("object exists with different content at out/images/a.png"), ErrorKind.ROW),
        (StoreAccessError("cannot use s3://b/out (AccessDenied on PutObject images/a.png)"), ErrorKind.WORKER),
        (WorkerError("model 'tiny' did not load"), ErrorKind.WORKER),
        (MemoryError(), ErrorKind.WORKER),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), ErrorKind.WORKER),
        (RuntimeError("Found no NVIDIA driver on your system"), ErrorKind.WORKER),
        (StorageError("PutObject images/a.png at s3://b/out: still failing after 6 attempts"), ErrorKind.TRANSIENT),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), ErrorKind.TRANSIENT),
        (ConnectionResetError(104, "Connection reset by peer"), ErrorKind.TRANSIENT),
        (IsADirectoryError(21, "Is a directory"), ErrorKind.TRANSIENT),
    ],
)
def test_each_failure_has_one_kind(exc, kind):
    assert classify(exc) is kind


@pytest.mark.parametrize("name, kwargs", [
    ("NoCredentialsError", {}),
    ("PartialCredentialsError", {"provider": "env", "cred_var": "AWS_SECRET_ACCESS_KEY"}),
    ("CredentialRetrievalError", {"provider": "sso", "error_msg": "token expired"}),
])
def test_botocore_credential_errors_raised_outside_our_store_are_worker_errors(name, kwargs):
    import botocore.exceptions

    assert classify(getattr(botocore.exceptions, name)(**kwargs)) is ErrorKind.WORKER


def test_descriptions_are_one_line_and_keep_our_own_wording():
    assert describe(UserError("row 3: bad\nthing")) == "row 3: bad thing"
    assert describe(IsADirectoryError(21, "Is a directory")) == "IsADirectoryError: [Errno 21] Is a directory"
