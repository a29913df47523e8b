"""LoRA adapters and speed presets of rows (`lora`, `speed`, and the job-wide --lora / --speed),
checked before any model loads: each file's safetensors header is read once (a few KB, from a
local path, an s3:// object or the Hugging Face cache) and checked against the preset's
transformer: a known key format, a rank, and every target module present with its shape."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from qwen_worker.lora.builtin import BUILTIN_PREFIX
from qwen_worker.lora.format import LoraFormatError, header_length, layout_from_header, parse_header

SPEEDS = ("standard", "lightning-8", "lightning-4")


class LoraIndex:
    """For each LoRA file a manifest names, "" when it fits the preset's transformer, else why not."""

    def __init__(self, preset, *, store_options: dict | None = None, model_dir: str | None = None):
        from qwen_worker.stores import s3_settings

        self.preset, self.store_options, self.model_dir = preset, s3_settings(store_options), model_dir
        self.found: dict[str, str] = {}
        self._linears = None

    def linears(self) -> dict:
        if self._linears is None:
            from qwen_worker.models.loading import transformer_linears

            self._linears = transformer_linears(self.preset.name)
        return self._linears

    def lookup(self, uris) -> None:
        todo = [uri for uri in dict.fromkeys(uris) if uri not in self.found]
        if not todo:
            return
        self.linears()
        with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
            for uri, problem in zip(todo, pool.map(self._check, todo)):
                self.found[uri] = problem

    def problem(self, uri: str) -> str:
        return self.found[uri]

    def _check(self, uri: str) -> str:
        from qwen_worker.errors import UserError

        if uri.startswith(BUILTIN_PREFIX):
            return "" if self.preset.builtin else "builtin: LoRAs exist only for the tiny models"
        try:
            header = parse_header(self._header_bytes(uri))
            layout_from_header(header, self.linears())
        except LoraFormatError as exc:
            return f"must be a LoRA for model {self.preset.name!r}: {uri} {exc}"
        except UserError as exc:
            return f"must be readable: {exc}"
        return ""

    def _header_bytes(self, uri: str) -> bytes:
        from qwen_worker.errors import UserError

        if uri.startswith("s3://"):
            from qwen_worker.stores import open_store

            bucket, _, key = uri[len("s3://"):].partition("/")
            store = open_store(f"s3://{bucket}", **self.store_options)
            try:
                _etag, size, head = store.head_and_prefix(key, 1 << 16)
            except KeyError:
                raise UserError(f"{uri} does not exist") from None
            needed = header_length(head)
            return head if len(head) >= needed or size <= len(head) else store.read_range(key, 0, needed)
        path = uri
        if uri.startswith("hf://"):
            from qwen_worker.inputs import hf_cached_file

            path = hf_cached_file(uri, self.model_dir)
        if os.path.isdir(path):
            raise UserError(f"{uri} is a directory, not a .safetensors file")
        try:
            with open(path, "rb") as f:
                first = f.read(8)
                return first + f.read(header_length(first) - 8)
        except FileNotFoundError:
            raise UserError(f"{uri} does not exist") from None
        except OSError as exc:
            raise UserError(f"cannot read {uri}: {exc.strerror}") from None


def lightning_source(preset, speed: str, override: str | None) -> str | None:
    """The Lightning LoRA of `speed` for `preset` (--lightning-lora overrides), None when none is known."""
    if override:
        return override
    lightning = preset.lightning.get(speed)
    return lightning.source if lightning is not None else None


def lightning_steps(speed: str) -> int:
    return int(speed.split("-", 1)[1])
