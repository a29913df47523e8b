"""LocalStore: the Store interface on a local (or shared, mounted) directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qwen_worker.errors import UserError
from qwen_worker.stores.base import PutOutcome, Store, sha256_hex


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
