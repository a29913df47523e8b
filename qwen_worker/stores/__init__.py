"""Where images and job records go: one interface (base.Store) for a local directory (local.LocalStore)
and for s3://bucket/prefix (s3.S3Store)."""

from __future__ import annotations

from qwen_worker.errors import StorageError, UserError
from qwen_worker.stores.base import PutOutcome, Store, sha256_hex
from qwen_worker.stores.local import LocalStore


def open_store(uri: str, *, overwrite: bool = False, **s3_options) -> Store:
    """A store for a local path or an s3://bucket/prefix URI (`s3_options` go to S3Store)."""
    if uri.startswith("s3://"):
        from qwen_worker.stores.s3 import S3Store

        return S3Store(uri, overwrite=overwrite, **s3_options)
    if "://" in uri:
        raise UserError(f"unsupported output URI {uri!r}: use a local directory or s3://bucket/prefix")
    return LocalStore(uri, overwrite=overwrite)


def s3_settings(options: dict | None) -> dict:
    """The endpoint settings among a store's worker options (what another bucket is opened with)."""
    return {key: value for key, value in (options or {}).items() if key in ("endpoint_url", "region")}


__all__ = ["s3_settings", "LocalStore", "PutOutcome", "Store", "StorageError", "open_store", "sha256_hex"]
