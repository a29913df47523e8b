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
class InputRef:
    """An input image of a row, as validated by the driver: where it is, which version of it (ETag,
    or size and mtime of a local file: a resume notices a changed input), and its size in pixels."""

    uri: str  # absolute local path or s3://bucket/key
    version: str
    width: int
    height: int

    @property
    def aspect(self) -> tuple[int, int]:
        """The aspect ratio as a reduced fraction (what sizes its image tokens)."""
        import math

        divisor = math.gcd(self.width, self.height) or 1
        return self.width // divisor, self.height // divisor


@dataclass(frozen=True)
class LoraRef:
    """A LoRA adapter of a row: its file and scale."""

    uri: str  # absolute local path, s3://bucket/key, hf://owner/repo/file, or builtin:<name>
    scale: float = 1.0

    def describe(self) -> str:
        return f"{self.uri}:{self.scale:g}"


@dataclass(frozen=True)
class RenderRow:
    """One manifest row, resolved: final prompt text, size, seed, object keys, input images, LoRAs."""

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
    inputs: tuple[InputRef, ...] = ()  # input images (edit models, 2.1 references), in order
    mask: InputRef | None = None  # inpainting mask
    loras: tuple[LoraRef, ...] = ()  # sorted: the same set in another order is the same set
    speed: str = "standard"  # or "lightning-8" / "lightning-4" (its LoRA is among `loras`)
    expected_text: tuple[str, ...] = ()  # what --check-text reads back (the `text` column, or the prompt's quotes)

    @property
    def shape_key(self) -> tuple:
        """Rows with the same key can share one pipeline call (one micro-batch): same size, steps,
        CFG, input slots (their aspect ratios), mask or not, LoRA set and scheduler."""
        return (self.width, self.height, self.steps, self.true_cfg_scale, tuple(i.aspect for i in self.inputs),
                self.mask is not None, self.loras, self.speed)

    def input_digest(self) -> str:
        """One string for the versions of every input of the row ("" without inputs): the ledger
        keeps it, so a resume re-renders a row whose input changed."""
        refs = [*self.inputs, *([self.mask] if self.mask is not None else [])]
        return "|".join(f"{ref.uri}@{ref.version}" for ref in refs)

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
    inputs_sha256: list[str] = field(default_factory=list)  # of each input image (and the mask), as read
    loras_sha256: list[str] = field(default_factory=list)  # of each LoRA file, as loaded
    input_digest: str = ""  # RenderRow.input_digest() of what was rendered
    # --check-text, one entry per image (None/empty when not checked): the score of the stored image,
    # what the OCR read, the seed it was rendered with (another than `seed` after a re-roll)
    text_score: list = field(default_factory=list)
    text_read: list[str] = field(default_factory=list)
    text_missing: list[str] = field(default_factory=list)  # expected strings missing from any stored image
    image_seeds: list[int] = field(default_factory=list)
    rerolls: int = 0  # images rendered again with another seed because their text read back too poorly

    def to_record(self) -> dict:
        """Its fields as a flat dict (lists shared, not copied: a ledger row is built from it at once)."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        record["status"] = self.status.value
        return record

    @classmethod
    def from_record(cls, record: dict) -> "RowResult":
        values = {f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record}
        values["status"] = RowStatus(values["status"])
        values["keys"] = list(values.get("keys") or [])
        values["sha256"] = list(values.get("sha256") or [])
        values["inputs_sha256"] = list(values.get("inputs_sha256") or [])
        values["loras_sha256"] = list(values.get("loras_sha256") or [])
        values["input_digest"] = values.get("input_digest") or ""
        for name in ("text_score", "text_read", "text_missing", "image_seeds"):
            values[name] = list(values.get(name) or [])
        values["rerolls"] = int(values.get("rerolls") or 0)
        return cls(**values)
