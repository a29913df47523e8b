"""Seeds: a row without a `seed` gets one derived from (job seed, id), the same on every machine."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(job_seed: int, row_id: str) -> int:
    """A row's seed when the manifest gives none: a pure function of (job seed, id)."""
    digest = hashlib.sha256(f"{job_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2  # < 2^62: seed + n stays in range


def derive_seeds(job_seed: int, ids, rows: np.ndarray) -> np.ndarray:
    """derive_seed for the ids at the True entries of `rows` (0 elsewhere)."""
    seeds = np.zeros(len(ids), dtype=np.int64)
    values = ids.to_pylist()
    for offset in np.flatnonzero(rows):
        if values[offset] is not None:
            seeds[offset] = derive_seed(job_seed, values[offset])
    return seeds
