"""Reading s3:// files (manifests) by byte range, as a seekable file for pyarrow."""

from __future__ import annotations

import io


class S3RangeFile(io.RawIOBase):
    """A read-only, seekable view of one S3 object; every read is a ranged GET.

    pyarrow reads a Parquet footer and then only the column chunks of the row groups it needs,
    so a shard never downloads the whole manifest.
    """

    def __init__(self, store, key: str):
        self.store, self.key = store, key
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
        data = self.store.read_range(self.key, self.position, stop)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def open_s3_input(uri: str) -> S3RangeFile:
    """A seekable reader for s3://bucket/key; UserError when it is missing or unreadable."""
    from qwen_worker.errors import UserError
    from qwen_worker.stores.s3 import S3Store, parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    if not key:
        raise UserError(f"not an object URI (no key): {uri}")
    parent, _, name = key.rpartition("/")
    store = S3Store(f"s3://{bucket}/{parent}")
    try:
        return S3RangeFile(store, name)
    except KeyError:
        raise UserError(f"manifest not found: {uri}") from None
