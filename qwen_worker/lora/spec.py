"""What a row asks for: LoRA adapters, each a source and a scale.

A source is a path relative to the manifest, an absolute local path, an `s3://bucket/key` URI, or
a Hugging Face file `hf://owner/repo/file.safetensors` resolved from the local cache (offline, like
the models). A scale follows the last `:` (`brand-x.safetensors:0.8`; default 1.0).
"""

from __future__ import annotations

import math
import os

from qwen_worker.rows import LoraRef

MAX_ADAPTERS_PER_ROW = 8
SCALE_LIMIT = 10.0


class LoraSpecError(ValueError):
    """A LoRA spec that cannot be read; the message is the rule it breaks."""


def split_spec(text: str) -> tuple[str, float]:
    """(source, scale) of one `source[:scale]`."""
    text = text.strip()
    if not text:
        raise LoraSpecError("must name a LoRA file (source[:scale])")
    source, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail:
        try:
            scale = float(tail)
        except ValueError:
            if not tail.endswith(".safetensors") and not text.startswith("builtin:"):
                raise LoraSpecError(f"scale after ':' must be a number, got {tail!r}") from None
        else:
            source = head
    if not math.isfinite(scale) or abs(scale) > SCALE_LIMIT:
        raise LoraSpecError(f"scale must be a number between -{SCALE_LIMIT:g} and {SCALE_LIMIT:g}")
    if not source.endswith(".safetensors") and not source.startswith("builtin:"):
        raise LoraSpecError("must be a .safetensors file")
    return source, scale


def resolve_source(source: str, base: str | None) -> str:
    """An absolute URI for `source`: s3://, hf:// and builtin: as they are; a relative path is
    relative to `base` (the manifest's directory, or its s3:// prefix; None: the working directory)."""
    if source.startswith(("s3://", "hf://", "builtin:")):
        if source.startswith("hf://") and source.count("/") < 4:
            raise LoraSpecError("an hf:// source is hf://owner/repo/file.safetensors")
        return source
    if os.path.isabs(source):
        return os.path.normpath(source)
    if base and base.startswith("s3://"):
        parts = [p for p in f"{base.rstrip('/')}/{source}"[len("s3://"):].split("/") if p not in ("", ".")]
        resolved: list[str] = []
        for part in parts:
            if part == "..":
                if len(resolved) <= 1:
                    raise LoraSpecError("a relative path must stay inside the manifest's bucket")
                resolved.pop()
            else:
                resolved.append(part)
        return "s3://" + "/".join(resolved)
    return os.path.normpath(os.path.join(base or os.getcwd(), source))


def base_of(manifest: str) -> str:
    """The directory (or s3:// prefix) relative paths in a manifest are relative to."""
    if manifest.startswith("s3://"):
        return manifest.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(manifest))


def parse_specs(value, base: str | None) -> tuple[LoraRef, ...]:
    """The adapters of one `lora` value: a string (one spec, or several separated by ';' or ',')
    or a list of strings. Sorted, so the same set in another order is the same set."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [p for p in str(value).replace(",", ";").split(";")]
    items = [item for item in items if item is not None and str(item).strip()]
    if len(items) > MAX_ADAPTERS_PER_ROW:
        raise LoraSpecError(f"at most {MAX_ADAPTERS_PER_ROW} adapters per row")
    refs = []
    for item in items:
        source, scale = split_spec(str(item))
        refs.append(LoraRef(resolve_source(source, base), scale))
    uris = [ref.uri for ref in refs]
    repeated = next((uri for uri in uris if uris.count(uri) > 1), None)
    if repeated is not None:
        raise LoraSpecError(f"names {repeated} twice (give one scale)")
    return tuple(sorted(refs, key=lambda ref: (ref.uri, ref.scale)))
