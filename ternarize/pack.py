"""Encodings of tensors in a .tern file (numpy only; never imports torch).

A tensor of shape ``(O, d1, d2, ...)`` has ``R = O`` rows of ``K = d1·d2·…`` columns (``K = 1`` for
a 1-D tensor). Discrete tensors hold int8 codes θ ∈ {-1, 0, +1} (``ternary``) or {-1, +1}
(``binary``); float tensors hold float32. formats/TERN.md is the normative description; every
encoding has a one-line size formula, asserted when writing and when reading.

==========  ===============  ==================================================  =========================
encoding    kinds            layout                                              size in bytes
==========  ===============  ==================================================  =========================
``t2``      ternary, binary  2 bits per weight, ONNX INT2 code, rows on bytes    ``R·ceil(K/4)``
``b1``      binary           1 bit per weight (1 = +1, 0 = -1), rows on bytes    ``R·ceil(K/8)``
``ts``      ternary          blocks of rows, Rice-coded gaps + sign bits         sum of block sizes
``f32``     float32          little-endian IEEE binary32                         ``4·n``
``f16``     float32 (lossy)  little-endian IEEE binary16                         ``2·n``
==========  ===============  ==================================================  =========================

Example::

    >>> buf, params = encode(np.array([[1, 0, -1, 1, -1]], np.int8), "ternary", "t2")
    >>> buf.hex(), params
    ('7103', {})
    >>> decode(buf, "ternary", "t2", (1, 5), params)
    array([[ 1,  0, -1,  1, -1]], dtype=int8)

Malformed encoded data raises :class:`PackError` (a :class:`~ternarize.errors.TernFormatError`)
whose message names what is wrong, e.g. ``code 0b10 at row 3 column 5``. Decoding is vectorized:
no Python loop runs per weight or per bit (only per block of rows).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

import numpy as np

from .errors import TernFormatError

ENCODINGS = ("t2", "b1", "ts", "f32", "f16")
KIND_ENCODINGS = {"float32": ("f32", "f16"), "ternary": ("t2", "ts"), "binary": ("b1", "t2")}
MAX_RANK = 8
TS_MAX_K = 20
TS_BLOCK_CELLS = 65536  # the writer's target number of weights per ts block
TS_MAX_WEIGHTS_PER_BYTE = 1 << 14  # R·K ≤ 2^14·nbytes: bounds the dense size a ts stream may claim
_CHUNK = 1 << 20  # weights per chunk when checking dense encodings, to bound temporaries
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)
_T2_VALUE = np.array([0, 1, 0, -1], np.int8)  # 0b10 never reaches this table


class PackError(TernFormatError):
    """Encoded tensor data is malformed; the message says what and where (row, column, block)."""


# ---------------------------------------------------------------------- shapes and sizes


def rows_cols(shape) -> tuple[int, int]:
    """``(R, K)`` of a shape: ``R = shape[0]``, ``K = prod(shape[1:])`` (1 for a vector).

    >>> rows_cols((3, 2, 2))
    (3, 4)
    """
    shape = tuple(int(d) for d in shape)
    if not 1 <= len(shape) <= MAX_RANK or min(shape) < 1:
        raise ValueError(f"shape {list(shape)} must have 1..{MAX_RANK} dimensions, each >= 1")
    return shape[0], math.prod(shape[1:])


def dense_size(encoding: str, shape) -> int:
    """Size formula of the fixed-size encodings (``ts`` depends on the data: use encoded_size).

    ``t2``: R·ceil(K/4); ``b1``: R·ceil(K/8); ``f32``: 4·R·K; ``f16``: 2·R·K.

    >>> dense_size("t2", (3, 5)), dense_size("b1", (3, 5)), dense_size("f32", (3,))
    (6, 3, 12)
    """
    r, k = rows_cols(shape)
    if encoding == "t2":
        return r * -(-k // 4)
    if encoding == "b1":
        return r * -(-k // 8)
    if encoding in ("f32", "f16"):
        return r * k * (4 if encoding == "f32" else 2)
    raise ValueError(f"encoding {encoding!r} has no size formula from the shape alone")


def check_kind(kind: str, encoding: str) -> None:
    """Raise PackError unless ``encoding`` may store a tensor of ``kind`` (see KIND_ENCODINGS)."""
    if kind not in KIND_ENCODINGS:
        raise PackError(f"kind {kind!r} is unknown; expected one of {', '.join(KIND_ENCODINGS)}")
    if encoding not in ENCODINGS:
        raise PackError(f"encoding {encoding!r} is unknown; expected one of {', '.join(ENCODINGS)}")
    if encoding not in KIND_ENCODINGS[kind]:
        raise PackError(f"encoding {encoding!r} cannot store kind {kind}; "
                        f"allowed: {', '.join(KIND_ENCODINGS[kind])}")


def check_params(encoding: str, shape, params) -> dict:
    """Validate ``params``: ``{}`` for every encoding but ts, which has ``block_rows`` and ``k``.

    ts: ``1 <= block_rows <= R`` and ``0 <= k <= 20``. Returns params unchanged.
    """
    if not isinstance(params, dict):
        raise PackError(f"params must be an object, got {type(params).__name__}")
    expected = {"block_rows", "k"} if encoding == "ts" else set()
    if set(params) != expected:
        extra = sorted(set(params) - expected) or sorted(expected - set(params))
        raise PackError(f"params has {'unknown' if set(params) - expected else 'missing'} field "
                        f"{extra[0]!r} (encoding {encoding} takes {sorted(expected)})")
    if encoding == "ts":
        r, _ = rows_cols(shape)
        _int_in(params["block_rows"], 1, r, "params.block_rows")
        _int_in(params["k"], 0, TS_MAX_K, "params.k")
    return params


def _int_in(value, lo: int, hi: int, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PackError(f"{where} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise PackError(f"{where} is {value}, outside [{lo}, {hi}]")
    return value


def _check_length(buf: np.ndarray, encoding: str, shape) -> None:
    want = dense_size(encoding, shape)
    if buf.size != want:
        raise PackError(f"{encoding} data is {buf.size} bytes, expected {want} for shape {list(shape)}")


def _bytes(buf) -> np.ndarray:
    """A zero-copy uint8 view of bytes, bytearray, memoryview or a uint8 array."""
    return np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)


# ---------------------------------------------------------------------- the public entry points


def encode(data, kind: str, encoding: str) -> tuple[bytes, dict]:
    """Encode ``data`` (int8 codes, or float32 for kind float32) as ``encoding``; return (bytes, params).

    >>> encode(np.array([[1, -1, 1]], np.int8), "binary", "b1")
    (b'\\x05', {})
    """
    check_kind(kind, encoding)
    arr = _values(data, kind)
    r, k = rows_cols(arr.shape)
    codes = arr.reshape(r, k)
    if encoding == "t2":
        out, params = _t2_encode(codes), {}
    elif encoding == "b1":
        out, params = np.packbits(codes > 0, axis=1, bitorder="little").tobytes(), {}
    elif encoding == "ts":
        out, params = _ts_encode(codes)
    else:
        out, params = _float_encode(arr, encoding), {}
    assert encoding == "ts" or len(out) == dense_size(encoding, arr.shape)  # ts asserts its own sum
    return out, params


def decode(buf, kind: str, encoding: str, shape, params) -> np.ndarray:
    """Decode a whole tensor: int8 codes for ternary/binary, float32 for float32 (validated first).

    >>> decode(bytes([0x71, 0x03]), "ternary", "t2", (1, 5), {})
    array([[ 1,  0, -1,  1, -1]], dtype=int8)
    """
    check_kind(kind, encoding)
    shape = tuple(int(d) for d in shape)
    check_params(encoding, shape, params)
    raw = _bytes(buf)
    r, k = rows_cols(shape)
    if encoding in ("t2", "b1"):
        _check_length(raw, encoding, shape)  # before the dense allocation
        out = np.empty((r, k), np.int8)
        for r0, r1 in _row_chunks(r, k):
            out[r0:r1] = t2_rows(raw, shape, r0, r1, kind) if encoding == "t2" else b1_rows(raw, shape, r0, r1)
        return out.reshape(shape)
    if encoding == "ts":
        check(raw, kind, encoding, shape, params)  # validate fully before the dense allocation
        out = np.zeros((r, k), np.int8)
        for row0, _, rows, cols, negative in ts_blocks(raw, shape, params):
            out[row0 + rows, cols] = np.where(negative, -1, 1)
        return out.reshape(shape)
    return _float_decode(raw, encoding, shape)


def check(buf, kind: str, encoding: str, shape, params) -> None:
    """Validate encoded data without allocating the dense tensor (memory O(len(buf)) at most).

    Raises PackError naming the first defect; returns None when the data is well-formed.
    """
    check_kind(kind, encoding)
    shape = tuple(int(d) for d in shape)
    check_params(encoding, shape, params)
    raw = _bytes(buf)
    r, k = rows_cols(shape)
    if encoding in ("t2", "b1"):
        _check_length(raw, encoding, shape)
        for r0, r1 in _row_chunks(r, k):
            if encoding == "t2":
                t2_rows(raw, shape, r0, r1, kind)
            else:
                b1_rows(raw, shape, r0, r1)
    elif encoding == "ts":
        for _ in ts_blocks(raw, shape, params):
            pass
    else:
        _float_decode(raw, encoding, shape)


def encoded_size(data, kind: str, encoding: str) -> int:
    """Exact length of ``encode(data, kind, encoding)[0]``, computed without building the bytes.

    >>> encoded_size(np.zeros((2, 5), np.int8), "ternary", "t2")
    4
    """
    check_kind(kind, encoding)
    arr = _values(data, kind)
    if encoding != "ts":
        return dense_size(encoding, arr.shape)
    r, k = rows_cols(arr.shape)
    codes = arr.reshape(r, k)
    block_rows = ts_block_rows(r, k)
    return min(_ts_sizes(codes, block_rows))


def choose(data, kind: str, allow_lossy: bool = False) -> str:
    """The smallest lossless encoding: ternary → the smaller of t2 and ts (t2 on a tie);
    binary → b1; float32 → f32, or f16 when ``allow_lossy`` and every value fits binary16.

    >>> choose(np.zeros((4, 100), np.int8), "ternary")
    'ts'
    """
    arr = _values(data, kind)
    if kind == "binary":
        return "b1"
    if kind == "float32":
        with np.errstate(over="ignore"):
            fits = bool(np.isfinite(arr.astype(np.float16)).all())
        return "f16" if allow_lossy and fits else "f32"
    t2 = dense_size("t2", arr.shape)
    ts = encoded_size(arr, kind, "ts")
    return "ts" if ts < t2 and _ts_amplification_ok(arr.shape, ts) else "t2"


def entropy_bits(codes) -> float:
    """Empirical entropy H(p0, p+, p-) in bits per weight: the bound a sparse coder aims at.

    H = -Σ p·log2 p over the frequencies of 0, +1 and -1.

    >>> round(entropy_bits(np.array([0, 0, 1, -1])), 3)
    1.5
    """
    c = np.asarray(codes).ravel()
    n = c.size
    if n == 0:
        return 0.0
    counts = [int(np.count_nonzero(c == v)) for v in (0, 1, -1)]
    return 0.0 - sum(m / n * math.log2(m / n) for m in counts if m)  # 0.0 −: never −0.0 (one symbol)


def _values(data, kind: str) -> np.ndarray:
    """The array to encode, checked: codes in their set (int8) or finite float32."""
    if kind not in KIND_ENCODINGS:
        raise ValueError(f"kind {kind!r} is unknown; expected one of {', '.join(KIND_ENCODINGS)}")
    src = np.asarray(data)
    rows_cols(src.shape)  # rank and dims
    if kind == "float32":
        arr = np.ascontiguousarray(src, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("float32 tensors must hold finite values")
        return arr
    allowed = (-1, 0, 1) if kind == "ternary" else (-1, 1)
    if not np.isin(src, allowed).all():
        raise ValueError(f"{kind} tensors must hold codes in {set(allowed)}")
    return np.ascontiguousarray(src, dtype=np.int8)


# ---------------------------------------------------------------------- t2: dense 2-bit (ONNX INT2)


def _t2_encode(codes: np.ndarray) -> bytes:
    """0 → 0b00, +1 → 0b01, -1 → 0b11; four per byte, low bits first; rows padded with 0b00."""
    r, k = codes.shape
    u = codes.astype(np.uint8) & 3  # two's complement: -1 is 0xFF, whose low two bits are 0b11
    padded = np.zeros((r, -(-k // 4) * 4), np.uint8)
    padded[:, :k] = u
    q = padded.reshape(r, -1, 4)
    return (q[..., 0] | q[..., 1] << 2 | q[..., 2] << 4 | q[..., 3] << 6).tobytes()


def _row_chunks(r: int, k: int):
    """Row ranges of about ``_CHUNK`` weights (at least one row each): temporaries stay near that."""
    step = max(1, _CHUNK // k)
    return [(r0, min(r, r0 + step)) for r0 in range(0, r, step)]


def t2_rows(buf, shape, r0: int, r1: int, kind: str = "ternary") -> np.ndarray:
    """Rows ``r0:r1`` of a t2 tensor as int8 codes of shape (r1 - r0, K), validated.

    Byte j of a row holds columns 4j..4j+3 at bits 0-1, 2-3, 4-5, 6-7. Size R·ceil(K/4).

    >>> t2_rows(bytes([0x71, 0x03]), (1, 5), 0, 1)
    array([[ 1,  0, -1,  1, -1]], dtype=int8)
    """
    raw, (r, k), nb = _row_slice(buf, "t2", shape, r0, r1)
    fields = (raw[:, :, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    fields = fields.reshape(raw.shape[0], nb * 4)
    _first_bad(fields == 2, r0, "code 0b10 at row {} column {}")
    _first_bad(fields[:, k:] != 0, r0, "non-zero padding bits in row {} (column {} of the padding)")
    if kind == "binary":
        _first_bad(fields[:, :k] == 0, r0, "code 0b00 (zero) at row {} column {} of a binary tensor")
    return _T2_VALUE[fields[:, :k]]


def b1_rows(buf, shape, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of a b1 tensor as int8 ±1 of shape (r1 - r0, K), validated.

    Bit i of byte j (least significant first) is column 8j + i: 1 → +1, 0 → -1. Size R·ceil(K/8).

    >>> b1_rows(bytes([0x05]), (1, 3), 0, 1)
    array([[ 1, -1,  1]], dtype=int8)
    """
    raw, (r, k), nb = _row_slice(buf, "b1", shape, r0, r1)
    bits = np.unpackbits(raw, axis=1, bitorder="little")
    _first_bad(bits[:, k:] != 0, r0, "non-zero padding bits in row {} (column {} of the padding)")
    return bits[:, :k].view(np.int8) * np.int8(2) - np.int8(1)


def _row_slice(buf, encoding: str, shape, r0: int, r1: int):
    """The bytes of rows r0:r1 as a (rows, bytes per row) view, after the size formula check."""
    raw = _bytes(buf)
    _check_length(raw, encoding, shape)
    r, k = rows_cols(shape)
    if not 0 <= r0 <= r1 <= r:
        raise ValueError(f"row range {r0}:{r1} is outside 0:{r}")
    nb = -(-k // (4 if encoding == "t2" else 8))
    return raw.reshape(r, nb)[r0:r1], (r, k), nb


def _first_bad(mask: np.ndarray, row0: int, template: str) -> None:
    """Raise PackError naming the first (row, column) where ``mask`` is set, if any."""
    if mask.any():
        row, col = np.unravel_index(int(np.argmax(mask)), mask.shape)
        raise PackError(template.format(row0 + int(row), int(col)))


# ---------------------------------------------------------------------- f32 / f16


def _float_encode(arr: np.ndarray, encoding: str) -> bytes:
    if encoding == "f32":
        return arr.astype("<f4").tobytes()
    with np.errstate(over="ignore"):
        half = arr.astype("<f2")
    if not np.isfinite(half).all():
        raise ValueError("a value overflows float16 (|x| > 65504); use f32")
    return half.tobytes()


def _float_decode(raw: np.ndarray, encoding: str, shape) -> np.ndarray:
    """float32 values from f32/f16 bytes (size 4·n or 2·n); non-finite values are rejected."""
    _check_length(raw, encoding, shape)
    values = raw.view("<f4" if encoding == "f32" else "<f2").astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise PackError(f"non-finite value {values[i]} at index {i}")
    return values.reshape(shape)


# ---------------------------------------------------------------------- ts: sparse ternary


def ts_block_rows(r: int, k: int) -> int:
    """The writer's rows per block: B = max(1, ceil(65536 / K)), capped at R.

    >>> ts_block_rows(1000, 784), ts_block_rows(3, 5)
    (84, 3)
    """
    return min(r, max(1, -(-TS_BLOCK_CELLS // k)))


def _ts_amplification_ok(shape, nbytes: int) -> bool:
    r, k = rows_cols(shape)
    return r * k <= TS_MAX_WEIGHTS_PER_BYTE * nbytes


def _ts_gaps(codes: np.ndarray, block_rows: int):
    """Events of a (R, K) code array: (block index, gap before the event, is negative).

    Cells are numbered row-major within a block; an event's gap is the number of zero cells since
    the previous event of the block (or since the block start).
    """
    r, k = codes.shape
    flat = codes.reshape(-1)
    pos = np.flatnonzero(flat).astype(np.int64)
    if pos.size == 0:
        return pos, pos, np.zeros(0, bool)
    cells = block_rows * k
    block = pos // cells
    rel = pos - block * cells
    prev = np.concatenate(([-1], rel[:-1]))
    first = np.concatenate(([True], block[1:] != block[:-1]))
    gaps = rel - np.where(first, -1, prev) - 1
    return block, gaps, flat[pos] < 0


def _segments(block: np.ndarray, nblocks: int) -> np.ndarray:
    """Boundaries of each block's events in the (sorted) ``block`` array: nblocks + 1 indices."""
    return np.searchsorted(block, np.arange(nblocks + 1))


def _ts_sizes(codes: np.ndarray, block_rows: int) -> list[int]:
    """ts size for every k in 0..20: Σ_blocks 8 + ceil((Σq + n)/8) + ceil(n·k/8) + ceil(n/8)."""
    r, _ = codes.shape
    nblocks = -(-r // block_rows)
    block, gaps, _ = _ts_gaps(codes, block_rows)
    bounds = _segments(block, nblocks)
    n = np.diff(bounds)
    sizes = []
    for k in range(TS_MAX_K + 1):
        csum = np.concatenate(([0], np.cumsum(gaps >> k)))
        unary_bits = csum[bounds[1:]] - csum[bounds[:-1]] + n
        per_block = 8 + (unary_bits + 7) // 8 + (n * k + 7) // 8 + (n + 7) // 8
        sizes.append(int(per_block.sum()))
    return sizes


def _ts_encode(codes: np.ndarray) -> tuple[bytes, dict]:
    """Encode with the writer's block_rows and the k giving the smallest size (smallest k on ties)."""
    r, k = codes.shape
    block_rows = ts_block_rows(r, k)
    sizes = _ts_sizes(codes, block_rows)
    rice_k = int(np.argmin(sizes))
    if not _ts_amplification_ok(codes.shape, sizes[rice_k]):
        raise ValueError(f"ts would store {r * k} weights in {sizes[rice_k]} bytes, more than "
                         f"{TS_MAX_WEIGHTS_PER_BYTE} per byte; use t2")
    block, gaps, negative = _ts_gaps(codes, block_rows)
    bounds = _segments(block, -(-r // block_rows))
    parts = [_ts_block_bytes(gaps[a:b], negative[a:b], rice_k) for a, b in zip(bounds[:-1], bounds[1:])]
    out = b"".join(parts)
    assert len(out) == sizes[rice_k]  # the size formula, summed over blocks
    return out, {"block_rows": block_rows, "k": rice_k}


def _ts_block_bytes(gaps: np.ndarray, negative: np.ndarray, k: int) -> bytes:
    """u32 n_events, u32 n_unary_bytes, unary stream, remainder stream, sign stream."""
    n = gaps.size
    q = gaps >> k
    ones = np.cumsum(q + 1) - 1  # bit index of each event's terminating 1
    unary_bits = np.zeros(int(ones[-1]) + 1 if n else 0, np.uint8)
    unary_bits[ones] = 1
    unary = np.packbits(unary_bits, bitorder="little")
    rem_bits = ((gaps[:, None] >> np.arange(k)) & 1).astype(np.uint8).reshape(-1)
    rem = np.packbits(rem_bits, bitorder="little")
    sign = np.packbits(negative.astype(np.uint8), bitorder="little")
    return struct.pack("<II", n, unary.size) + unary.tobytes() + rem.tobytes() + sign.tobytes()


def ts_blocks(buf, shape, params) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Decode a ts tensor one block of rows at a time, validating as it goes.

    Yields ``(row0, row1, rows, cols, negative)``: the non-zero weights of rows row0:row1 at
    (row0 + rows[i], cols[i]) (int32), value -1 where ``negative[i]`` else +1. Memory per block
    is O(the block's bytes); no dense array is built. The last iteration checks that the stream
    ends exactly at the end of ``buf``.

    >>> buf, p = encode(np.array([[0, 1], [-1, 0]], np.int8), "ternary", "ts")
    >>> [(a, b, r.tolist(), c.tolist(), s.tolist()) for a, b, r, c, s in ts_blocks(buf, (2, 2), p)]
    [(0, 2, [0, 1], [1, 0], [False, True])]
    """
    raw = _bytes(buf)
    r, k = rows_cols(shape)
    check_params("ts", shape, params)
    if not _ts_amplification_ok(shape, raw.size):
        raise PackError(f"ts data of {raw.size} bytes cannot hold shape {list(shape)}: "
                        f"at most {TS_MAX_WEIGHTS_PER_BYTE} weights per byte")
    block_rows, rice_k = params["block_rows"], params["k"]
    at = 0
    for index, row0 in enumerate(range(0, r, block_rows)):  # every block consumes >= 8 bytes or raises
        row1 = min(r, row0 + block_rows)
        pos, negative, at = _ts_read_block(raw, at, index, (row1 - row0) * k, rice_k)
        yield row0, row1, (pos // k).astype(np.int32), (pos % k).astype(np.int32), negative
    if at != raw.size:
        raise PackError(f"{raw.size - at} trailing bytes after the last ts block")


def _ts_read_block(raw: np.ndarray, at: int, index: int, cells: int, k: int):
    """Parse and check block ``index`` starting at byte ``at``; return (cell positions, negative, end)."""
    where = f"ts block {index}"
    left = raw.size - at
    if left < 8:
        raise PackError(f"{where}: needs an 8-byte block header, {left} bytes remain")
    n, n_unary = struct.unpack_from("<II", raw, at)
    if n > cells:
        raise PackError(f"{where}: n_events is {n}, more than the block's {cells} weights")
    n_rem, n_sign = (n * k + 7) // 8, (n + 7) // 8
    need = 8 + n_unary + n_rem + n_sign  # checked against the bytes left before any allocation
    if need > left:
        raise PackError(f"{where}: needs {need} bytes (n_events {n}, n_unary_bytes {n_unary}), "
                        f"only {left} remain")
    u0 = at + 8
    q = _ts_unary(raw[u0:u0 + n_unary], n, where)
    rem = _ts_bits(raw[u0 + n_unary:u0 + n_unary + n_rem], n, k, f"{where} remainder stream")
    sign = _ts_bits(raw[u0 + n_unary + n_rem:at + need], n, 1, f"{where} sign stream")
    pos = np.cumsum(((q << k) | rem) + 1) - 1
    if n and pos[-1] >= cells:
        raise PackError(f"{where}: event {n - 1} lies at weight {int(pos[-1])}, beyond the block's {cells}")
    return pos, sign.astype(bool), at + need


def _ts_unary(unary: np.ndarray, n: int, where: str) -> np.ndarray:
    """Quotients from the unary stream: event i is q_i zero bits then a 1 (LSB first)."""
    ones = int(_POPCOUNT[unary].sum(dtype=np.int64))
    if ones != n:
        raise PackError(f"{where}: unary stream has {ones} one bits, n_events is {n}")
    if unary.size and unary[-1] == 0:
        raise PackError(f"{where}: n_unary_bytes is {unary.size}, not minimal (the last byte is zero)")
    ends = np.flatnonzero(np.unpackbits(unary, bitorder="little"))
    return np.diff(ends, prepend=-1) - 1


def _ts_bits(raw: np.ndarray, n: int, k: int, where: str) -> np.ndarray:
    """n fields of k bits each, LSB first, from a stream padded with zero bits to a byte."""
    bits = np.unpackbits(raw, bitorder="little")
    if bits[n * k:].any():
        raise PackError(f"{where}: non-zero padding bits")
    fields = bits[:n * k].reshape(n, k)
    values = np.zeros(n, np.int64)
    for j in range(k):  # one vectorized pass per bit plane (k <= 20), never per weight
        values |= fields[:, j].astype(np.int64) << j
    return values
