"""Provenance: what every image embeds about how it was made, and how an image is recognised as
a row's own.

Exactly-once rests on this, not on identical bytes: the same row rendered in another micro-batch
(other prompts pad the text embeddings, another batch size after an OOM split or on another GPU)
gives other bytes, but the same identity. On a conditional-put conflict the stored object is kept
as the row's image when its identity is this row's.
"""

from __future__ import annotations

from qwen_worker.rows import RenderRow

# what makes an image this row's (a subset of what is embedded); inputs, mask, loras and speed
# appear only in rows that have them, so images of text-to-image rows read as before
ROW_FIELDS = ("generator", "model", "manifest_sha256", "id", "image", "seed", "prompt", "loras", "speed")
INPUT_FIELDS = ("inputs", "mask")  # which version of each input file: a changed input makes a stale image
IDENTITY_FIELDS = ROW_FIELDS + INPUT_FIELDS


def image_provenance(row: RenderRow, index: int, *, model: str, manifest_sha256: str, extra: dict | None = None) -> dict:
    """The record embedded in image `index` of `row` (no output location: same bytes anywhere).
    `extra`: what only the worker knows (the sha256 of each input and LoRA file it read)."""
    record = {
        "generator": "qwen-batch",
        "model": model,
        "manifest_sha256": manifest_sha256,
        "id": row.id,
        "image": index,
        "seed": row.image_seeds()[index],
        "prompt": row.prompt,
        "negative_prompt": row.negative_prompt,
        "width": row.width,
        "height": row.height,
        "steps": row.steps,
        "true_cfg_scale": row.true_cfg_scale,
    }
    if row.inputs:
        record["inputs"] = [f"{ref.uri}@{ref.version}" for ref in row.inputs]
    if row.mask is not None:
        record["mask"] = f"{row.mask.uri}@{row.mask.version}"
    if row.loras:
        record["loras"] = [ref.describe() for ref in row.loras]
    if row.speed != "standard":
        record["speed"] = row.speed
    record.update(extra or {})
    return record


def is_own(found: dict | None, expected: dict) -> bool:
    """Whether an image whose embedded record is `found` is the image `expected` describes."""
    return bool(found) and all(found.get(name) == expected.get(name) for name in IDENTITY_FIELDS)


def is_stale_own(found: dict | None, expected: dict) -> bool:
    """Whether `found` is this row's image made from other versions of its input files (an input
    changed since): to be rendered again and replaced."""
    return (bool(found) and all(found.get(name) == expected.get(name) for name in ROW_FIELDS)
            and any(found.get(name) != expected.get(name) for name in INPUT_FIELDS))


def stored_own_image(store, key: str, expected: dict) -> bytes | None:
    """The bytes stored at `key` when they carry `expected`'s identity; None when nothing is
    there or it is someone else's. Store errors propagate."""
    from qwen_worker.encode import read_provenance

    try:
        data = store.get(key)
    except KeyError:
        return None
    return data if is_own(read_provenance(data), expected) else None
