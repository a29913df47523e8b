"""The DF11 CPU codec: bit-exact round trips, the official 0.5.0 bytes, the CUDA kernel's reading
of what we write, and a tiny Qwen-Image transformer through save and load."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from qwen_worker.df11.codec import (
    DEFAULT_QWEN_IMAGE_PATTERN,
    DF11_SUFFIXES,
    DF11FormatError,
    build_luts,
    compress_state_dict,
    decode_weight,
    decode_weights,
    decompress_state_dict,
    encode_weight,
    encode_weights,
    load_df11_state_dict,
    save_df11,
)

MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------ helpers


def bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


def bits_of(w: torch.Tensor) -> np.ndarray:
    return w.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)


def normal_bf16(n: int, seed: int, scale: float = 0.02) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * scale).to(torch.bfloat16)


def golden_bits(n: int, salt: int) -> np.ndarray:
    """Platform-independent BF16 bit patterns (integer hashing only), exponents 100..124
    weighted towards the top like trained weights."""
    x = (np.arange(n, dtype=np.uint64) + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    r = (x >> np.uint64(40)).astype(np.int64)
    k = sum((r >= (1 << j)).astype(np.int64) for j in range(24))
    exponent = (100 + k).astype(np.uint16)
    sign = (x & np.uint64(1)).astype(np.uint16)
    mantissa = ((x >> np.uint64(1)) & np.uint64(0x7F)).astype(np.uint16)
    return (sign << 15) | (exponent << 7) | mantissa


def assert_round_trip(weights: list[torch.Tensor], threads_per_block: int = 512) -> dict:
    df11 = encode_weights(weights, threads_per_block=threads_per_block)
    decoded = decode_weights(df11, threads_per_block=threads_per_block)
    expected = np.concatenate([bits_of(w) for w in weights])
    got = bits_of(decoded)
    assert decoded.dtype == torch.bfloat16
    assert got.shape == expected.shape
    mismatches = np.flatnonzero(got != expected)
    assert mismatches.size == 0, f"{mismatches.size} weights differ, first at {mismatches[:5]}"
    return df11


def kernel_decode(df11: dict, threads_per_block: int) -> list[int]:
    """A scalar port of the DF11 CUDA kernel (dfloat11 0.5.0 decode.ptx): per thread, read the
    5-bit gap, decode every code starting in its 8 bytes with the lut walk (three `< 240` tests,
    the fourth byte's entry taken as is), then place the block's codes from output_positions.
    Bytes past the stream read as 0 (the kernel leaves them unset)."""
    luts = df11["luts"].numpy()
    lut = luts.reshape(-1).tolist()
    lens_base = 256 * (luts.shape[0] - 1)
    codes = df11["encoded_exponent"].numpy().tobytes()
    sign_mantissa = df11["sign_mantissa"].numpy().tolist()
    positions = df11["output_positions"].numpy().view("<u4").tolist()
    gaps = df11["gaps"].numpy().tolist()
    n, n_bytes = len(sign_mantissa), len(codes)
    out: list[int | None] = [None] * n

    def decode_one(buf: int) -> int:
        d = lut[buf >> 56]
        for shift in (48, 40, 32):
            if d < 240:
                break
            d = lut[256 * (256 - d) + ((buf >> shift) & 0xFF)]
        return d

    n_blocks = -(-n_bytes // (threads_per_block * 8))
    for block in range(n_blocks):
        per_thread = []
        for tid in range(threads_per_block):
            g = block * threads_per_block + tid
            chunk = codes[g * 8 : g * 8 + 12].ljust(12, b"\0")
            i = g * 5 // 8
            pair = (gaps[i] << 8) | (gaps[i + 1] if i + 1 < len(gaps) else 0)
            gap = (pair >> (11 - g * 5 % 8)) & 0x1F
            buf, free, symbols = (int.from_bytes(chunk[:8], "big") << gap) & MASK64, gap, []
            while True:  # compiled as do-while; the gap is < 32
                d = decode_one(buf)
                symbols.append(d)
                length = lut[lens_base + d]
                assert length > 0, f"thread {g}: a code of length 0, the kernel would never stop"
                buf, free = (buf << length) & MASK64, free + length
                if free >= 32:
                    break
            buf |= int.from_bytes(chunk[8:12], "big") << (free - 32)
            free -= 32
            while 4 + free // 8 < 8:
                d = decode_one(buf)
                symbols.append(d)
                length = lut[lens_base + d]
                assert length > 0, f"thread {g}: a code of length 0, the kernel would never stop"
                buf, free = (buf << length) & MASK64, free + length
            per_thread.append(symbols)
        index = positions[block]
        end = min(positions[block + 1] if block + 1 < len(positions) else n, n)
        for symbols in per_thread:
            for d in symbols:
                if index < end:
                    sm = sign_mantissa[index]
                    out[index] = ((sm & 0x80) << 8) | (d << 7) | (sm & 0x7F)
                index += 1
        if block + 1 < n_blocks:
            assert index == positions[block + 1], f"block {block} decodes {index - positions[block]} codes"
    return out


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 63, 4095, 4097, 33_333, 200_003])
def test_round_trip_normal_weights(n):
    df11 = assert_round_trip([normal_bf16(n, seed=n)])
    assert df11["sign_mantissa"].numel() == n


@pytest.mark.parametrize("threads_per_block", [1, 8, 64])
def test_round_trip_small_cuda_blocks(threads_per_block):
    df11 = assert_round_trip([normal_bf16(20_001, seed=threads_per_block)], threads_per_block)
    positions = df11["output_positions"].numpy().view("<u4")
    assert positions.size > 3  # several CUDA blocks, each placed by output_positions


def test_round_trip_every_bf16_bit_pattern():
    """All 65536 patterns: ±0, subnormals, ±inf, every NaN payload, the largest finite values."""
    bits = np.random.default_rng(0).permutation(np.arange(1 << 16, dtype=np.uint32)).astype(np.uint16)
    assert_round_trip([bf16_from_bits(bits)])
    assert_round_trip([bf16_from_bits(bits[:1000]), bf16_from_bits(bits[1000:])], threads_per_block=8)


def test_round_trip_special_values_among_normal_weights():
    special = np.array(
        [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x7FFF, 0x0001, 0x807F,
         0x0080, 0x7F7F, 0xFF7F, 0x7800, 0x3F80],
        dtype=np.uint16,
    )
    base = bits_of(normal_bf16(50_000, seed=1)).copy()
    positions = np.random.default_rng(1).choice(base.size, size=400, replace=False)
    base[positions] = np.resize(special, positions.size)
    df11 = assert_round_trip([bf16_from_bits(base)])
    lens = df11["luts"][-1].numpy()
    # Exponents >= 240 (here 0xFF: inf/NaN, 0xF0) get escape codes resolved at the 4th lut level.
    assert lens[0xFF] > 24 and lens[0xF0] > 24 and lens.max() <= 32


def test_round_trip_single_distinct_exponent():
    rng = np.random.default_rng(2)
    bits = (127 << 7) | rng.integers(0, 128, 10_007).astype(np.uint16) | (rng.integers(0, 2, 10_007) << 15).astype(np.uint16)
    df11 = assert_round_trip([bf16_from_bits(bits)], threads_per_block=8)
    assert tuple(df11["luts"].shape) == (2, 256)  # one table and the lengths
    assert df11["luts"][-1, 127].item() == 1
    assert df11["encoded_exponent"].numel() == -(-10_007 // 8)


def test_round_trip_tiny_and_huge_exponent_ranges():
    rng = np.random.default_rng(3)
    mant = rng.integers(0, 1 << 8, 30_000).astype(np.uint16)
    two = ((rng.integers(120, 122, 30_000).astype(np.uint16)) << 7) | (mant & 0x807F)
    df11 = assert_round_trip([bf16_from_bits(two)])
    assert np.count_nonzero(df11["luts"][-1].numpy()) == 2
    every_finite = (rng.integers(0, 255, 30_000).astype(np.uint16) << 7) | (mant & 0x807F)
    df11 = assert_round_trip([bf16_from_bits(every_finite)], threads_per_block=64)
    assert np.count_nonzero(df11["luts"][-1].numpy()) == 255


def test_round_trip_codes_longer_than_24_bits():
    """Fibonacci counts (1, 2, 3, 5, ...) make every merge take the next exponent: a Huffman
    code 26 bits deep, decoded through four lut levels."""
    fib = [1, 2]
    while len(fib) < 26:
        fib.append(fib[-1] + fib[-2])
    rng = np.random.default_rng(4)
    exps = rng.permutation(np.repeat(np.arange(100, 126), fib[::-1])).astype(np.uint16)
    bits = (exps << 7) | (rng.integers(0, 1 << 16, exps.size).astype(np.uint16) & 0x807F)
    df11 = assert_round_trip([bf16_from_bits(bits[:100_000]), bf16_from_bits(bits[100_000:])])
    lens = df11["luts"][-1].numpy()
    assert lens.max() == 26
    assert df11["luts"].shape[0] >= 5  # tables for prefixes of 0, 8, 16 and 24 bits, and lengths
    assert df11["split_positions"].tolist() == [100_000]


def test_code_lengths_are_limited_to_32_bits():
    """40 Fibonacci-weighted exponents want a 40-bit code; the official fallback caps it."""
    fib = [1, 2]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.zeros(256, dtype=np.int64)
    counts[90:130] = fib
    luts = build_luts(counts)
    lens = luts[-1].numpy()
    assert lens.max() == 32
    assert np.count_nonzero(lens) == 40
    # the same bytes as dfloat11 0.5.0 get_32bit_codec + get_luts (computed with the package)
    assert tuple(luts.shape) == (5, 256)
    assert hashlib.sha256(luts.numpy().tobytes()).hexdigest()[:32] == "36085a08faa7e8fd377475931d7e522f"


def test_luts_order_tables_as_the_official_encoder():
    """Ten lookup tables (prefixes of 0, 8 and 16 bits): their order and the pointers to them are
    the bytes dfloat11 0.5.0 writes for these counts (computed with the package)."""
    counts = np.array([1 + (s * 2654435761) % 4099 for s in range(240)] + [0] * 16, dtype=np.int64)
    counts[120:130] *= 100_000
    luts = build_luts(counts)
    assert tuple(luts.shape) == (11, 256)
    pointers = luts[:-1].numpy()
    assert set(np.unique(pointers[pointers >= 240]).tolist()) == set(range(247, 256))  # tables 1..9
    assert hashlib.sha256(luts.numpy().tobytes()).hexdigest()[:32] == "c2dc8d55816d5b983d6a356cd66137d1"


# ------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize(
    ("weights", "threads_per_block"),
    [
        ([normal_bf16(70_001, seed=5)], 512),
        ([normal_bf16(3_000, seed=6), normal_bf16(5_001, seed=7, scale=3.0)], 8),
        ([bf16_from_bits(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16))], 64),
    ],
)
def test_structure_matches_the_format(weights, threads_per_block):
    df11 = encode_weights(weights, threads_per_block=threads_per_block)
    assert list(df11) == list(DF11_SUFFIXES)
    n = sum(w.numel() for w in weights)
    bits = np.concatenate([bits_of(w) for w in weights])
    exps = (bits >> 7) & 0xFF

    luts = df11["luts"]
    assert luts.dtype == torch.uint8 and luts.dim() == 2 and luts.shape[1] == 256
    assert 2 <= luts.shape[0] <= 18  # at most 17 tables reachable by a pointer (255..240)
    lens = luts[-1].numpy().astype(np.int64)
    present = np.unique(exps)
    assert (lens[present] >= 1).all() and lens.max() <= 32
    assert (np.delete(lens, present) == 0).all()

    assert df11["sign_mantissa"].dtype == torch.uint8 and tuple(df11["sign_mantissa"].shape) == (n,)
    assert (df11["sign_mantissa"].numpy() == (((bits >> 8) & 0x80) | (bits & 0x7F))).all()

    encoded = df11["encoded_exponent"]
    total_bits = int(lens[exps].sum())
    assert encoded.dtype == torch.uint8 and tuple(encoded.shape) == (-(-total_bits // 8),)

    # code start of every weight, from the lengths alone
    starts = np.concatenate([[0], np.cumsum(lens[exps])[:-1]])
    block_bits = threads_per_block * 64
    n_blocks = -(-encoded.numel() // (threads_per_block * 8))

    op = df11["output_positions"]
    assert op.dtype == torch.uint8 and op.dim() == 1 and op.numel() % 4 == 0
    positions = op.numpy().view("<u4")
    assert positions[0] == 0 and positions[-1] == n and (np.diff(positions.astype(np.int64)) >= 0).all()
    assert positions.size in (n_blocks, n_blocks + 1)
    first_in_block = np.searchsorted(starts, np.arange(positions.size - 1) * block_bits)
    assert (positions[:-1] == first_in_block).all()

    gaps = df11["gaps"]
    assert gaps.dtype == torch.uint8 and gaps.numel() == threads_per_block * n_blocks * 5 // 8
    fields = np.packbits(np.unpackbits(gaps.numpy()).reshape(-1, 5), axis=1)[:, 0] >> 3
    assert fields.size == threads_per_block * n_blocks and (fields < 32).all()
    windows = starts >> 6
    first = np.flatnonzero(np.concatenate([[True], windows[1:] != windows[:-1]]))
    assert (fields[windows[first]] == (starts[first] & 63)).all()
    assert (fields[windows[-1] + 2 :] == 0).all()  # padding fields

    split = df11["split_positions"]
    assert split.dtype == torch.int64
    assert split.tolist() == np.cumsum([w.numel() for w in weights])[:-1].tolist()


def test_matches_the_official_encoder_bytes():
    """sha256 of each tensor as written by dfloat11 0.5.0 (`get_codec`, `get_32bit_codec`,
    `get_luts`, `encode_weights`) for the same weights, computed with the package."""
    golden = {
        "luts": ((3, 256), "bc8e4ae170872ba36f78a0f69816e5ba"),
        "encoded_exponent": ((12526,), "6cdb7599cb66f30db667c4f15a89a3e7"),
        "sign_mantissa": ((50000,), "8e9828d96910ac17a4ff6bda9d66c52a"),
        "output_positions": ((20,), "8af312f78764537478bba8b72d2c0567"),
        "gaps": ((1280,), "936dfe08d8ec9bd9800bdf5fb24baed9"),
        "split_positions": ((1,), "ae9475d31b535bec000c9bfc7abc79b6"),
    }
    bits = golden_bits(50_000, 1)
    df11 = encode_weights([bf16_from_bits(bits[:20_000]), bf16_from_bits(bits[20_000:])])
    got = {k: (tuple(v.shape), hashlib.sha256(v.numpy().tobytes()).hexdigest()[:32]) for k, v in df11.items()}
    assert got == golden

    golden_small = {
        "luts": ((3, 256), "a82ee2e5c12b308e9cb269237b5350bf"),
        "encoded_exponent": ((750,), "8b56db7ba81d4507cdf8db3f8027c010"),
        "sign_mantissa": ((3001,), "626bda7de30846b8675bb21e108b1000"),
        "output_positions": ((52,), "44e8b5031d8fc8584569818adc313c15"),
        "gaps": ((60,), "3ba21d50fd9631ecc8ecfa7690712124"),
        "split_positions": ((0,), "e3b0c44298fc1c149afbf4c8996fb924"),
    }
    df11 = encode_weight(bf16_from_bits(golden_bits(3_001, 2)), threads_per_block=8)
    got = {k: (tuple(v.shape), hashlib.sha256(v.numpy().tobytes()).hexdigest()[:32]) for k, v in df11.items()}
    assert got == golden_small


@pytest.mark.parametrize(
    ("bits", "threads_per_block"),
    [
        (golden_bits(3_001, 2), 8),
        (golden_bits(20_000, 3), 512),
        (np.random.default_rng(8).permutation(np.arange(1 << 16, dtype=np.uint32)).astype(np.uint16)[:20_000], 16),
        ((127 << 7) | np.arange(999, dtype=np.uint16) % 128, 4),  # single exponent
        (golden_bits(5, 4), 1),
        (golden_bits(37, 5), 2),
    ],
)
def test_cuda_kernel_reads_what_we_write(bits, threads_per_block):
    df11 = encode_weight(bf16_from_bits(bits), threads_per_block=threads_per_block)
    assert kernel_decode(df11, threads_per_block) == bits.astype(np.int64).tolist()


# ------------------------------------------------------------------------------------ errors


def test_decoder_rejects_inconsistent_tensors():
    df11 = encode_weight(normal_bf16(40_000, seed=9), threads_per_block=8)
    bad = dict(df11)
    positions = df11["output_positions"].numpy().view("<u4").copy()
    positions[3] += 1
    bad["output_positions"] = torch.from_numpy(positions.view(np.uint8))
    with pytest.raises(DF11FormatError, match="output_positions"):
        decode_weights(bad, threads_per_block=8)
    bad = dict(df11, gaps=df11["gaps"][:10])
    with pytest.raises(DF11FormatError, match="gaps"):
        decode_weights(bad, threads_per_block=8)
    bad = dict(df11, sign_mantissa=df11["sign_mantissa"][:-1])
    with pytest.raises(DF11FormatError, match="holds 39999 weights"):
        decode_weights(bad, threads_per_block=8)


def test_encoder_rejects_what_df11_cannot_hold():
    with pytest.raises(DF11FormatError, match="must be bfloat16"):
        encode_weight(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(DF11FormatError, match="empty"):
        encode_weight(torch.zeros(0, dtype=torch.bfloat16))
    with pytest.raises(DF11FormatError, match="bytes_per_thread"):
        encode_weight(torch.ones(4, dtype=torch.bfloat16), bytes_per_thread=4)


def test_decode_weight_restores_the_shape():
    w = normal_bf16(6 * 7, seed=10).reshape(6, 7)
    restored = decode_weight(encode_weight(w), w.shape)
    assert restored.shape == (6, 7) and torch.equal(restored.view(torch.int16), w.view(torch.int16))


# ------------------------------------------------------------------------------------ state dicts


def toy_state_dict() -> dict[str, torch.Tensor]:
    sd = {}
    for b in range(2):
        sd[f"blocks.{b}.q.weight"] = normal_bf16(48, seed=b).reshape(8, 6)
        sd[f"blocks.{b}.q.bias"] = normal_bf16(8, seed=b + 10)
        sd[f"blocks.{b}.out.weight"] = normal_bf16(30, seed=b + 20).reshape(6, 5)
        sd[f"blocks.{b}.norm.weight"] = torch.ones(6, dtype=torch.float32)
    sd["head.weight"] = normal_bf16(12, seed=99).reshape(3, 4)
    return sd


def test_compress_state_dict_replaces_only_pattern_weights(tmp_path):
    sd = toy_state_dict()
    pattern = {r"blocks\.\d+": ["q", "out"], r"head": []}
    compressed, config = compress_state_dict(sd, pattern)
    assert config == {"version": "0.5.0", "threads_per_block": [512], "bytes_per_thread": 8,
                      "pattern_dict": {r"blocks\.\d+": ["q", "out"], "head": []}}
    expected = {f"blocks.{b}.{s}" for b in range(2) for s in DF11_SUFFIXES} | {f"head.{s}" for s in DF11_SUFFIXES}
    expected |= {f"blocks.{b}.{k}" for b in range(2) for k in ("q.bias", "norm.weight")}
    assert set(compressed) == expected
    assert compressed["blocks.1.split_positions"].tolist() == [48]
    assert compressed["head.split_positions"].numel() == 0
    assert compressed["blocks.0.norm.weight"] is sd["blocks.0.norm.weight"]

    paths = save_df11(tmp_path / "df11", compressed, config, max_shard_bytes=200)
    assert len(paths) > 1 and all(p.name.startswith("model-") for p in paths)
    loaded, loaded_config = load_df11_state_dict(tmp_path / "df11")
    assert loaded_config == config
    restored = decompress_state_dict(loaded, loaded_config, shapes=sd)
    assert set(restored) == set(sd)
    for name, tensor in sd.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape, name
        assert torch.equal(restored[name].view(torch.int16) if tensor.dtype == torch.bfloat16 else restored[name],
                           tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor), name
    flat = decompress_state_dict(loaded, loaded_config)
    assert flat["blocks.0.q.weight"].shape == (48,)


def test_compress_state_dict_rejects_bad_input(tmp_path):
    sd = toy_state_dict()
    with pytest.raises(DF11FormatError, match="matches no module"):
        compress_state_dict(sd, {r"layers\.\d+": ["q"]})
    with pytest.raises(DF11FormatError, match=r"has no weight `blocks\.0\.k\.weight`"):
        compress_state_dict(sd, {r"blocks\.\d+": ["q", "k"]})
    with pytest.raises(DF11FormatError, match="must be bfloat16"):
        compress_state_dict(sd, {r"blocks\.\d+": ["norm"]})
    compressed, config = compress_state_dict(sd, {r"blocks\.\d+": ["q"]})
    save_df11(tmp_path, compressed, config)
    with pytest.raises(FileExistsError, match="model.safetensors"):
        save_df11(tmp_path, compressed, config)
    with pytest.raises(DF11FormatError, match="matches no pattern"):
        decompress_state_dict(compressed, dict(config, pattern_dict={r"other": []}))
    with pytest.raises(DF11FormatError, match="holds 1 weights, its pattern lists 2"):
        decompress_state_dict(compressed, dict(config, pattern_dict={r"blocks\.\d+": ["q", "out"]}))


# ------------------------------------------------------------------------------------ tiny Qwen-Image


def tiny_transformer(seed: int):
    from diffusers import QwenImageTransformer2DModel

    from qwen_worker.models.qwen_image import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    return model.to(torch.bfloat16).eval()


def tiny_forward(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, 64, generator=g).to(torch.bfloat16)
    text = torch.randn(1, 5, 32, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        return model(
            hidden_states=hidden,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.bool),
            timestep=torch.tensor([0.5], dtype=torch.bfloat16),
            img_shapes=[(1, 4, 4)],
            return_dict=False,
        )[0]


def test_tiny_qwen_image_transformer_through_save_and_load(tmp_path):
    model = tiny_transformer(seed=0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    compressed, config = compress_state_dict(state)
    save_df11(tmp_path, compressed, config)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk == {"dfloat11_config": {"version": "0.5.0", "threads_per_block": [512],
                                           "bytes_per_thread": 8, "pattern_dict": DEFAULT_QWEN_IMAGE_PATTERN}}

    loaded, df11_config = load_df11_state_dict(tmp_path)
    # What DFloat11Model.from_pretrained needs: DF11 buffers on existing modules under names the
    # model does not have; every other tensor a model tensor of the same shape and dtype; no
    # model weight left without a value.
    modules = dict(model.named_modules())
    units = {f"transformer_blocks.{i}" for i in range(2)}
    compressed_weights = {f"{u}.{a}.weight" for u in units for a in DEFAULT_QWEN_IMAGE_PATTERN[r"transformer_blocks\.\d+"]}
    for name, tensor in loaded.items():
        unit, _, suffix = name.rpartition(".")
        if unit in units and suffix in DF11_SUFFIXES:
            assert unit in modules and name not in state
            assert tensor.dtype == (torch.int64 if suffix == "split_positions" else torch.uint8)
        else:
            assert name in state and state[name].shape == tensor.shape and state[name].dtype == tensor.dtype
    assert set(state) == (set(loaded) - {f"{u}.{s}" for u in units for s in DF11_SUFFIXES}) | compressed_weights
    assert all(loaded[f"{u}.split_positions"].numel() == 13 for u in units)

    skeleton = tiny_transformer(seed=123)  # shapes come from the model, as in the official loader
    restored = decompress_state_dict(loaded, df11_config, shapes=skeleton.state_dict())
    assert set(restored) == set(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape, name
        assert torch.equal(restored[name].view(torch.int16), tensor.view(torch.int16)), name

    expected = tiny_forward(model)
    skeleton.load_state_dict(restored)
    got = tiny_forward(skeleton)
    assert expected.shape == (1, 16, 64)
    assert torch.equal(got, expected)
