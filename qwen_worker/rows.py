"""What the driver sends a worker (RenderRow) and what it gets back (RowResult).

Plain dataclasses so they travel through Ray and into Parquet unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field


class RowStatus(str, enum.Enum):
    DONE = "done"  # every image of the row is stored (rendered now, or found already stored)
    FAILED = "failed"  # gave up after the bounded attempts; the error says why


@dataclass(frozen=True)
class RenderRow:
    """One manifest row, resolved: final prompt text, size, seed and object keys."""

    row_index: int
    id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    true_cfg_scale: float
    seed: int
    keys: tuple[str, ...]  # one object key per image (num_images of them)
    format: str = "png"

    @property
    def shape_key(self) -> tuple:
        """Rows with the same key can share one pipeline call (one micro-batch)."""
        return (self.width, self.height, self.steps, self.true_cfg_scale)

    def image_seeds(self) -> list[int]:
        """Seed of image n is seed + n: image 0 of a row is the row's own seed."""
        return [self.seed + n for n in range(len(self.keys))]


@dataclass
class RowResult:
    row_index: int
    id: str
    status: RowStatus
    keys: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    seed: int = 0
    render_s: float = 0.0
    upload_s: float = 0.0
    attempts: int = 1
    rendered: bool = True  # False when every image was already stored (resume after a crash)
    worker: str = ""
    error: str = ""
    error_kind: str = ""  # for a failure: "row", "worker" or "transient" (qwen_worker.failures)

    def to_record(self) -> dict:
        record = dataclasses.asdict(self)
        record["status"] = self.status.value
        return record

    @classmethod
    def from_record(cls, record: dict) -> "RowResult":
        values = {f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record}
        values["status"] = RowStatus(values["status"])
        values["keys"] = list(values.get("keys") or [])
        values["sha256"] = list(values.get("sha256") or [])
        return cls(**values)
