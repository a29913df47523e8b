"""LocalStore: the Store interface on a local (or shared, mounted) directory.

An image is written to a temporary file, fsynced, then linked into place (`os.link` never
replaces: create-if-absent), and the directory is fsynced so the image survives a power loss
together with its ledger entry. Where hard links are not supported (CIFS, some FUSE mounts) a
short-lived exclusive lock file (`O_CREAT|O_EXCL`) guards a check-then-rename instead.
Compare-and-swap writes (`put_versioned`, for job.json and the driver lease) use the same lock.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

from qwen_worker.errors import StoreAccessError, UserError
from qwen_worker.stores.base import PutOutcome, Store, sha256_hex

# errno values of a file system that has no hard links
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}
LOCK_STALE_S = 30.0  # a lock file older than this was left by a crashed writer


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike, *, overwrite: bool = False, hard_links: bool | None = None):
        """`hard_links`: None = find out on first write; False = use the lock-file fallback."""
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        self.overwrite = overwrite
        self.hard_links = hard_links

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise UserError(f"key escapes the output directory: {key!r}")
        return path

    def _write_temp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        # not ending in the object's extension: a file a killed writer leaves is never taken for an image
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _create_from_temp(self, tmp: str, path: Path) -> bool:
        """Move `tmp` to `path` unless `path` exists (never replaces). True when created; the
        directory entry is fsynced."""
        if self.hard_links is not False:
            try:
                os.link(tmp, path)
                self.hard_links = True
                _fsync_dir(path.parent)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                self.hard_links = False  # this file system has no hard links: lock file from now on
        with _Lock(path):
            if path.exists():
                return False
            os.rename(tmp, path)
        _fsync_dir(path.parent)
        return True

    def put_new(self, key, data, *, content_type="application/octet-stream", sha256=None):
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            if self._create_from_temp(tmp, path):
                return PutOutcome.CREATED
            ours, theirs = sha256 or sha256_hex(data), self.stored_sha256(key)
            if theirs == ours:
                return PutOutcome.ALREADY_STORED
            if not self.overwrite:
                raise self._exists_conflict(key, ours, theirs or "")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            return PutOutcome.REPLACED
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def put(self, key, data, *, content_type="application/octet-stream"):
        path = self._path(key)
        os.replace(self._write_temp(path, data), path)
        _fsync_dir(path.parent)

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise KeyError(key) from None

    def get_versioned(self, key):
        data = self.get(key)
        return data, sha256_hex(data)

    def put_versioned(self, key, data, *, expected):
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            if expected is None:
                return sha256_hex(data) if self._create_from_temp(tmp, path) else None
            with _Lock(path):
                try:
                    current = sha256_hex(path.read_bytes())
                except FileNotFoundError:
                    return None
                if current != expected:
                    return None
                os.replace(tmp, path)
            _fsync_dir(path.parent)
            return sha256_hex(data)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def delete(self, key):
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def stored_sha256(self, key):
        try:
            return sha256_hex(self._path(key).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list_keys(self, prefix):
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if not name.startswith(".tmp-") and not name.endswith(_Lock.SUFFIX):
                    yield Path(dirpath, name).relative_to(self.root).as_posix()

    def check_writable(self):
        """The directory exists (or can be made) and takes files; finds out whether it has hard
        links (the fallback is used where it has not)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self._write_temp(self.root / ".write-check", b"")
            try:
                linked = self.root / f".write-check-{os.getpid()}"
                try:
                    os.link(probe, linked)
                    os.unlink(linked)
                    self.hard_links = True
                except OSError as exc:
                    if exc.errno not in _NO_LINKS:
                        raise
                    self.hard_links = False
            finally:
                os.unlink(probe)
        except OSError as exc:
            raise StoreAccessError(f"cannot write to output directory {self.root}: {exc.strerror}") from None

    def check_usable(self):
        """Write a file exclusively, read it back, and see a second exclusive write refused."""
        self.check_writable()
        key = f".ready-check-{os.getpid()}-{time.monotonic_ns()}"
        try:
            if not self.put_versioned(key, b"ready", expected=None) or self.get(key) != b"ready":
                raise StoreAccessError(f"output directory {self.root} did not keep a file written to it")
            if self.put_versioned(key, b"again", expected=None):
                raise StoreAccessError(f"output directory {self.root} replaced a file on an exclusive create")
        except OSError as exc:
            raise StoreAccessError(f"cannot use output directory {self.root}: {exc.strerror}") from None
        finally:
            self.delete(key)

    def worker_options(self) -> dict:
        return {"hard_links": self.hard_links} if self.hard_links is False else {}


class _Lock:
    """An exclusive lock file beside `path` (O_CREAT|O_EXCL); a lock older than LOCK_STALE_S was
    left by a crashed writer and is broken."""

    SUFFIX = ".qb-lock"

    def __init__(self, path: Path, timeout_s: float = 60.0):
        self.lock = path.with_name(path.name + self.SUFFIX)
        self.timeout_s = timeout_s

    def __enter__(self):
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                os.close(os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return self
            except FileExistsError:
                try:
                    if time.time() - self.lock.stat().st_mtime > LOCK_STALE_S:
                        os.unlink(self.lock)
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise StoreAccessError(f"lock file {self.lock} is held for more than {self.timeout_s:.0f} s") from None
                time.sleep(0.01)

    def __exit__(self, *exc_info):
        try:
            os.unlink(self.lock)
        except FileNotFoundError:
            pass


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
