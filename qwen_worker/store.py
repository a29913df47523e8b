"""Where images and job records go: one interface for a local directory and for s3://bucket/prefix.

Keys are relative, '/'-separated ("images/a.png", "_ledger/shard-00000.parquet").
Images are written with `put_new` (never overwrites: exactly-once); the job's own bookkeeping
(ledger, results, progress) with `put`, which replaces atomically.
"""

from __future__ import annotations

import enum
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from qwen_worker.errors import ObjectExistsError, StorageError, UserError


class PutOutcome(str, enum.Enum):
    CREATED = "created"  # we wrote it now
    ALREADY_STORED = "already_stored"  # an identical object was there (our own earlier write)
    REPLACED = "replaced"  # different content was there and overwrite was asked for


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """Interface; see LocalStore and qwen_worker.s3store.S3Store."""

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


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike, *, overwrite: bool = False):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        self.overwrite = overwrite

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise UserError(f"key escapes the output directory: {key!r}")
        return path

    def _write_temp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put_new(self, key, data, *, content_type="application/octet-stream"):
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)  # atomic create-if-absent: never replaces an existing file
            return PutOutcome.CREATED
        except FileExistsError:
            ours, theirs = sha256_hex(data), self.stored_sha256(key)
            if theirs == ours:
                return PutOutcome.ALREADY_STORED
            if not self.overwrite:
                raise self._exists_conflict(key, ours, theirs or "") from None
            os.replace(tmp, path)
            tmp = None
            return PutOutcome.REPLACED
        finally:
            if tmp is not None:
                os.unlink(tmp)

    def put(self, key, data, *, content_type="application/octet-stream"):
        path = self._path(key)
        os.replace(self._write_temp(path, data), path)

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def stored_sha256(self, key):
        try:
            return sha256_hex(self._path(key).read_bytes())
        except FileNotFoundError:
            return None

    def list_keys(self, prefix):
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if not name.startswith(".tmp-"):
                    yield Path(dirpath, name).relative_to(self.root).as_posix()

    def check_writable(self):
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self._write_temp(self.root / ".write-check", b"")
            os.unlink(probe)
        except OSError as exc:
            raise UserError(f"cannot write to output directory {self.root}: {exc.strerror}") from None


def open_store(uri: str, *, overwrite: bool = False, **s3_options) -> Store:
    """A store for a local path or an s3://bucket/prefix URI (`s3_options` go to S3Store)."""
    if uri.startswith("s3://"):
        from qwen_worker.s3store import S3Store

        return S3Store(uri, overwrite=overwrite, **s3_options)
    if "://" in uri:
        raise UserError(f"unsupported output URI {uri!r}: use a local directory or s3://bucket/prefix")
    return LocalStore(uri, overwrite=overwrite)


__all__ = ["LocalStore", "PutOutcome", "Store", "StorageError", "open_store", "sha256_hex"]
