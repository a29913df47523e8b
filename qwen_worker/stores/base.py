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

    def put_new(self, key: str, data: bytes, *, content_type: str = "application/octet-stream",
                sha256: str | None = None) -> PutOutcome:
        """Write `data` at `key` unless an object is there. Identical content there counts as
        success (a retried write of ours); different content raises ObjectExistsError unless the
        store was opened with overwrite=True. `sha256`: the data's digest when the caller has it
        (images are hashed once)."""
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

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """(bytes, version) of the object; the version changes whenever it is written. KeyError when
        there is none."""
        raise NotImplementedError

    def put_versioned(self, key: str, data: bytes, *, expected: str | None) -> str | None:
        """Compare-and-swap: write `data` at `key` only while the stored version is `expected`
        (None: only while there is no object). The new version when written, None when someone
        else was first."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove the object at `key` (bookkeeping only); no error when there is none."""
        raise NotImplementedError

    def get_many(self, keys: list[str], *, threads: int = 16) -> Iterator[tuple[str, bytes]]:
        """(key, bytes) of each key that exists, fetched in parallel, in the order of `keys`."""
        from concurrent.futures import ThreadPoolExecutor

        def fetch(key: str):
            try:
                return key, self.get(key)
            except KeyError:
                return key, None

        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys)))) as pool:
            for key, data in pool.map(fetch, keys):
                if data is not None:
                    yield key, data

    def check_writable(self) -> None:
        """Fail early, with a StoreAccessError naming the destination, if we cannot write here."""
        raise NotImplementedError

    def check_usable(self) -> None:
        """What a worker proves from its own node before it gets work: credentials found, the
        destination reachable, a conditional put honoured, a read back. StoreAccessError otherwise."""
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
