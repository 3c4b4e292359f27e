"""Encodings of ternarize.pack: exact bytes, round trips, size formulas, entropy, malformed data."""

from __future__ import annotations

import math
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternarize import pack
from ternarize.errors import TernFormatError
from ternarize.pack import PackError

SHAPES = [(1, 1), (1, 5), (7, 1), (3, 4), (3, 5), (5, 8), (5, 9), (2, 3, 3, 3), (13,), (4, 17), (1, 300)]


def ternary(shape, nonzero: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1, 1], np.int8), size=shape)
    return np.where(rng.random(shape) < nonzero, signs, 0).astype(np.int8)


def binary(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([-1, 1], np.int8), size=shape)


def data_for(kind: str, shape, seed: int = 0) -> np.ndarray:
    if kind == "ternary":
        return ternary(shape, 0.3, seed)
    if kind == "binary":
        return binary(shape, seed)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ts_block(gaps, negative, k: int) -> bytes:
    return pack._ts_block_bytes(np.asarray(gaps, np.int64), np.asarray(negative, bool), k)


# ---------------------------------------------------------------------- exact bytes


def test_t2_known_bytes():
    # +1 → 01, 0 → 00, -1 → 11, +1 → 01 | -1 → 11: 0b01_11_00_01, 0b00000011
    buf, params = pack.encode(np.array([[1, 0, -1, 1, -1]], np.int8), "ternary", "t2")
    assert buf == bytes([0b01110001, 0b00000011]) and params == {}
    rows = np.array([[1, 0, -1, 1, -1], [0, 0, 1, 0, 0], [-1, -1, 0, 1, 1]], np.int8)
    assert pack.encode(rows, "ternary", "t2")[0].hex() == "710310004f01"


def test_b1_known_bytes():
    assert pack.encode(np.array([[1, -1, 1]], np.int8), "binary", "b1")[0] == b"\x05"
    row = np.array([[1, 1, -1, -1, -1, -1, -1, -1, 1]], np.int8)  # 9 columns: 2 bytes, padding zero
    assert pack.encode(row, "binary", "b1")[0] == bytes([0b00000011, 0b00000001])
    assert pack.encode(np.array([[1], [-1]], np.int8), "binary", "b1")[0] == b"\x01\x00"  # a byte per row


def test_binary_as_t2_uses_the_ternary_codes():
    assert pack.encode(np.array([[1, -1, -1, 1]], np.int8), "binary", "t2")[0] == bytes([0b01111101])


def test_ts_known_bytes_from_the_spec():
    row = np.array([[0, 0, 1, 0, 0, 0, -1, 0]], np.int8)
    buf, params = pack.encode(row, "ternary", "ts")
    assert params == {"block_rows": 1, "k": 0}
    assert buf.hex(" ") == "02 00 00 00 01 00 00 00 44 02"
    with_k1 = bytes.fromhex("02000000 01000000 0a 02 02")
    assert ts_block([2, 3], [False, True], 1) == with_k1
    np.testing.assert_array_equal(pack.decode(with_k1, "ternary", "ts", (1, 8), {"block_rows": 1, "k": 1}), row)


def test_floats_are_little_endian():
    assert pack.encode(np.array([0.5, 1.0], np.float32), "float32", "f32")[0] == b"\x00\x00\x00\x3f\x00\x00\x80\x3f"
    assert pack.encode(np.array([1.0, -2.0], np.float32), "float32", "f16")[0] == b"\x00\x3c\x00\xc0"


# ---------------------------------------------------------------------- round trips and sizes


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,encoding", [("ternary", "t2"), ("ternary", "ts"), ("binary", "b1"),
                                           ("binary", "t2"), ("float32", "f32")])
def test_round_trip_and_size(shape, kind, encoding):
    data = data_for(kind, shape, seed=len(shape) + shape[0])
    buf, params = pack.encode(data, kind, encoding)
    assert len(buf) == pack.encoded_size(data, kind, encoding)
    if encoding != "ts":
        assert len(buf) == pack.dense_size(encoding, shape)
    out = pack.decode(buf, kind, encoding, shape, params)
    assert out.dtype == (np.float32 if kind == "float32" else np.int8) and out.shape == data.shape
    np.testing.assert_array_equal(out, data)
    pack.check(buf, kind, encoding, shape, params)


@pytest.mark.parametrize("shape", SHAPES)
def test_f16_is_close(shape):
    data = data_for("float32", shape)
    buf, params = pack.encode(data, "float32", "f16")
    assert len(buf) == 2 * data.size
    np.testing.assert_allclose(pack.decode(buf, "float32", "f16", shape, params), data, rtol=1e-3, atol=1e-4)


def test_size_formulas():
    for r, k in [(1, 1), (3, 4), (3, 5), (2, 8), (2, 9), (10, 784)]:
        assert pack.dense_size("t2", (r, k)) == r * math.ceil(k / 4)
        assert pack.dense_size("b1", (r, k)) == r * math.ceil(k / 8)
        assert pack.dense_size("f32", (r, k)) == 4 * r * k
        assert pack.dense_size("f16", (r, k)) == 2 * r * k
    assert pack.dense_size("t2", (4, 3, 3, 3)) == 4 * 7  # K = 27
    assert pack.rows_cols((4, 3, 3, 3)) == (4, 27) and pack.rows_cols((7,)) == (7, 1)


def test_ts_size_is_the_sum_of_block_sizes(monkeypatch):
    monkeypatch.setattr(pack, "TS_BLOCK_CELLS", 40)  # small blocks: several per tensor
    data = ternary((23, 9), 0.2, seed=3)
    buf, params = pack.encode(data, "ternary", "ts")
    assert params["block_rows"] == 5
    at, total = 0, 0
    for _ in range(math.ceil(23 / 5)):
        n, n_unary = struct.unpack_from("<II", buf, at)
        size = 8 + n_unary + math.ceil(n * params["k"] / 8) + math.ceil(n / 8)
        at, total = at + size, total + size
    assert total == len(buf)
    np.testing.assert_array_equal(pack.decode(buf, "ternary", "ts", data.shape, params), data)


def test_ts_blocks_yield_sparse_rows(monkeypatch):
    monkeypatch.setattr(pack, "TS_BLOCK_CELLS", 50)
    data = ternary((17, 11), 0.15, seed=4)
    buf, params = pack.encode(data, "ternary", "ts")
    rebuilt, covered = np.zeros_like(data), []
    for row0, row1, rows, cols, negative in pack.ts_blocks(buf, data.shape, params):
        assert rows.dtype == np.int32 and cols.dtype == np.int32 and negative.dtype == bool
        assert ((rows >= 0) & (rows < row1 - row0)).all()
        rebuilt[row0 + rows, cols] = np.where(negative, -1, 1)
        covered.append((row0, row1))
    assert covered[0][0] == 0 and covered[-1][1] == 17
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    np.testing.assert_array_equal(rebuilt, data)


def test_row_access_matches_decode():
    data = ternary((9, 13), 0.4, seed=5)
    buf, _ = pack.encode(data, "ternary", "t2")
    np.testing.assert_array_equal(pack.t2_rows(buf, data.shape, 2, 7), data[2:7])
    np.testing.assert_array_equal(pack.t2_rows(buf, data.shape, 4, 4), data[4:4])
    bits = binary((6, 11), seed=6)
    buf, _ = pack.encode(bits, "binary", "b1")
    np.testing.assert_array_equal(pack.b1_rows(buf, bits.shape, 1, 6), bits[1:6])
    with pytest.raises(ValueError, match="row range"):
        pack.t2_rows(pack.encode(data, "ternary", "t2")[0], data.shape, 5, 10)


def test_decode_accepts_a_zero_copy_view():
    data = ternary((4, 10), 0.5)
    buf, _ = pack.encode(data, "ternary", "t2")
    view = memoryview(b"\x00" * 3 + buf)[3:]
    np.testing.assert_array_equal(pack.decode(view, "ternary", "t2", data.shape, {}), data)


# ---------------------------------------------------------------------- ts against the entropy


@pytest.mark.parametrize("nonzero", [0.01, 0.05, 0.10])
@pytest.mark.parametrize("shape", [(256, 784), (64, 2048), (128, 576)])
def test_ts_within_ten_percent_of_entropy_iid(nonzero, shape):
    data = ternary(shape, nonzero, seed=int(nonzero * 1000))
    bits = 8 * pack.encoded_size(data, "ternary", "ts") / data.size
    assert bits <= 1.10 * pack.entropy_bits(data), (bits, pack.entropy_bits(data))


@pytest.mark.parametrize("densities", [(0.0, 0.005, 0.02, 0.10), (0.0, 0.0, 0.0, 0.04), (0.001, 0.2)])
def test_ts_within_ten_percent_of_entropy_uneven_rows(densities):
    rng = np.random.default_rng(7)
    per_row = rng.choice(np.array(densities), size=512)
    signs = rng.choice(np.array([-1, 1], np.int8), size=(512, 784))
    data = np.where(rng.random((512, 784)) < per_row[:, None], signs, 0).astype(np.int8)
    bits = 8 * pack.encoded_size(data, "ternary", "ts") / data.size
    assert bits <= 1.10 * pack.entropy_bits(data), (bits, pack.entropy_bits(data))


def test_ts_all_zero_costs_a_block_header_per_block():
    data = np.zeros((300, 784), np.int8)
    buf, params = pack.encode(data, "ternary", "ts")
    assert len(buf) == 8 * math.ceil(300 / params["block_rows"])
    np.testing.assert_array_equal(pack.decode(buf, "ternary", "ts", data.shape, params), data)
    assert pack.choose(data, "ternary") == "ts"


def test_ts_all_nonzero_round_trips_and_loses_to_t2():
    data = binary((20, 32), seed=8)  # K a multiple of 4: t2 has no padding
    buf, params = pack.encode(data, "ternary", "ts")
    assert params["k"] == 0  # every gap is 0: one unary bit and one sign bit per weight
    np.testing.assert_array_equal(pack.decode(buf, "ternary", "ts", data.shape, params), data)
    assert pack.choose(data, "ternary") == "t2"


def test_ts_refuses_to_break_its_weights_per_byte_bound():
    data = np.zeros((1, 200_000), np.int8)  # one all-zero row of 200 000 weights: 8 bytes as ts
    with pytest.raises(ValueError, match="per byte"):
        pack.encode(data, "ternary", "ts")
    assert pack.choose(data, "ternary") == "t2"


def test_entropy_bits():
    assert math.copysign(1, pack.entropy_bits(np.zeros(10))) == 1  # 0.0, not -0.0 ("-0.000" in a report)
    assert pack.entropy_bits(np.zeros(10)) == 0.0
    assert pack.entropy_bits(np.array([1, -1])) == pytest.approx(1.0)
    assert pack.entropy_bits(np.array([0, 0, 1, -1])) == pytest.approx(1.5)
    assert pack.entropy_bits(np.array([0, 1, -1])) == pytest.approx(math.log2(3))


def test_choose():
    assert pack.choose(ternary((32, 64), 0.98), "ternary") == "t2"  # ts beats t2 up to ~95 % non-zero
    assert pack.choose(ternary((32, 64), 0.05), "ternary") == "ts"
    assert pack.choose(binary((4, 4)), "binary") == "b1"
    floats = data_for("float32", (8,))
    assert pack.choose(floats, "float32") == "f32"
    assert pack.choose(floats, "float32", allow_lossy=True) == "f16"
    assert pack.choose(np.array([1e6], np.float32), "float32", allow_lossy=True) == "f32"  # overflows f16
    tie = np.zeros((3, 16), np.int8)  # 12 bytes either way: the dense code is kept
    tie[0, 6], tie[1, 15], tie[2, 8:10] = 1, -1, 1
    assert pack.encoded_size(tie, "ternary", "ts") == pack.dense_size("t2", tie.shape) == 12
    assert pack.choose(tie, "ternary") == "t2"
    tie[1:] = 0  # fewer bytes in ts
    assert pack.encoded_size(tie, "ternary", "ts") < 12 and pack.choose(tie, "ternary") == "ts"


# ---------------------------------------------------------------------- property test


@st.composite
def tensors(draw):
    kind, encoding = draw(st.sampled_from([("ternary", "t2"), ("ternary", "ts"), ("binary", "b1"),
                                           ("binary", "t2"), ("float32", "f32")]))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    n = math.prod(shape)
    if kind == "float32":
        values = draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=n, max_size=n))
        return kind, encoding, np.array(values, np.float32).reshape(shape)
    pool = [-1, 1] if kind == "binary" else draw(st.sampled_from([[-1, 0, 1], [0], [0, 0, 0, 0, 0, 0, 1, -1]]))
    values = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    return kind, encoding, np.array(values, np.int8).reshape(shape)


@settings(max_examples=300, deadline=None)
@given(tensors())
def test_round_trip_property(case):
    kind, encoding, data = case
    buf, params = pack.encode(data, kind, encoding)
    assert len(buf) == pack.encoded_size(data, kind, encoding)
    np.testing.assert_array_equal(pack.decode(buf, kind, encoding, data.shape, params), data)


# ---------------------------------------------------------------------- malformed data


def test_t2_rejects_code_0b10():
    buf = bytearray(pack.encode(np.zeros((4, 8), np.int8), "ternary", "t2")[0])
    buf[3 * 2 + 1] = 0b00001000  # row 3, byte 1, field 1: column 5
    with pytest.raises(PackError, match=r"^code 0b10 at row 3 column 5$"):
        pack.decode(bytes(buf), "ternary", "t2", (4, 8), {})


def test_t2_rejects_padding_bits():
    buf = bytearray(pack.encode(np.zeros((3, 5), np.int8), "ternary", "t2")[0])
    buf[2 * 2 + 1] = 0b00000100  # row 2, column 5: beyond K = 5
    with pytest.raises(PackError, match="non-zero padding bits in row 2"):
        pack.check(bytes(buf), "ternary", "t2", (3, 5), {})


def test_t2_rejects_zero_in_a_binary_tensor():
    buf = pack.encode(np.array([[1, 0, 1]], np.int8), "ternary", "t2")[0]
    with pytest.raises(PackError, match=r"code 0b00 \(zero\) at row 0 column 1 of a binary tensor"):
        pack.decode(buf, "binary", "t2", (1, 3), {})


def test_b1_rejects_padding_bits():
    with pytest.raises(PackError, match="non-zero padding bits in row 1"):
        pack.decode(b"\x05\x0d", "binary", "b1", (2, 3), {})


@pytest.mark.parametrize("encoding,shape", [("t2", (3, 5)), ("b1", (3, 9)), ("f32", (4,)), ("f16", (4,))])
def test_size_formula_is_checked_on_read(encoding, shape):
    kind = {"t2": "ternary", "b1": "binary"}.get(encoding, "float32")
    buf = pack.encode(data_for(kind, shape), kind, encoding)[0]
    for bad in (buf[:-1], buf + b"\x00"):
        with pytest.raises(PackError, match=rf"{encoding} data is {len(bad)} bytes, expected {len(buf)}"):
            pack.decode(bad, kind, encoding, shape, {})


def test_floats_must_be_finite():
    buf = np.array([1.0, np.nan], "<f4").tobytes()
    with pytest.raises(PackError, match="non-finite value nan at index 1"):
        pack.decode(buf, "float32", "f32", (2,), {})
    with pytest.raises(PackError, match="non-finite value inf at index 0"):
        pack.decode(b"\x00\x7c", "float32", "f16", (1,), {})


def test_kind_and_encoding_must_match():
    with pytest.raises(PackError, match="cannot store kind float32"):
        pack.decode(b"", "float32", "ts", (1,), {"block_rows": 1, "k": 0})
    with pytest.raises(PackError, match="cannot store kind ternary"):
        pack.check(b"\x00", "ternary", "b1", (1, 1), {})
    with pytest.raises(PackError, match="encoding 'x' is unknown"):
        pack.check_kind("ternary", "x")


@pytest.mark.parametrize("params,message", [
    ({}, "missing field 'block_rows'"), ({"block_rows": 1, "k": 0, "z": 1}, "unknown field 'z'"),
    ({"block_rows": 0, "k": 0}, r"params.block_rows is 0, outside \[1, 4\]"),
    ({"block_rows": 5, "k": 0}, r"params.block_rows is 5"), ({"block_rows": 1, "k": 21}, r"params.k is 21"),
    ({"block_rows": True, "k": 0}, "must be an integer"), ([], "params must be an object"),
])
def test_ts_params_are_checked(params, message):
    with pytest.raises(PackError, match=message):
        pack.check_params("ts", (4, 4), params)


def ts_case():
    """4 rows × 6 columns in blocks of 2 rows, k = 1, and the bytes of its two blocks."""
    data = np.array([[0, 1, 0, 0, 0, 0], [0, 0, 0, -1, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], np.int8)
    blocks = [ts_block([1, 7], [False, True], 1), ts_block([0, 10], [False, False], 1)]
    return data, blocks, {"block_rows": 2, "k": 1}


def test_ts_hand_built_blocks_decode():
    data, blocks, params = ts_case()
    np.testing.assert_array_equal(pack.decode(b"".join(blocks), "ternary", "ts", data.shape, params), data)


def _ts_error(blocks, message, shape=(4, 6), params=None):
    with pytest.raises(PackError, match=message):
        pack.check(b"".join(blocks), "ternary", "ts", shape, params or {"block_rows": 2, "k": 1})


def test_ts_rejects_inconsistent_streams():
    _, (b0, b1), _ = ts_case()
    _ts_error([b0], "ts block 1: needs an 8-byte block header, 0 bytes remain")
    _ts_error([b0, b1, b"\x00"], "1 trailing bytes after the last ts block")
    _ts_error([b0, b1[:-1]], r"ts block 1: needs 11 bytes .*only 10 remain")
    _ts_error([struct.pack("<II", 13, 1) + b0[8:], b1], "n_events is 13, more than the block's 12 weights")
    _ts_error([struct.pack("<II", 3, 1) + b0[8:] + b"\x00", b1], "unary stream has 2 one bits, n_events is 3")
    # one more unary byte, all zero: the count of 1 bits still matches, but the stream is not minimal
    _ts_error([struct.pack("<II", 2, 2) + b0[8:9] + b"\x00" + b0[9:], b1], "n_unary_bytes is 2, not minimal")
    _ts_error([b0[:-1] + bytes([b0[-1] | 0x80]), b1], "ts block 0 sign stream: non-zero padding bits")
    _ts_error([b0, b1[:-2] + bytes([b1[-2] | 0x80]) + b1[-1:]], "ts block 1 remainder stream: non-zero padding")
    _ts_error([ts_block([1, 10], [False, True], 1), b1], "ts block 0: event 1 lies at weight 12, beyond the block's 12")


def test_ts_rejects_a_shape_its_bytes_cannot_hold():
    # 8 bytes claiming 10^6 zero weights: refused before any allocation (at most 16384 per byte)
    with pytest.raises(PackError, match="at most 16384 weights per byte"):
        pack.decode(struct.pack("<II", 0, 0), "ternary", "ts", (1, 10**6), {"block_rows": 1, "k": 0})
    pack.check(struct.pack("<II", 0, 0), "ternary", "ts", (1, 16384 * 8), {"block_rows": 1, "k": 0})


def test_pack_errors_are_format_errors():
    assert issubclass(PackError, TernFormatError)


@pytest.mark.parametrize("kind,values", [("ternary", [2]), ("binary", [0]), ("float32", [np.inf])])
def test_encode_rejects_values_outside_the_kind(kind, values):
    with pytest.raises(ValueError):
        pack.encode(np.array([values]), kind, pack.KIND_ENCODINGS[kind][0])


def test_encode_rejects_f16_overflow_and_empty_shapes():
    with pytest.raises(ValueError, match="overflows float16"):
        pack.encode(np.array([1e5], np.float32), "float32", "f16")
    with pytest.raises(ValueError, match="dimensions"):
        pack.encode(np.zeros((0, 3), np.int8), "ternary", "t2")
    with pytest.raises(ValueError, match="dimensions"):
        pack.encode(np.int8(1), "ternary", "t2")


def test_ts_decoding_is_vectorized():
    """A 2M-weight tensor at 5 % decodes in well under a second: no per-weight Python loop."""
    import time

    data = ternary((2048, 1024), 0.05, seed=9)
    buf, params = pack.encode(data, "ternary", "ts")
    start = time.process_time()  # CPU time: a preempted run is not a slow one
    out = pack.decode(buf, "ternary", "ts", data.shape, params)
    assert time.process_time() - start < 1.0
    np.testing.assert_array_equal(out, data)


def test_docstring_examples():
    import doctest

    result = doctest.testmod(pack)
    assert result.attempted > 10 and result.failed == 0


@pytest.mark.parametrize("kind,encoding", [("ternary", "t2"), ("binary", "b1"), ("binary", "t2")])
def test_decoding_dense_codes_holds_little_beyond_the_result(kind, encoding):
    """Rows are unpacked in chunks of about a million weights (TERN.md §6, Memory)."""
    rng = np.random.default_rng(0)
    codes = rng.choice(np.array([-1, 0, 1] if kind == "ternary" else [-1, 1], np.int8), (3000, 2000))
    buf, params = pack.encode(codes, kind, encoding)
    tracemalloc.start()
    try:
        out = pack.decode(buf, kind, encoding, codes.shape, params)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, codes)
    assert peak < codes.size + 4 * pack._CHUNK  # the result (1 byte per weight) and one chunk's temporaries
