"""Text-fidelity of images that already exist: image files, s3:// objects, or a job's output.

`resolve_targets` turns the command line's paths into what to check, failing with one UserError
before any OCR when a path is missing or not an image; `check_targets` then reads and scores
each image in turn (the OCR is qwen_worker.textcheck's).

What each image should show:
  - `--expect TEXT` (repeatable), when given, for every path;
  - else, for a job's output (a directory or s3:// prefix holding results.parquet), each done
    row's `text` column when it has one and it is not null, else the quoted strings of its
    `prompt`; rows expecting no text are skipped (counted in `skipped`);
  - else, for an image file or object, the prompt (and `text`) its embedded qwen-batch
    provenance records; an image without either is an error (pass --expect).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from qwen_worker.errors import UserError

RESULTS_KEY = "results.parquet"  # jobs.results.RESULTS_KEY, without importing pyarrow at start-up
TEXT_COLUMNS = ("text", "manifest.text")


@dataclass
class Target:
    """One image to check: where it is shown as, how to get its bytes, and what it should show
    (None: from its embedded provenance)."""

    label: str
    load: Callable[[], bytes]
    expected: list[str] | None
    id: str | None = None


@dataclass
class Targets:
    images: list[Target] = field(default_factory=list)
    outputs: list[tuple[str, object]] = field(default_factory=list)  # (label, store) of job outputs
    expect: list[str] | None = None
    skipped: int = 0  # output rows with no expected text


def resolve_targets(paths: list[str], expect: list[str] | None) -> Targets:
    """Check every path exists and each image file decodes, before any OCR. UserError otherwise."""
    from qwen_worker.textcheck.ocr import UnreadableImageError, load_image

    targets = Targets(expect=list(expect) if expect else None)
    for path in paths:
        if path.startswith("s3://"):
            _resolve_s3(path, targets)
        elif "://" in path:
            raise UserError(f"unsupported path {path!r}: use a local file or directory, or s3://bucket/key")
        else:
            _resolve_local(path, targets)
    for target in targets.images:  # decode each explicitly named image now: a bad one fails before any OCR
        data = target.load()
        try:
            load_image(data)
        except UnreadableImageError as exc:
            raise UserError(f"{target.label}: {exc}") from None
        target.load = (lambda data=data: data)
        if target.expected is None:
            target.expected = _expected_from_provenance(data, target.label)
    return targets


def _resolve_local(path: str, targets: Targets) -> None:
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / RESULTS_KEY).is_file():
            raise UserError(f"{path}: a directory without {RESULTS_KEY}, so not a job output (name image files, or an output)")
        from qwen_worker.stores import open_store

        targets.outputs.append((path, open_store(str(p))))
        return
    if not p.exists():
        raise UserError(f"{path}: no such file or directory")

    def load(p=p, path=path) -> bytes:
        try:
            return p.read_bytes()
        except OSError as exc:
            raise UserError(f"{path}: cannot read it: {exc.strerror or exc}") from None

    targets.images.append(Target(label=path, load=load, expected=targets.expect))


def _resolve_s3(uri: str, targets: Targets) -> None:
    from qwen_worker.stores import open_store

    store = open_store(uri)
    if store.exists(RESULTS_KEY):
        targets.outputs.append((uri.rstrip("/"), store))
        return
    bucket_and_key = uri[len("s3://"):]
    if "/" not in bucket_and_key.strip("/") or uri.endswith("/"):
        raise UserError(f"{uri}: no {RESULTS_KEY} there, so not a job output (name image objects, or an output)")
    parent, name = uri.rsplit("/", 1)
    parent_store = open_store(parent)

    def load(store=parent_store, name=name, uri=uri) -> bytes:
        try:
            return store.get(name)
        except KeyError:
            raise UserError(f"{uri}: no such object (and no job output there)") from None

    targets.images.append(Target(label=uri, load=load, expected=targets.expect))


def _expected_from_provenance(data: bytes, label: str) -> list[str]:
    from qwen_worker.encode import read_provenance
    from qwen_worker.textcheck import expected_texts

    record = read_provenance(data) or {}
    try:
        expected = expected_texts(record.get("prompt"), record.get("text"))
    except ValueError as exc:
        raise UserError(f"{label}: its embedded provenance has a bad `text`: {exc}") from None
    if not expected:
        why = "its embedded prompt quotes no text" if record.get("prompt") else "it carries no qwen-batch prompt"
        raise UserError(f"{label}: no expected text ({why}): pass --expect TEXT")
    return expected


def output_targets(label: str, store, expect: list[str] | None, counts: Targets) -> Iterator[Target]:
    """The images of the done rows of a job output, each with its row's expected text; rows with
    none are counted in `counts.skipped`."""
    import pyarrow.parquet as pq

    from qwen_worker.textcheck import expected_texts

    try:
        table = pq.read_table(io.BytesIO(store.get(RESULTS_KEY)))
    except KeyError:
        raise UserError(f"{label}: no {RESULTS_KEY}") from None
    except Exception as exc:  # pyarrow's errors for a file that is not Parquet
        raise UserError(f"{label}/{RESULTS_KEY}: not a readable Parquet file: {exc}") from None
    for needed in ("id", "status", "keys"):
        if needed not in table.column_names:
            raise UserError(f"{label}/{RESULTS_KEY}: has no `{needed}` column, so not a qwen-batch results file")
    text_column = next((name for name in TEXT_COLUMNS if name in table.column_names), None)
    columns = ["id", "status", "keys"] + [c for c in ("prompt", text_column) if c and c in table.column_names]
    for batch in table.select(columns).to_batches():
        for row in batch.to_pylist():
            if row["status"] != "done":
                continue
            if expect:
                expected = list(expect)
            else:
                try:
                    expected = expected_texts(row.get("prompt"), row.get(text_column) if text_column else None)
                except ValueError as exc:
                    raise UserError(f"{label}: row {row['id']!r}: {exc}") from None
            if not expected:
                counts.skipped += len(row["keys"] or [])
                continue
            for key in row["keys"] or []:
                yield Target(label=f"{label}/{key}", load=_store_loader(store, key, f"{label}/{key}"), expected=expected,
                             id=row["id"])


def _store_loader(store, key: str, label: str) -> Callable[[], bytes]:
    def load() -> bytes:
        try:
            return store.get(key)
        except KeyError:
            raise UserError(f"{label}: the row is done but its image is not there") from None

    return load


def iter_checks(targets: Targets) -> Iterator[tuple[Target, object]]:
    """(target, TextCheck) for each image: the named images first, then each output's."""
    from qwen_worker.textcheck import check_image
    from qwen_worker.textcheck.ocr import UnreadableImageError

    def all_targets():
        yield from targets.images
        for label, store in targets.outputs:
            yield from output_targets(label, store, targets.expect, targets)

    for target in all_targets():
        data = target.load()
        try:
            yield target, check_image(data, target.expected)
        except UnreadableImageError as exc:
            raise UserError(f"{target.label}: {exc}") from None
