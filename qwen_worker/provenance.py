"""Provenance: what every image embeds about how it was made, and how an image is recognised as
a row's own.

Exactly-once rests on this, not on identical bytes: the same row rendered in another micro-batch
(other prompts pad the text embeddings, another batch size after an OOM split or on another GPU)
gives other bytes, but the same identity. On a conditional-put conflict the stored object is kept
as the row's image when its identity is this row's.
"""

from __future__ import annotations

from qwen_worker.rows import RenderRow

# what makes an image this row's (a subset of what is embedded)
IDENTITY_FIELDS = ("generator", "model", "manifest_sha256", "id", "image", "seed", "prompt")


def image_provenance(row: RenderRow, index: int, *, model: str, manifest_sha256: str) -> dict:
    """The record embedded in image `index` of `row` (no output location: same bytes anywhere)."""
    return {
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


def is_own(found: dict | None, expected: dict) -> bool:
    """Whether an image whose embedded record is `found` is the image `expected` describes."""
    return bool(found) and all(found.get(name) == expected.get(name) for name in IDENTITY_FIELDS)


def stored_own_image(store, key: str, expected: dict) -> bytes | None:
    """The bytes stored at `key` when they carry `expected`'s identity; None when nothing is
    there or it is someone else's. Store errors propagate."""
    from qwen_worker.encode import read_provenance

    try:
        data = store.get(key)
    except KeyError:
        return None
    return data if is_own(read_provenance(data), expected) else None
