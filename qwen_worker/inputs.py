"""Reading what rows name besides their prompt, on the worker: input images (edit models, 2.1
references, masks) and LoRA files, from a local path, an `s3://` URI (the output's bucket or
another one, through the same endpoint settings and retries as the output store), or the Hugging
Face cache (`hf://owner/repo/file`, offline like the models)."""

from __future__ import annotations

import os
import threading

from qwen_worker.errors import UserError


def hf_cached_file(uri: str, model_dir: str | None = None) -> str:
    """The local path of `hf://owner/repo/file`: `<model_dir>/lightning/<file name>` when there, else
    the Hugging Face cache (downloaded only when not offline). UserError saying how to get it."""
    owner, repo, filename = _hf_parts(uri)
    if model_dir:
        candidate = os.path.join(model_dir.split(os.pathsep)[0], "lightning", os.path.basename(filename))
        if os.path.isfile(candidate):
            return candidate
    from huggingface_hub import hf_hub_download

    from qwen_worker.real_model import _hub_offline

    try:
        return hf_hub_download(f"{owner}/{repo}", filename, local_files_only=_hub_offline())
    except Exception as exc:
        raise UserError(
            f"{uri} is not in the Hugging Face cache and cannot be downloaded here ({type(exc).__name__}): run "
            f"`hf download {owner}/{repo} {filename}` with the same HF_HOME where there is network, or put it at "
            f"<--model-dir>/lightning/{os.path.basename(filename)}, or give a local or s3:// path instead"
        ) from None


def _hf_parts(uri: str) -> tuple[str, str, str]:
    parts = uri[len("hf://"):].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise UserError(f"an hf:// source is hf://owner/repo/file.safetensors, got: {uri!r}")
    return parts[0], parts[1], parts[2]


class InputReader:
    """Reads the bytes of input URIs for one worker; one S3 store per bucket, made on first use."""

    def __init__(self, store_options: dict | None = None, model_dir: str | None = None):
        from qwen_worker.stores import s3_settings

        self.store_options = s3_settings(store_options)
        self.model_dir = model_dir
        self._stores: dict[str, object] = {}
        self._lock = threading.Lock()

    def read(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://"):].partition("/")
            try:
                return self._store(bucket).get(key)
            except KeyError:
                raise UserError(f"input {uri} does not exist (any more)") from None
        path = hf_cached_file(uri, self.model_dir) if uri.startswith("hf://") else uri
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise UserError(f"input {uri} does not exist (any more)") from None
        except OSError as exc:
            raise UserError(f"cannot read input {uri}: {exc.strerror or exc}") from None

    def _store(self, bucket: str):
        with self._lock:
            store = self._stores.get(bucket)
            if store is None:
                from qwen_worker.stores import open_store

                store = self._stores[bucket] = open_store(f"s3://{bucket}", **self.store_options)
            return store


def open_image(data: bytes, uri: str, mode: str):
    """A decoded PIL image in `mode` (RGB, RGBA, L); UserError for bytes Pillow cannot open."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"input {uri} is not an image Pillow can open: {exc}") from None
    if mode == "RGB" and image.mode in ("RGBA", "LA", "P"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(mode)
