"""Where images and job records go: one interface for a local directory and for s3://bucket/prefix.

Keys are relative, '/'-separated ("images/a.png", "_ledger/shard-00000.parquet").
Images are written with `put_new` (never overwrites: exactly-once); the job's own bookkeeping
(ledger, results, progress) with `put`, which replaces atomically.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Iterator

from qwen_worker.errors import ObjectExistsError


class PutOutcome(str, enum.Enum):
    CREATED = "created"  # we wrote it now
    ALREADY_STORED = "already_stored"  # an identical object was there (our own earlier write)
    REPLACED = "replaced"  # different content was there and overwrite was asked for


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """Interface; see qwen_worker.stores.local.LocalStore and qwen_worker.stores.s3.S3Store."""

    uri: str
    overwrite: bool = False

    def put_new(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> PutOutcome:
        """Write `data` at `key` unless an object is there. Identical content there counts as
        success (a retried write of ours); different content raises ObjectExistsError unless the
        store was opened with overwrite=True."""
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        """Write or atomically replace `key` (bookkeeping only, never images)."""
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        """The object's bytes; KeyError when there is none."""
        raise NotImplementedError

    def stored_sha256(self, key: str) -> str | None:
        """sha256 of the object at `key`, or None when there is none."""
        raise NotImplementedError

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys under `prefix` (relative to the store root), in no promised order."""
        raise NotImplementedError

    def check_writable(self) -> None:
        """Fail early, with a UserError naming the destination, if we cannot write here."""
        raise NotImplementedError

    def worker_options(self) -> dict:
        """Keyword options for `open_store` that make a worker open this same store."""
        return {}

    def exists(self, key: str) -> bool:
        return self.stored_sha256(key) is not None

    def _exists_conflict(self, key: str, ours: str, theirs: str) -> ObjectExistsError:
        return ObjectExistsError(
            f"object exists with different content at {self.uri.rstrip('/')}/{key} "
            f"(stored sha256 {theirs[:12]}…, ours {ours[:12]}…); pass --overwrite to replace it"
        )
