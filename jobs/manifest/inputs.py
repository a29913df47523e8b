"""Input images of edit rows (`image`, `images`, `mask`), checked before any model loads: each file
exists, is within limits (bytes and pixels) and is an image Pillow opens. Files are looked up once
per run, in parallel (a stat and a header read for a local file, one ranged GET for an s3:// one),
however many rows name them; what is found (version, pixel size) resolves the rows.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MAX_INPUT_BYTES = 50 << 20
MAX_INPUT_SIDE = 8192
MIN_INPUT_SIDE = 16
HEADER_BYTES = 1 << 16  # enough for the header of PNG, WebP and nearly every JPEG
LOOKUP_THREADS = 32
IMAGE_COLUMNS = ("image", "images", "mask")


@dataclass(frozen=True)
class InputInfo:
    """What validation found of one input file; `problem` is the rule it breaks ("" when usable)."""

    uri: str
    version: str = ""
    width: int = 0
    height: int = 0
    problem: str = ""


def resolve_uri(value: str, base: str | None) -> str:
    """An input's absolute location: s3:// as it is, a relative path against the manifest's
    directory (or its s3:// prefix)."""
    from qwen_worker.lora.spec import LoraSpecError, resolve_source

    try:
        return resolve_source(value, base)
    except LoraSpecError:
        return value


def _pixel_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's first bytes, or None when Pillow cannot tell (yet)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _check(uri: str, version: str, nbytes: int, size: tuple[int, int] | None) -> InputInfo:
    if nbytes == 0:
        return InputInfo(uri, version, problem="must not be an empty file")
    if nbytes > MAX_INPUT_BYTES:
        return InputInfo(uri, version, problem=f"must be at most {MAX_INPUT_BYTES >> 20} MB (is {nbytes / 2**20:.0f} MB)")
    if size is None:
        return InputInfo(uri, version, problem="must be an image Pillow opens (PNG, JPEG, WebP, ...)")
    width, height = size
    if not (MIN_INPUT_SIDE <= width <= MAX_INPUT_SIDE and MIN_INPUT_SIDE <= height <= MAX_INPUT_SIDE):
        return InputInfo(uri, version, width, height,
                         problem=f"must be {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE} pixels a side (is {width}x{height})")
    return InputInfo(uri, version, width, height)


def _local(uri: str) -> InputInfo:
    try:
        stat = os.stat(uri)
    except FileNotFoundError:
        return InputInfo(uri, problem="must name an existing file")
    except OSError as exc:
        return InputInfo(uri, problem=f"must be readable ({exc.strerror})")
    if os.path.isdir(uri):
        return InputInfo(uri, problem="must name a file, not a directory")
    version = f"{stat.st_size}-{stat.st_mtime_ns}"
    try:
        with open(uri, "rb") as f:
            head = f.read(HEADER_BYTES)
            size = _pixel_size(head)
            if size is None and stat.st_size > HEADER_BYTES and stat.st_size <= MAX_INPUT_BYTES:
                size = _pixel_size(head + f.read())
    except OSError as exc:
        return InputInfo(uri, version, problem=f"must be readable ({exc.strerror})")
    return _check(uri, version, stat.st_size, size)


class InputIndex:
    """InputInfo of every input a manifest names, looked up once each, in parallel."""

    def __init__(self, store_options: dict | None = None, threads: int = LOOKUP_THREADS):
        from qwen_worker.stores import s3_settings

        self.store_options = s3_settings(store_options)
        self.threads = threads
        self.found: dict[str, InputInfo] = {}
        self._stores: dict = {}
        self._lock = threading.Lock()

    def lookup(self, uris) -> None:
        todo = [uri for uri in dict.fromkeys(uris) if uri not in self.found]
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=min(self.threads, len(todo))) as pool:
            for info in pool.map(self._one, todo):
                self.found[info.uri] = info

    def get(self, uri: str) -> InputInfo:
        return self.found[uri]

    def _one(self, uri: str) -> InputInfo:
        if not uri.startswith("s3://"):
            if "://" in uri:
                return InputInfo(uri, problem="must be a local path or an s3:// URI")
            return _local(uri)
        return self._s3(uri)

    def _s3(self, uri: str) -> InputInfo:
        from qwen_worker.errors import UserError

        bucket, _, key = uri[len("s3://"):].partition("/")
        if not key:
            return InputInfo(uri, problem="must name an object (s3://bucket/key)")
        store = self._store(bucket)
        try:
            etag, nbytes, head = store.head_and_prefix(key, HEADER_BYTES)
        except KeyError:
            return InputInfo(uri, problem="must name an existing object")
        except UserError as exc:  # access denied, no such bucket: one line saying so
            return InputInfo(uri, problem=f"must be readable ({exc})")
        size = _pixel_size(head)
        if size is None and HEADER_BYTES < nbytes <= MAX_INPUT_BYTES:
            size = _pixel_size(store.get(key))
        return _check(uri, etag.strip('"'), nbytes, size)

    def _store(self, bucket: str):
        with self._lock:  # one client per bucket, made once (making one takes ~0.1 s of the GIL)
            store = self._stores.get(bucket)
            if store is None:
                from qwen_worker.stores import open_store

                store = self._stores[bucket] = open_store(f"s3://{bucket}", **self.store_options)
            return store
