"""Image keys, and the checks that no two rows write the same file on any real file system.

Keys are built on whole columns (`images/<output_key or id>[-n].<ext>`). Uniqueness is checked
in memory linear in rows: every id and key is kept as an 8-byte hash (computed with numpy over
the Arrow buffers), plus the hash of each key's lower-case form and of each of its folders; one
sort finds the candidates at the end, and a second pass over four columns confirms them with the
real strings (a hash collision is never reported). Three rules:

- two rows must not have the same id, nor write the same key;
- two keys must not differ only in letter case (`A.png` / `a.png` are one file on case-insensitive
  file systems and the S3 gateways in front of them);
- a key must not be a folder of another key (`x.png` and `x.png/y.png`: a file and a directory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jobs.manifest.rules import EXTENSIONS, format_value, row_error, who

_MULTIPLIER = np.uint64(0x100000001B3)
_LENGTH_MIX = np.uint64(0x9E3779B97F4A7C15)
_CHUNK_BYTES = 1 << 18  # strings are hashed in chunks of about this many bytes: temporaries stay small
_tables: list = []  # [powers, inverse powers] of the multiplier, shared by every chunk


def _power_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    """M**i and M**-i (mod 2**64; M is odd, so it has an inverse) for i < size, at least. Tables for
    a chunk and a string of 4 KiB are kept (8 MB); larger ones, for one longer string, are not."""
    kept = _CHUNK_BYTES + 4097
    if _tables and len(_tables[0]) >= size:
        return _tables[0], _tables[1]
    with np.errstate(over="ignore"):
        inverse = np.uint64(pow(int(_MULTIPLIER), -1, 2**64))
        tables = [np.cumprod(np.concatenate([[np.uint64(1)], np.full(max(size, kept) - 1, m, dtype=np.uint64)]),
                             dtype=np.uint64) for m in (_MULTIPLIER, inverse)]
    if size <= kept:
        _tables[:] = tables
    return tables[0], tables[1]


def _buffers(array):
    """(offsets int64 relative to the data, data uint8) of a string array without nulls."""
    import pyarrow as pa

    if pa.types.is_large_string(array.type):
        width, kind = 8, np.int64
    else:
        array = array.cast(pa.string())
        width, kind = 4, np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=kind, count=len(array) + 1, offset=array.offset * width)
    data = array.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    return offsets.astype(np.int64), data


def _chunks(array):
    """(starts, ends, sums, segment, powers_inverse) per chunk of whole strings: string i of the chunk is
    segment[starts[i]:ends[i]], and its polynomial hash (byte j of a string weighs M**j) is
    (sums[ends[i]] - sums[starts[i]]) * powers_inverse[starts[i]], uint64, wrapping."""
    import pyarrow.compute as pc

    offsets, data = _buffers(pc.fill_null(array, ""))
    first = 0
    while first < len(offsets) - 1:
        last = max(int(np.searchsorted(offsets, offsets[first] + _CHUNK_BYTES, side="right")) - 1, first + 1)
        base, total = offsets[first], offsets[last] - offsets[first]
        powers, inverse = _power_tables(total + 1)
        segment = data[base: base + total]
        sums = np.zeros(total + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.cumsum(np.multiply(segment, powers[:total], dtype=np.uint64), out=sums[1:])
        yield offsets[first:last] - base, offsets[first + 1:last + 1] - base, sums, segment, inverse
        first = last


def _hash(sums, start, end, inverse) -> np.ndarray:
    """The hashes (int64) of the pieces [start, end) of one chunk."""
    with np.errstate(over="ignore"):
        return ((sums[end] - sums[start]) * inverse[start] ^ (end - start).astype(np.uint64) * _LENGTH_MIX).view(np.int64)


def string_hashes(array) -> np.ndarray:
    """An 8-byte hash of each string (int64); equal strings have equal hashes."""
    parts = [_hash(sums, starts, ends, inverse) for starts, ends, sums, _segment, inverse in _chunks(array)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def hashes_and_folders(array, skip_first: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash of each string, hash of each of its folders, the string each folder is of). Folders
    are the parts before each '/', but the first `skip_first` ('images/' is every key's)."""
    full, folders, owners = [], [], []
    done = 0
    for starts, ends, sums, segment, inverse in _chunks(array):
        full.append(_hash(sums, starts, ends, inverse))
        slashes = np.flatnonzero(segment == ord("/"))
        owner = np.searchsorted(starts, slashes, side="right") - 1
        if skip_first and len(slashes):  # rank of each slash within its string
            keep = np.arange(len(slashes)) - np.searchsorted(owner, owner, side="left") >= skip_first
            slashes, owner = slashes[keep], owner[keep]
        folders.append(_hash(sums, starts[owner], slashes, inverse))
        owners.append(owner + done)
        done += len(starts)
    if not full:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(full), np.concatenate(folders), np.concatenate(owners)


# --------------------------------------------------------------------------------------------
# keys


def image_keys_array(ids, output_key, fmt, num_images: np.ndarray):
    """list<string>: the object keys of each row's images, relative to the output root."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(ids)
    ext = pa.nulls(n, pa.string())
    stem = output_key
    for name, extension in EXTENSIONS.items():
        is_format = pc.equal(fmt, name)
        ext = pc.if_else(is_format, extension, ext)
        strip = pc.and_(is_format, pc.ends_with(output_key, pattern=extension))
        stem = pc.if_else(strip, pc.utf8_slice_codeunits(output_key, 0, -len(extension)), stem)
    stem = pc.coalesce(stem, ids, "")
    ext = pc.fill_null(ext, ".png")
    counts = np.clip(num_images, 1, 8).astype(np.int64)
    repeat = np.repeat(np.arange(n), counts)
    starts = np.cumsum(counts) - counts
    position = np.arange(len(repeat)) - np.repeat(starts, counts)
    multi = pa.array(np.repeat(counts > 1, counts))
    suffix = pc.if_else(multi, pc.binary_join_element_wise("-", pc.cast(pa.array(position), pa.string()), ""), "")
    take = pa.array(repeat)
    flat = pc.binary_join_element_wise("images/", stem.take(take), suffix, ext.take(take), "")
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def row_keys(row_id: str, output_key: str | None, fmt: str | None, num_images: int | None) -> list[str]:
    """The keys of one row (the same rule as image_keys_array, for a handful of rows)."""
    import pyarrow as pa

    keys = image_keys_array(pa.array([row_id]), pa.array([output_key], pa.string()), pa.array([fmt or "png"]),
                            np.array([num_images or 1]))
    return keys[0].as_py()


# --------------------------------------------------------------------------------------------
# uniqueness


def key_hashes(resolved) -> tuple[np.ndarray, ...]:
    """What the uniqueness checks keep of one resolved batch, as arrays in KeyIndex's field order:
    hashes of its ids, image keys, their lower-case forms and their folders, with their rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = np.arange(resolved.start, resolved.start + resolved.size, dtype=np.int64)
    # ids that can be valid (at most 128 characters, ASCII): a longer one is already an error
    has_id = np.asarray(pc.fill_null(pc.less_equal(pc.binary_length(resolved.ids), 128), False).to_numpy(
        zero_copy_only=False), dtype=bool)
    id_hash = string_hashes(resolved.ids.filter(pa.array(has_id)))
    keys = resolved.keys.filter(pa.array(resolved.valid))
    key_rows = np.repeat(rows[resolved.valid], np.asarray(pc.list_value_length(keys).to_numpy(zero_copy_only=False),
                                                         dtype=np.int64))
    flat = keys.flatten()
    lower_hashes, folders, owner = hashes_and_folders(pc.utf8_lower(flat))
    return (id_hash, rows[has_id].astype(np.int32), string_hashes(flat), lower_hashes, key_rows.astype(np.int32),
            folders, key_rows[owner].astype(np.int32))


@dataclass
class KeyIndex:
    """Hashes of every id and key seen, by row, for the checks at the end (batches added in row order)."""

    id_hash: list = field(default_factory=list)
    id_row: list = field(default_factory=list)
    key_hash: list = field(default_factory=list)
    lower_hash: list = field(default_factory=list)
    key_row: list = field(default_factory=list)
    folder_hash: list = field(default_factory=list)
    folder_row: list = field(default_factory=list)

    def add(self, hashes: tuple[np.ndarray, ...]) -> None:
        """Keep one batch's `key_hashes`."""
        for name, array in zip(("id_hash", "id_row", "key_hash", "lower_hash", "key_row", "folder_hash", "folder_row"),
                               hashes):
            getattr(self, name).append(array)

    def candidates(self) -> tuple[dict, set[int]]:
        """Groups of rows whose hashes repeat, by check, and every row they name."""
        def cat(name: str, dtype=np.int64, keep: bool = False):
            parts = getattr(self, name)
            joined = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
            if not keep:
                setattr(self, name, [])  # each list is read once: free it as it goes
            return joined

        groups = {"id": _repeated(cat("id_hash"), cat("id_row", np.int32))}
        key_rows = cat("key_row", np.int32)
        key_hashes, lower = cat("key_hash"), cat("lower_hash")
        sorted_lower = np.sort(lower)
        if np.array_equal(key_hashes, lower):  # no upper case anywhere: the case check has nothing to add
            groups["key"], groups["case"] = _repeated(lower, key_rows, sorted_lower), []
        else:
            groups["key"], groups["case"] = _repeated(key_hashes, key_rows), _repeated(lower, key_rows, sorted_lower)
        del key_hashes
        folders, folder_rows = cat("folder_hash"), cat("folder_row", np.int32)
        hits = np.flatnonzero(_members(folders, sorted_lower))  # folders that are also a key
        pairs = []
        if len(hits):
            keys_of: dict[int, list[int]] = {}
            for position in np.flatnonzero(_members(lower, np.unique(folders[hits]))).tolist():
                keys_of.setdefault(int(lower[position]), []).append(int(key_rows[position]))
            for index in hits.tolist():
                pairs.extend((int(folder_rows[index]), key_row) for key_row in keys_of[int(folders[index])])
        groups["folder"] = pairs
        rows = {r for check in ("id", "key", "case") for group in groups[check] for r in group}
        rows.update(r for pair in pairs for r in pair)
        return groups, rows


def _members(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Whether each of `values` is in `sorted_set` (sorted ascending): a mask."""
    if not len(sorted_set) or not len(values):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def _repeated(hashes: np.ndarray, rows: np.ndarray, sorted_hashes: np.ndarray | None = None) -> list[list[int]]:
    """Row groups sharing a hash (rows ascending), linear in rows for any repetition: one sort of the
    hashes finds the repeated values, and only their rows are grouped."""
    if len(hashes) < 2:
        return []
    if sorted_hashes is None:
        sorted_hashes = np.sort(hashes)
    same = sorted_hashes[1:] == sorted_hashes[:-1]
    if not same.any():
        return []
    member = np.flatnonzero(_members(hashes, np.unique(sorted_hashes[1:][same])))
    order = np.argsort(hashes[member], kind="stable")  # rows were added in ascending order: they stay so
    hashes, rows = hashes[member][order], rows[member][order]
    boundary = np.flatnonzero(hashes[1:] != hashes[:-1]) + 1
    starts = np.concatenate([[0], boundary])
    ends = np.concatenate([boundary, [len(hashes)]])
    return [rows[start:end].tolist() for start, end in zip(starts.tolist(), ends.tolist())]


def collision_errors(groups: dict, strings: dict[int, tuple[str | None, list[str]]]) -> list[tuple[int, str]]:
    """(row, message) for every confirmed collision. `strings`: row -> (id, keys) of the rows the
    candidate groups name."""
    errors: list[tuple[int, str]] = []
    for group in groups["id"]:
        by_id: dict[str, int] = {}
        for row in group:  # rows ascending
            row_id = strings[row][0]
            if row_id in by_id:
                errors.append((row, row_error(row, row_id, "id", f"must be unique (row {by_id[row_id]} has it too)", row_id)))
            else:
                by_id[row_id] = row
    reported = {row for row, _ in errors}
    seen_pairs: set[tuple[int, int]] = set()
    for group in groups["key"]:
        first_by_key: dict[str, int] = {}
        for row in dict.fromkeys(group):
            row_id, keys = strings[row]
            for key in keys:
                first = first_by_key.setdefault(key, row)
                if first == row or (first, row) in seen_pairs:
                    continue
                seen_pairs.add((first, row))
                if strings[first][0] != row_id:  # rows sharing an id are reported as duplicate ids
                    errors.append((row, row_error(row, row_id, "output_key",
                                                  f"must not repeat an image key of row {first} (id {strings[first][0]!r})",
                                                  key)))
    for group in groups["case"]:
        first_by_lower: dict[str, tuple[int, str]] = {}
        for row in dict.fromkeys(group):
            row_id, keys = strings[row]
            for key in keys:
                first, first_key = first_by_lower.setdefault(key.lower(), (row, key))
                if first == row or first_key == key or (first, row) in seen_pairs:
                    continue
                seen_pairs.add((first, row))
                errors.append((row, row_error(
                    row, row_id, "output_key",
                    f"must not differ only in letter case from {first_key!r} of row {first} (id {strings[first][0]!r}): "
                    "case-insensitive file systems and S3 gateways store them as one file", key)))
    for folder_row, key_row in groups["folder"]:
        if folder_row == key_row:
            continue
        folder_keys, keys = strings[folder_row][1], strings[key_row][1]
        for inner in folder_keys:
            for key in keys:
                if inner.lower().startswith(key.lower() + "/"):
                    later, earlier = max(folder_row, key_row), min(folder_row, key_row)
                    if (earlier, later) in seen_pairs:
                        continue
                    seen_pairs.add((earlier, later))
                    file_row, dir_row = key_row, folder_row
                    message = (f"{who(later, strings[later][0])}: `output_key` must not put a file where row {earlier} "
                               f"(id {strings[earlier][0]!r}) needs a folder or the reverse: row {file_row} writes "
                               f"{format_value(key)} and row {dir_row} writes {format_value(inner)} inside it, "
                               f"got: {format_value(inner if later == dir_row else key)}")
                    errors.append((later, message))
    del reported
    return errors
