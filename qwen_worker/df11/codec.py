"""DFloat11 (DF11) on the CPU: a vectorised NumPy/PyTorch encoder and decoder for the on-disk
format of the `dfloat11` package, version 0.5.0 (LeanModels/DFloat11).

The official package encodes in pure Python (one loop step per weight) and decodes only with
its CUDA kernel; `import dfloat11` fails without a CUDA driver. This module writes the same
tensors, byte for byte, and reads them back on any machine.

Format, per compressed *unit* (a module whose name matches a `pattern_dict` regex, for
Qwen-Image `transformer_blocks.N`): the BF16 weights of the unit's linear sub-layers, flattened
and concatenated in `pattern_dict` order, are split into the 8-bit exponent and the sign plus
7-bit mantissa, and the unit's sub-layer weights are replaced by six tensors named
`<unit>.<suffix>`:

- `luts` uint8 [k+1, 256]: k byte-indexed tables that decode the Huffman-coded exponent one byte
  at a time. Table 0 is read with the first byte of a code; an entry >= 240 means "read the next
  byte in table 256 - entry", at most three times; any other entry (and every entry reached on
  the fourth byte) is the exponent. The last row is the code length in bits of each exponent.
- `encoded_exponent` uint8: the exponents' Huffman codes (at most 32 bits each), MSB first,
  back to back. When the bit count is not a multiple of 8, the first bits of dahuffman's
  end-of-file code fill the last byte (zeros after it).
- `sign_mantissa` uint8 [n]: `(sign << 7) | mantissa`, so BF16 = `(sm & 0x80) << 8 | e << 7 | sm & 0x7F`.
- `output_positions` uint8 [4 (B+1)]: uint32 little-endian; entry b is the index of the first weight
  whose code starts in CUDA block b (`threads_per_block * bytes_per_thread` = 4096 bytes of
  stream), then n. (4 B bytes when the last code runs into a block where no code starts and
  the stream ends on a byte boundary: the official encoder writes that too.)
- `gaps` uint8: one 5-bit field per CUDA thread (8 bytes of stream), packed MSB first, padded to
  `threads_per_block * B` fields: the bit offset of the first code that starts in the thread's
  8 bytes.
- `split_positions` int64: cumulative sub-layer sizes without the last (`torch.tensor_split` points).

`config.json` holds `{"dfloat11_config": {"version": "0.5.0", "threads_per_block": [512],
"bytes_per_thread": 8, "pattern_dict": {...}}}`; the official `DFloat11Model.from_pretrained`
reads it and every `*.safetensors` file of the directory. Tensors that are not DF11 buffers keep
their names and are copied into the model as they are.

The Huffman code is the one the official encoder gets from dahuffman 0.4.2 (heap order:
frequency, then the first symbol of a subtree, with dahuffman's end-of-file symbol below every
exponent), with the official fallback for codes longer than 32 bits (the k rarest exponents
counted as 1, k = 2, 3, ... until the longest code fits). The luts are built as the official
`get_luts` builds them: prefix tables ordered by length then first use, each range filled
from its first entry onwards.

Decoding follows the CUDA kernel: every 8-byte window starts at its gap and decodes each code
that starts inside it; window counts, summed, place the output (checked against
`output_positions`). NumPy does it for all windows at once, one step per code within a window.

Assumptions that only a GPU run of the official decoder can confirm:

1. Exponents >= 240 (|x| >= 2**113, inf, NaN). The official encoder gives them ordinary codes,
   and its kernel then reads their lut entries as table pointers: the weights come back wrong
   (its own correctness check fails). Here they share one escape code, padded to 24 bits and
   followed by a 1 to 4-bit index, so they are always resolved at the fourth lut level, which
   the kernel (decode.ptx: three `< 240` tests per code) does not test. That code is not
   complete (its unused branches are filled like the end-of-file code's range), so escape-coded
   units are not byte-identical to anything the official encoder writes. Real weights never hold
   such values; units without them match the official bytes.
2. The official `get_luts` fills the entries of a table that no code starts on with the value
   before them, carried over from the previous table; before table 0's first entry it has no
   value and raises. That happens when dahuffman's end-of-file code is all zeros and at most 8
   bits long, e.g. for any unit whose weights share a single exponent: the official encoder
   cannot compress such units at all. Here those entries take table 0's first value, a real code,
   so the kernel's walk over the bits after the last weight still advances (a length of 0 there
   would never end). Such entries are never used for a real weight.
3. The 32-bit fallback uses `np.argpartition`, as the official encoder does; which of several
   equally rare exponents it picks depends on NumPy's selection algorithm.
4. The official loader sizes shared memory as `threads_per_block*4 + 4 + 2 * (largest weight
   count of one block)`; a unit averaging under ~1.5 bits per exponent code needs more than the
   48 KiB a CUDA launch gets by default. That holds for official files alike; real weights
   (~2.6 bits) need ~30 KiB.
5. The default Qwen-Image `pattern_dict` lists the sub-layers in the order of the project's
   FACTS.md; the order used by the published DFloat11/Qwen-Image-DF11 checkpoint was not seen.
   Decoding reads the order from the checkpoint's own config, so this only matters for
   reproducing that checkpoint's bytes.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen_worker.errors import QwenBatchError

DF11_VERSION = "0.5.0"
DEFAULT_THREADS_PER_BLOCK = 512
DEFAULT_BYTES_PER_THREAD = 8
DF11_SUFFIXES = (
    "luts",
    "encoded_exponent",
    "sign_mantissa",
    "output_positions",
    "gaps",
    "split_positions",
)
CONFIG_FILE = "config.json"

DEFAULT_QWEN_IMAGE_PATTERN: dict[str, list[str]] = {
    r"transformer_blocks\.\d+": [
        "img_mod.1",
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.add_q_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mod.1",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ]
}

_MAX_CODE_BITS = 32
_POINTER_MIN = 240  # lut entries >= this are table pointers on the first three levels
_MAX_PREFIX_TABLES = 256 - _POINTER_MIN + 1  # tables 0..16 are reachable by a pointer
_WINDOW_BITS = 64  # one CUDA thread: BYTES_PER_THREAD (8, fixed in the kernel) bytes
_EOF = -1  # dahuffman's end-of-file symbol: compares below every exponent
_ESCAPE = 240  # stand-in symbol for all exponents >= 240 while building the Huffman code
_ESCAPE_PREFIX_BITS = 24  # escape codes are padded to this, then get their index bits
_ENCODE_CHUNK = 1 << 18  # weights per vectorised encode step
_DECODE_CHUNK = 1 << 15  # windows (CUDA threads) per vectorised decode step


class DF11FormatError(QwenBatchError, ValueError):
    """Weights that DF11 cannot hold, or tensors that are not valid DF11 data."""


# --------------------------------------------------------------------------- Huffman code


@dataclass(frozen=True)
class _Code:
    """A prefix code for the exponents: `table` in dahuffman's order (symbol -> (bits, value),
    `_EOF` included), plus per-exponent arrays for vectorised encoding."""

    table: dict[int, tuple[int, int]]
    lengths: np.ndarray  # uint8[256], 0 for exponents without a code
    values: np.ndarray  # uint64[256]


def _huffman(freqs: Mapping[int, int]) -> dict[int, tuple[int, int]]:
    """dahuffman 0.4.2 `HuffmanCodec.from_frequencies` (with its end-of-file symbol, frequency 1).

    Its heap entries compare by frequency, then by their list of leaves, whose first symbols
    always differ: so the key is (frequency, first leaf), `_EOF` lowest. The popped-first node
    gets bit 0; its leaves come first in the merged list (and so in the table's order)."""
    heap = [(int(f), s, [(s, 0, 0)]) for s, f in freqs.items()]
    if _EOF not in freqs:
        heap.append((1, _EOF, [(_EOF, 0, 0)]))
    heapq.heapify(heap)
    while len(heap) > 1:
        fa, sa, la = heapq.heappop(heap)
        fb, _, lb = heapq.heappop(heap)
        merged = [(s, n + 1, v) for s, n, v in la] + [(s, n + 1, (1 << n) + v) for s, n, v in lb]
        heapq.heappush(heap, (fa + fb, sa, merged))
    return {s: (n, v) for s, n, v in heap[0][2]}


def _huffman_32bit(counter: Mapping[int, int]) -> dict[int, tuple[int, int]]:
    """The official `get_32bit_codec`: while a code is longer than 32 bits, count the k rarest
    symbols (k = 2, 3, ...) as 1 and rebuild."""
    table = _huffman(counter)
    longest = max(bits for bits, _ in table.values())
    keys = np.array(list(counter.keys()))
    freq = np.array(list(counter.values()))
    min_k = 2
    while longest > _MAX_CODE_BITS:
        if min_k >= freq.size:
            raise DF11FormatError(
                f"cannot limit the exponent code to {_MAX_CODE_BITS} bits "
                f"({freq.size} distinct exponents, longest code {longest} bits)"
            )
        rarest = keys[np.argpartition(freq, min_k)[:min_k]]
        min_k += 1
        limited = dict(counter)
        for key in rarest:
            limited[int(key)] = 1
        table = _huffman(limited)
        longest = max(bits for bits, _ in table.values())
    return table


def _build_code(counts: np.ndarray) -> _Code:
    """The exponent code for a unit with these exponent counts (int[256])."""
    present = np.flatnonzero(counts)
    if present.size == 0:
        raise DF11FormatError("cannot encode an empty set of weights")
    high = [int(s) for s in present if s >= _POINTER_MIN]
    normal = {int(s): int(counts[s]) for s in present if s < _POINTER_MIN}
    if not high:
        table = _huffman_32bit(normal)
    else:
        # One escape symbol for all exponents >= 240, frequent enough for a code <= 23 bits
        # (a symbol of probability p gets at most ~1.44 log2(1/p) bits).
        total = int(counts.sum()) + 1
        escape_freq = max(int(counts[high].sum()), -(-total // (1 << 15)))
        base = _huffman_32bit({**normal, _ESCAPE: escape_freq})
        esc_bits, esc_value = base[_ESCAPE]
        if esc_bits > _ESCAPE_PREFIX_BITS:
            raise DF11FormatError(
                f"escape code for exponents >= {_POINTER_MIN} is {esc_bits} bits, "
                f"over {_ESCAPE_PREFIX_BITS}"
            )
        index_bits = max(1, (len(high) - 1).bit_length())
        prefix = esc_value << (_ESCAPE_PREFIX_BITS - esc_bits)
        table = {}
        for symbol, code in base.items():
            if symbol != _ESCAPE:
                table[symbol] = code
                continue
            for i, h in enumerate(high):
                table[h] = (_ESCAPE_PREFIX_BITS + index_bits, (prefix << index_bits) | i)
    lengths = np.zeros(256, dtype=np.uint8)
    values = np.zeros(256, dtype=np.uint64)
    for symbol, (bits, value) in table.items():
        if symbol != _EOF:
            lengths[symbol] = bits
            values[symbol] = value
    return _Code(table=table, lengths=lengths, values=values)


def _build_luts(table: Mapping[int, tuple[int, int]]) -> np.ndarray:
    """The official `get_luts` for a code table, as uint8 [k+1, 256]."""
    codes = [(s, format(v, f"0{b}b")) for s, (b, v) in table.items() if s != _EOF]
    prefixes = [""]
    for _, code in codes:
        prefix = code[: (len(code) - 1) // 8 * 8]
        if prefix not in prefixes:
            prefixes.append(prefix)
    # A complete code always has these already; escape codes (padded with zeros) may not.
    for _, code in codes:
        for cut in range(8, (len(code) - 1) // 8 * 8, 8):
            if code[:cut] not in prefixes:
                prefixes.append(code[:cut])
    prefixes.sort(key=len)
    if len(prefixes) > _MAX_PREFIX_TABLES:
        raise DF11FormatError(
            f"the exponent code needs {len(prefixes)} lookup tables; DF11 addresses at most "
            f"{_MAX_PREFIX_TABLES}"
        )
    index = {p: i for i, p in enumerate(prefixes)}
    luts = np.zeros((len(prefixes) + 1, 256), dtype=np.uint8)
    fill = 0
    for ti, prefix in enumerate(prefixes):
        level = len(prefix) // 8
        entries: dict[int, int] = {}
        for symbol, code in codes:
            if not code.startswith(prefix):
                continue
            if (len(code) - 1) // 8 == level:
                key, value = int(code[level * 8 :].ljust(8, "0"), 2), symbol
                if symbol >= _POINTER_MIN and level < 3:
                    raise DF11FormatError(f"exponent {symbol} would read as a table pointer")
            else:
                key, value = int(code[level * 8 : level * 8 + 8], 2), 256 - index[code[: level * 8 + 8]]
            if entries.get(key, value) != value:
                raise DF11FormatError(f"lookup table {ti} entry {key} is claimed twice")
            entries[key] = value
        if ti == 0:
            fill = entries[min(entries)]  # the official code has no value here (see note 2)
        for i in range(256):
            fill = entries.get(i, fill)
            luts[ti, i] = fill
    for symbol, code in codes:
        luts[-1, symbol] = len(code)
    return luts


def build_luts(exponent_counts: Sequence[int] | np.ndarray) -> torch.Tensor:
    """The `luts` tensor (uint8 [k+1, 256]) of a unit whose exponents occur this often
    (256 counts, index = exponent byte)."""
    counts = np.asarray(exponent_counts, dtype=np.int64)
    if counts.shape != (256,):
        raise DF11FormatError(f"exponent_counts must have 256 entries, got shape {counts.shape}")
    return torch.from_numpy(_build_luts(_build_code(counts).table))


# --------------------------------------------------------------------------- encoding


def _check_geometry(threads_per_block: int, bytes_per_thread: int) -> None:
    if bytes_per_thread != DEFAULT_BYTES_PER_THREAD:
        raise DF11FormatError(
            f"`bytes_per_thread` must be {DEFAULT_BYTES_PER_THREAD} (fixed in the DF11 kernel), "
            f"got: {bytes_per_thread}"
        )
    if threads_per_block < 1 or threads_per_block & (threads_per_block - 1):
        raise DF11FormatError(
            f"`threads_per_block` must be a power of two, got: {threads_per_block}"
        )


def _bf16_bits(weights: Sequence[torch.Tensor]) -> np.ndarray:
    parts = []
    for i, w in enumerate(weights):
        if w.dtype != torch.bfloat16:
            raise DF11FormatError(f"weight {i} must be bfloat16, got: {w.dtype}")
        parts.append(w.detach().reshape(-1).cpu().contiguous().view(torch.int16).numpy())
    return np.concatenate(parts).view(np.uint16) if parts else np.zeros(0, np.uint16)


def _place_codes(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray, aligned: np.ndarray,
                 first_in_word: np.ndarray) -> None:
    """OR codes into uint64 words (bit 63 first). `aligned` holds each code shifted to the top
    of a word; codes are at most 32 bits and sorted by `starts`."""
    word = starts >> np.uint64(6)
    offset = starts & np.uint64(63)
    head = aligned >> offset
    group = np.flatnonzero(first_in_word)
    if group.size == 0 or group[0] != 0:  # the chunk starts inside the previous chunk's word
        group = np.concatenate([[0], group])
    words[word[group]] |= np.bitwise_or.reduceat(head, group)
    spill = np.flatnonzero(offset + lengths > np.uint64(64))
    if spill.size:
        words[word[spill] + 1] |= aligned[spill] << (np.uint64(64) - offset[spill])


def _first_of_run(keys: np.ndarray, previous: int) -> np.ndarray:
    first = np.empty(keys.size, dtype=bool)
    first[0] = int(keys[0]) != previous
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return first


def _encode_exponents(exps: np.ndarray, code: _Code, threads_per_block: int):
    """The official `encode`, vectorised: (encoded_exponent, gaps, output_positions) as uint8."""
    n = exps.size
    lengths = code.lengths.astype(np.uint64)
    aligned_codes = code.values << (np.uint64(64) - lengths)
    total_bits = int(np.bincount(exps, minlength=256).astype(np.int64) @ code.lengths.astype(np.int64))
    block_shift = (_WINDOW_BITS * threads_per_block).bit_length() - 1
    words = np.zeros(total_bits // 64 + 3, dtype=np.uint64)
    gap_parts: list[np.ndarray] = []
    position_parts: list[np.ndarray] = []
    last_window = last_block = -1
    offset = 0
    for lo in range(0, n, _ENCODE_CHUNK):
        e = exps[lo : lo + _ENCODE_CHUNK]
        bits = lengths[e]
        starts = np.cumsum(bits)
        starts -= bits
        starts += np.uint64(offset)
        offset = int(starts[-1] + bits[-1])
        window = starts >> np.uint64(6)
        first = _first_of_run(window, last_window)
        _place_codes(words, starts, bits, aligned_codes[e], first)
        gap_parts.append((starts[first] & np.uint64(63)).astype(np.uint8))
        block = window >> np.uint64(block_shift - 6)
        position_parts.append(np.flatnonzero(_first_of_run(block, last_block)) + lo)
        last_window, last_block = int(window[-1]), int(block[-1])
    if total_bits % 8:
        # dahuffman's end-of-file code starts where the data ends and is cut at the byte.
        eof_bits, eof_value = code.table[_EOF]
        _place_codes(words, np.array([total_bits], dtype=np.uint64), np.array([eof_bits], dtype=np.uint64),
                     np.array([eof_value << (64 - eof_bits)], dtype=np.uint64), np.array([True]))
        if total_bits >> 6 != last_window:
            gap_parts.append(np.array([total_bits & 63], dtype=np.uint8))
            last_window = total_bits >> 6
        if total_bits >> block_shift != last_block:
            position_parts.append(np.array([n]))
            last_block = total_bits >> block_shift
    n_bytes = -(-total_bits // 8)
    encoded = words.astype(">u8").view(np.uint8)[:n_bytes].copy()

    gaps = np.concatenate(gap_parts)
    positions = np.concatenate(position_parts + [np.array([n])])
    # Every window and block up to the last one holds a code start (codes are <= 32 bits).
    if gaps.size != last_window + 1 or positions.size != last_block + 2:
        raise DF11FormatError("internal error: a window or block without a code start")
    if gaps.size and int(gaps.max()) >= 32:
        raise DF11FormatError("internal error: a gap does not fit 5 bits")
    n_blocks = -(-n_bytes // (threads_per_block * DEFAULT_BYTES_PER_THREAD))
    fields = np.zeros(threads_per_block * n_blocks, dtype=np.uint8)
    fields[: gaps.size] = gaps
    gap_bits = (fields[:, None] >> np.arange(4, -1, -1, dtype=np.uint8)) & 1
    packed_gaps = np.packbits(gap_bits.reshape(-1))
    output_positions = positions.astype("<u4").view(np.uint8)
    return encoded, packed_gaps, output_positions


def encode_weights(
    weights: Sequence[torch.Tensor],
    *,
    threads_per_block: int = DEFAULT_THREADS_PER_BLOCK,
    bytes_per_thread: int = DEFAULT_BYTES_PER_THREAD,
) -> dict[str, torch.Tensor]:
    """Encode the BF16 weights of one unit (flattened and concatenated in this order) into
    the six DF11 tensors, keyed by suffix (`luts`, `encoded_exponent`, ...)."""
    _check_geometry(threads_per_block, bytes_per_thread)
    bits = _bf16_bits(weights)
    if bits.size == 0:
        raise DF11FormatError("cannot encode an empty set of weights")
    if bits.size >= 1 << 32:
        raise DF11FormatError(f"a DF11 unit holds fewer than 2**32 weights, got: {bits.size}")
    exps = ((bits >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    del bits
    code = _build_code(np.bincount(exps, minlength=256))
    luts = _build_luts(code.table)
    encoded, gaps, output_positions = _encode_exponents(exps, code, threads_per_block)
    sizes = np.array([w.numel() for w in weights], dtype=np.int64)
    return {
        "luts": torch.from_numpy(luts),
        "encoded_exponent": torch.from_numpy(encoded),
        "sign_mantissa": torch.from_numpy(sign_mantissa),
        "output_positions": torch.from_numpy(output_positions),
        "gaps": torch.from_numpy(gaps),
        "split_positions": torch.from_numpy(np.cumsum(sizes)[:-1].copy()),
    }


def encode_weight(
    w_bf16: torch.Tensor,
    *,
    threads_per_block: int = DEFAULT_THREADS_PER_BLOCK,
    bytes_per_thread: int = DEFAULT_BYTES_PER_THREAD,
) -> dict[str, torch.Tensor]:
    """Encode one BF16 tensor (a unit with a single weight: `split_positions` is empty)."""
    return encode_weights(
        [w_bf16], threads_per_block=threads_per_block, bytes_per_thread=bytes_per_thread
    )


# --------------------------------------------------------------------------- decoding


def _fast_table(luts: np.ndarray) -> np.ndarray:
    """uint64[65536] for the first 16 bits of a code: symbol | length << 8 when the kernel's
    lut walk ends within two bytes, else 1 << 16 (walk all four levels). Lengths of 0 (only in
    garbage after the last weight) count as 1 so every window ends."""
    n_tables = luts.shape[0] - 1
    x = np.arange(1 << 16, dtype=np.int64)
    v0 = luts[0, x >> 8].astype(np.int64)
    pointer = v0 >= _POINTER_MIN
    table = np.minimum(256 - v0, n_tables)  # out-of-range pointers: garbage, never for data
    v1 = np.where(pointer, luts.reshape(-1)[table * 256 + (x & 255)], v0).astype(np.int64)
    unresolved = pointer & (v1 >= _POINTER_MIN)
    lengths = np.maximum(luts[-1, v1].astype(np.int64), 1)
    entries = (v1 | (lengths << 8)).astype(np.uint64)
    entries[unresolved] = 1 << 16
    return entries


def _walk_luts(luts: np.ndarray, x32: np.ndarray) -> np.ndarray:
    """The kernel's full lut walk for 32-bit windows: up to three pointer hops."""
    flat = luts.reshape(-1)
    n_tables = luts.shape[0] - 1
    v = luts[0, (x32 >> 24).astype(np.int64)].astype(np.int64)
    for shift in (16, 8, 0):
        pointer = v >= _POINTER_MIN
        if not pointer.any():
            break
        table = np.minimum(256 - v[pointer], n_tables)
        v[pointer] = flat[table * 256 + ((x32[pointer] >> shift) & 255).astype(np.int64)]
    return v


def _decode_windows(luts: np.ndarray, fast: np.ndarray, hi: np.ndarray, lo: np.ndarray,
                    gap: np.ndarray):
    """Decode every code that starts in each 64-bit window (`hi`, then 32 bits of lookahead
    in `lo`) from its gap on, as each CUDA thread does: (symbols in window order, count per
    window). One step decodes one code in every window that still has one."""
    m = hi.size
    out = np.empty((m, _WINDOW_BITS), dtype=np.uint8)
    counts = np.full(m, _WINDOW_BITS, dtype=np.int64)
    active = np.arange(m)
    q = gap.astype(np.uint64)  # bit offset of the next code in the window
    h = hi
    lo17 = lo >> np.uint64(17)  # the lookahead bits that can reach the first 16 bits of a code
    c48, c63, c64 = np.uint64(48), np.uint64(63), np.uint64(_WINDOW_BITS)
    for step in range(_WINDOW_BITS):
        x16 = ((h << q) >> c48) | (lo17 >> (c63 - q))
        entry = fast[x16]
        if entry.max() >> np.uint64(16):  # a code not resolved by its first two bytes
            slow = np.flatnonzero(entry >> np.uint64(16))
            qs = q[slow]
            x32 = ((h[slow] << qs) >> np.uint64(32)) | ((lo[active[slow]] >> np.uint64(1)) >> (c63 - qs))
            sym = _walk_luts(luts, x32)
            lengths = np.maximum(luts[-1, sym].astype(np.int64), 1)
            entry[slow] = (sym | (lengths << 8)).astype(np.uint64)
        out[active, step] = entry  # the low byte: the exponent
        q += entry >> np.uint64(8)
        if q.max() >= c64:
            keep = q < c64
            counts[active[~keep]] = step + 1
            active, q, h, lo17 = active[keep], q[keep], h[keep], lo17[keep]
            if active.size == 0:
                break
    symbols = out[np.arange(_WINDOW_BITS)[None, :] < counts[:, None]]
    return symbols, counts


def _as_numpy_u8(t: torch.Tensor, name: str) -> np.ndarray:
    if t.dtype != torch.uint8:
        raise DF11FormatError(f"`{name}` must be uint8, got: {t.dtype}")
    return t.detach().cpu().contiguous().reshape(-1).numpy()


def decode_weights(
    df11: Mapping[str, torch.Tensor],
    *,
    threads_per_block: int = DEFAULT_THREADS_PER_BLOCK,
    bytes_per_thread: int = DEFAULT_BYTES_PER_THREAD,
) -> torch.Tensor:
    """Decode one unit's DF11 tensors (keyed by suffix) into its flat BF16 weights."""
    _check_geometry(threads_per_block, bytes_per_thread)
    missing = [s for s in DF11_SUFFIXES[:-1] if s not in df11]
    if missing:
        raise DF11FormatError(f"DF11 tensors missing: {', '.join(missing)}")
    luts_t = df11["luts"]
    if luts_t.dtype != torch.uint8 or luts_t.dim() != 2 or luts_t.shape[1] != 256 or luts_t.shape[0] < 2:
        raise DF11FormatError(
            f"`luts` must be uint8 [k+1, 256] with k >= 1, got: {luts_t.dtype} {tuple(luts_t.shape)}"
        )
    luts = luts_t.detach().cpu().contiguous().numpy()
    encoded = _as_numpy_u8(df11["encoded_exponent"], "encoded_exponent")
    sign_mantissa = _as_numpy_u8(df11["sign_mantissa"], "sign_mantissa")
    gaps = _as_numpy_u8(df11["gaps"], "gaps")
    op_bytes = _as_numpy_u8(df11["output_positions"], "output_positions")
    if op_bytes.size % 4 or op_bytes.size < 8:
        raise DF11FormatError(f"`output_positions` must hold >= 2 uint32, got {op_bytes.size} bytes")
    positions = op_bytes.view("<u4").astype(np.int64)
    n = sign_mantissa.size
    n_bytes = encoded.size
    n_windows = -(-n_bytes // DEFAULT_BYTES_PER_THREAD)
    n_blocks = -(-n_bytes // (threads_per_block * DEFAULT_BYTES_PER_THREAD))
    if positions[-1] != n:
        raise DF11FormatError(
            f"`output_positions` ends at {positions[-1]}, but `sign_mantissa` holds {n} weights"
        )
    if positions.size not in (n_blocks, n_blocks + 1):
        raise DF11FormatError(
            f"`output_positions` has {positions.size} entries for {n_blocks} blocks of stream"
        )
    if gaps.size * 8 < 5 * n_windows:
        raise DF11FormatError(f"`gaps` holds {gaps.size} bytes, {n_windows} windows need 5 bits each")

    gap_bits = np.unpackbits(gaps)[: 5 * n_windows].reshape(n_windows, 5)
    gap = np.packbits(gap_bits, axis=1)[:, 0] >> 3
    padded = np.zeros(DEFAULT_BYTES_PER_THREAD * (n_windows + 1), dtype=np.uint8)
    padded[:n_bytes] = encoded
    words = padded.view(">u8").astype(np.uint64)
    hi, lo = words[:-1], words[1:] >> np.uint64(32)

    fast = _fast_table(luts)
    symbol_parts, count_parts = [], []
    for t0 in range(0, n_windows, _DECODE_CHUNK):
        t1 = t0 + _DECODE_CHUNK
        symbols, counts = _decode_windows(luts, fast, hi[t0:t1], lo[t0:t1], gap[t0:t1])
        symbol_parts.append(symbols)
        count_parts.append(counts)
    exps = np.concatenate(symbol_parts) if symbol_parts else np.zeros(0, np.uint8)
    counts = np.concatenate(count_parts) if count_parts else np.zeros(0, np.int64)

    # The kernel places block b's first weight at output_positions[b]: it must be the number
    # of codes in the windows before it.
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    block_starts = np.arange(positions.size - 1) * threads_per_block
    if exps.size < n or not np.array_equal(cumulative[block_starts], positions[:-1]):
        raise DF11FormatError("`output_positions` and `gaps` do not match the exponent stream")

    e = exps[:n].astype(np.uint16)
    sm = sign_mantissa.astype(np.uint16)
    bits = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def decode_weight(
    df11: Mapping[str, torch.Tensor],
    shape: Sequence[int] | None = None,
    *,
    threads_per_block: int = DEFAULT_THREADS_PER_BLOCK,
    bytes_per_thread: int = DEFAULT_BYTES_PER_THREAD,
) -> torch.Tensor:
    """Decode a single-weight unit, reshaped to `shape` when given."""
    flat = decode_weights(df11, threads_per_block=threads_per_block, bytes_per_thread=bytes_per_thread)
    return flat if shape is None else flat.reshape(tuple(shape))


# --------------------------------------------------------------------------- state dicts


def _geometry_from_config(df11_config: Mapping) -> tuple[int, int, dict[str, list[str]]]:
    for key in ("threads_per_block", "bytes_per_thread", "pattern_dict"):
        if key not in df11_config:
            raise DF11FormatError(f"`dfloat11_config` has no `{key}`")
    tpb = df11_config["threads_per_block"]
    tpb = int(tpb[0]) if isinstance(tpb, (list, tuple)) else int(tpb)
    bpt = int(df11_config["bytes_per_thread"])
    _check_geometry(tpb, bpt)
    return tpb, bpt, {p: list(a) for p, a in df11_config["pattern_dict"].items()}


def _unit_weight_names(unit: str, pattern: Mapping[str, Sequence[str]]) -> list[str]:
    for regex, attrs in pattern.items():
        if re.fullmatch(regex, unit):
            return [f"{unit}.{a}.weight" for a in attrs] if attrs else [f"{unit}.weight"]
    raise DF11FormatError(f"DF11 unit `{unit}` matches no pattern of `pattern_dict`")


def _module_names(keys: Sequence[str]) -> list[str]:
    """Every module path that prefixes a key, in first-seen order (the order of named_modules
    for a model's state dict)."""
    seen: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            seen.setdefault(".".join(parts[:i]), None)
    return list(seen)


def compress_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    pattern: Mapping[str, Sequence[str]] | None = None,
    *,
    threads_per_block: int = DEFAULT_THREADS_PER_BLOCK,
    bytes_per_thread: int = DEFAULT_BYTES_PER_THREAD,
) -> tuple[dict[str, torch.Tensor], dict]:
    """DF11-compress a BF16 state dict as `dfloat11.compress_model` does for the model.

    Each module matching a `pattern` regex (full match) becomes a unit: the weights of its
    listed sub-layers (or its own `weight` for an empty list) are replaced by `<unit>.luts`,
    `.encoded_exponent`, `.sign_mantissa`, `.output_positions`, `.gaps`, `.split_positions`.
    Every other tensor (biases, norms, unmatched layers) is kept as it is. Returns the tensors
    and the `dfloat11_config` for config.json."""
    _check_geometry(threads_per_block, bytes_per_thread)
    pattern = {p: list(a) for p, a in (pattern or DEFAULT_QWEN_IMAGE_PATTERN).items()}
    modules = _module_names(list(state_dict))
    compressed_names: set[str] = set()
    units: list[tuple[str, list[str]]] = []
    unit_names: set[str] = set()
    for regex, attrs in pattern.items():
        matched = [m for m in modules if re.fullmatch(regex, m)]
        if not matched:
            raise DF11FormatError(f"pattern `{regex}` matches no module of the state dict")
        for unit in matched:
            if unit in unit_names:
                raise DF11FormatError(f"module `{unit}` matches more than one pattern")
            names = [f"{unit}.{a}.weight" for a in attrs] if attrs else [f"{unit}.weight"]
            for name in names:
                if name not in state_dict:
                    raise DF11FormatError(f"unit `{unit}` has no weight `{name}`")
                if name in compressed_names:
                    raise DF11FormatError(f"weight `{name}` belongs to two units")
                if state_dict[name].dtype != torch.bfloat16:
                    raise DF11FormatError(f"`{name}` must be bfloat16, got: {state_dict[name].dtype}")
            compressed_names.update(names)
            unit_names.add(unit)
            units.append((unit, names))

    clashes = [f"{u}.{s}" for u in unit_names for s in DF11_SUFFIXES if f"{u}.{s}" in state_dict]
    if clashes:
        raise DF11FormatError(f"the state dict already holds DF11 names: {', '.join(clashes[:5])}")

    out = {k: v for k, v in state_dict.items() if k not in compressed_names}
    for unit, names in units:
        tensors = encode_weights(
            [state_dict[n] for n in names],
            threads_per_block=threads_per_block,
            bytes_per_thread=bytes_per_thread,
        )
        for suffix in DF11_SUFFIXES:
            out[f"{unit}.{suffix}"] = tensors[suffix]
    config = {
        "version": DF11_VERSION,
        "threads_per_block": [threads_per_block],
        "bytes_per_thread": bytes_per_thread,
        "pattern_dict": pattern,
    }
    return out, config


def decompress_state_dict(
    tensors: Mapping[str, torch.Tensor],
    df11_config: Mapping,
    *,
    shapes: Mapping[str, Sequence[int] | torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Restore the BF16 state dict of DF11 tensors, bit for bit.

    DF11 files do not store weight shapes (the official loader takes them from the model):
    pass `shapes` (name -> shape, or a state dict such as `model.state_dict()`) to get the
    weights back in shape; weights without an entry come back flat."""
    tpb, bpt, pattern = _geometry_from_config(df11_config)
    units = [k[: -len(".encoded_exponent")] for k in tensors if k.endswith(".encoded_exponent")]
    df11_names = {f"{u}.{s}" for u in units for s in DF11_SUFFIXES}
    strays = [k for k in tensors if k.rpartition(".")[2] in DF11_SUFFIXES and k not in df11_names]
    if strays:
        raise DF11FormatError(f"DF11 tensors without `encoded_exponent`: {', '.join(strays[:5])}")

    out = {k: v for k, v in tensors.items() if k not in df11_names}
    for unit in units:
        parts = {s: tensors[f"{unit}.{s}"] for s in DF11_SUFFIXES if f"{unit}.{s}" in tensors}
        names = _unit_weight_names(unit, pattern)
        flat = decode_weights(parts, threads_per_block=tpb, bytes_per_thread=bpt)
        split = parts.get("split_positions", torch.zeros(0, dtype=torch.int64)).tolist()
        pieces = torch.tensor_split(flat, split) if split else (flat,)
        if len(pieces) != len(names):
            raise DF11FormatError(
                f"unit `{unit}` holds {len(pieces)} weights, its pattern lists {len(names)}"
            )
        for name, piece in zip(names, pieces):
            if name in out:
                raise DF11FormatError(f"`{name}` is stored both plain and in DF11 unit `{unit}`")
            shape = None if shapes is None else shapes.get(name)
            if shape is not None:
                shape = tuple(shape.shape if isinstance(shape, torch.Tensor) else shape)
                if int(np.prod(shape, dtype=np.int64)) != piece.numel():
                    raise DF11FormatError(
                        f"`{name}` decodes to {piece.numel()} weights, its shape {shape} needs "
                        f"{int(np.prod(shape, dtype=np.int64))}"
                    )
                piece = piece.reshape(shape)
            out[name] = piece.clone()
    return out


# --------------------------------------------------------------------------- files


def save_df11(
    directory: str | Path,
    compressed: Mapping[str, torch.Tensor],
    config: Mapping,
    *,
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Write DF11 tensors and config.json as `DFloat11Model.from_pretrained` reads them (every
    `*.safetensors` of the directory, `dfloat11_config` from config.json). One
    `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
    `max_shard_bytes` each (a larger tensor gets a shard of its own). Returns the files."""
    from safetensors.torch import save_file

    _geometry_from_config(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in directory.glob("*.safetensors"))
    if existing:
        raise FileExistsError(
            f"{directory} already holds {', '.join(existing)}; the DF11 loader would read them too"
        )
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    seen_storage: set[tuple[int, int]] = set()
    for name, tensor in compressed.items():
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key in seen_storage and tensor.numel():
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        seen_storage.add((tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        size = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    paths = []
    for i, shard in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        paths.append(directory / name)
    with open(directory / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump({"dfloat11_config": dict(config)}, f, indent=2)
    return paths


def load_df11_state_dict(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a DF11 directory (ours or a published one): (tensors of every `*.safetensors`,
    `dfloat11_config`). Pass both to `decompress_state_dict` for BF16 weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise DF11FormatError(f"{directory} has no {CONFIG_FILE}")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    df11_config = config.get("dfloat11_config") if isinstance(config, dict) else None
    if not isinstance(df11_config, dict):
        raise DF11FormatError(f"{config_path} has no `dfloat11_config` object")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise DF11FormatError(f"{directory} holds no *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        for name, tensor in load_file(str(path)).items():
            if name in tensors:
                raise DF11FormatError(f"tensor `{name}` is in more than one file of {directory}")
            tensors[name] = tensor
    return tensors, df11_config
