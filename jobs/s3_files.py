"""Reading s3:// files (manifests) by byte range, as a seekable file for pyarrow."""

from __future__ import annotations

import io


class S3RangeFile(io.RawIOBase):
    """A read-only, seekable view of one S3 object; every read is a ranged GET.

    pyarrow reads a Parquet footer and then only the column chunks of the row groups it needs,
    so a shard never downloads the whole manifest.
    """

    def __init__(self, store, key: str, *, version: str | None = None):
        """`version`: the object's ETag; every read is pinned to it (If-Match), so an object
        replaced while a job reads it is an error instead of a mix of two manifests."""
        self.store, self.key, self.version = store, key, version
        self.length = store.size(key)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        stop = self.length if size is None or size < 0 else min(self.length, self.position + size)
        if stop <= self.position:
            return b""
        data = self.store.read_range(self.key, self.position, stop, if_match=self.version)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _parent_store(uri: str):
    from qwen_worker.errors import UserError
    from qwen_worker.stores.s3 import S3Store, parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    if not key:
        raise UserError(f"not an object URI (no key): {uri}")
    parent, _, name = key.rpartition("/")
    return S3Store(f"s3://{bucket}/{parent}"), name


def open_s3_input(uri: str, *, version: str | None = None) -> S3RangeFile:
    """A seekable reader for s3://bucket/key (pinned to ETag `version` when given); UserError
    when it is missing or unreadable."""
    from qwen_worker.errors import UserError

    store, name = _parent_store(uri)
    try:
        return S3RangeFile(store, name, version=version)
    except KeyError:
        raise UserError(f"manifest not found: {uri}") from None


def s3_object_version(uri: str) -> str:
    """The ETag of s3://bucket/key now (what a job pins its manifest reads to)."""
    from qwen_worker.errors import UserError

    store, name = _parent_store(uri)
    try:
        return store.etag(name)
    except KeyError:
        raise UserError(f"manifest not found: {uri}") from None
