"""The byte-step form of sparse ternary weights (ternarize.runtime.gaps) against brute force.

Oracles: ``np.cumsum`` for the decoded positions, the dense product θ @ x (float64) for every matmul,
and a direct count for the bytes each layout needs (one per point, two per cancelling pair).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ternarize import pack
from ternarize.runtime import gaps, sparse


def _theta(rng, rows, cols, density):
    sign = np.where(rng.random((rows, cols)) < 0.5, -1, 1).astype(np.int8)
    return sign * (rng.random((rows, cols)) < density).astype(np.int8)


def _points(theta, groups=1):
    """(index, starts) as SparseCodes.decode_all gives them: 2·(g·K + column) + sign, row-major."""
    rows, cols = theta.shape
    r, c = np.nonzero(theta)
    index = 2 * ((r // (rows // groups)) * cols + c) + (theta[r, c] < 0)
    return index, np.searchsorted(r, np.arange(rows))


def _check(theta, groups=1, batches=(1, 4, 9), rng=None):
    """Every matmul against the dense product, with the bytes in order (a small weight's layout) and
    transposed in chunks (a large weight's), each without and with zero slots, with the signs
    interleaved and split into rows of their own, with and without the convolution's zero row;
    returns the transposed interleaved form with zero slots."""
    rng = rng or np.random.default_rng(0)
    rows, cols = theta.shape
    og = rows // groups
    flat_bytes, layouts = gaps.FLAT_BYTES, gaps.LAYOUTS
    try:
        for gaps.FLAT_BYTES, gaps.LAYOUTS in itertools.product((1 << 62, -1), ((False,), (True,))):
            for split in (True, False):
                g = gaps.GapCodes.build(*_points(theta, groups), rows, 2 * groups * cols, split=split)
                assert g is not None and g.split == split and g.counts.size == rows * (1 + split)
                assert g.slots == gaps.LAYOUTS[0]
                assert all(c[3].ndim == (1 if gaps.FLAT_BYTES > 0 else 2) for c in g.chunks)
                assert g.matmul(np.zeros((groups * cols, 0), np.float32)).shape == (rows, 0)
                for m in batches:
                    x = rng.standard_normal((groups * cols, m)).astype(np.float32)
                    ref = np.concatenate([theta[i * og:(i + 1) * og].astype(np.float64) @ x[i * cols:(i + 1) * cols]
                                          for i in range(groups)])
                    scale = max(1.0, float(np.abs(ref).max()))
                    padded = np.concatenate([x, np.zeros((1, m), np.float32)])
                    for got in (g.matmul(x), g.matmul(padded, zero_row=True)):
                        assert got.shape == (rows, m) and got.dtype == np.float32
                        # split: the +1 and −1 sums are rounded apart, each up to the row's whole magnitude
                        assert float(np.abs(got - ref).max()) <= (4e-5 if split else 1e-5) * scale, \
                            (theta.shape, groups, m, gaps.FLAT_BYTES, split)
    finally:
        gaps.FLAT_BYTES, gaps.LAYOUTS = flat_bytes, layouts
    return g


@pytest.mark.parametrize("n", [1, 15, 16, 17, 255, 256, 4097, 70_000])
def test_positions_are_the_running_sum(n, monkeypatch):
    rng = np.random.default_rng(n)
    steps = rng.integers(0, 256, n).astype(np.uint8)
    none = np.zeros(0, np.int64)
    (_, _, before, flat, _), = gaps._chunks(steps, np.array([n]), none)
    assert before == -1 and np.array_equal(flat, steps) or n > gaps.FLAT_BYTES
    monkeypatch.setattr(gaps, "FLAT_BYTES", 0)
    (_, _, before, block, _), = gaps._chunks(steps, np.array([n]), none)
    assert before == 0xFFFF and block.shape == (gaps.L, -(-n // gaps.L))
    got = gaps.positions(block, before).T.reshape(-1)[:n]
    assert np.array_equal(got, np.cumsum(steps.astype(np.int64) + 1) - 1 & 0xFFFF)
    for span in (2, 64, 4096):
        assert np.array_equal(gaps.positions(block, before, span).T.reshape(-1)[:n], got & (span - 1))


@pytest.mark.parametrize("n", [40, 5000])
def test_listed_hops_index_the_bytes_of_their_chunk(n, monkeypatch):
    """A chunk's listed hops index its bytes flattened: in order (1-D) or transposed (L, C)."""
    rng = np.random.default_rng(n)
    steps = rng.integers(0, 256, n).astype(np.uint8)
    listed = np.sort(rng.choice(n, 7, replace=False)).astype(np.int64)
    steps[listed] = 255
    counts = np.full(n // 20, 20)
    for flat in (1 << 62, 0):
        monkeypatch.setattr(gaps, "FLAT_BYTES", flat)
        monkeypatch.setattr(gaps, "CHUNK_BYTES", 1000)
        chunks = gaps._chunks(steps, counts, listed)
        found = []
        for r0, _, _, block, mine in chunks:
            b0 = 20 * r0
            assert mine.dtype == np.int32 and np.all(block.reshape(-1)[mine] == 255)
            found += (b0 + (mine if block.ndim == 1 else gaps._byte_order(mine, block.shape[1]))).tolist()
        assert found == listed.tolist()


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.05, 0.02, 0.005, 0.0005, 0.0])
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 3), (40, 500), (300, 784), (64, 2048), (3, 32640)])
def test_matmul_against_dense(rows, cols, density):
    rng = np.random.default_rng(rows * cols)
    _check(_theta(rng, rows, cols, density), rng=rng)


@pytest.mark.parametrize("rows,cols,groups", [(12, 100, 3), (64, 9, 64), (16, 40, 4)])
def test_grouped(rows, cols, groups):
    rng = np.random.default_rng(groups)
    _check(_theta(rng, rows, cols, 0.3), groups, rng=rng)


def test_long_steps_and_empty_rows():
    """Steps of exactly 256, 257, 258 and far beyond, empty first/last/middle rows, a lone far point."""
    theta = np.zeros((9, 1500), np.int8)
    theta[1, [0, 128, 256]] = [1, -1, 1]          # doubled steps 256, 257 (+1 → −1), 255
    theta[1, 385] = -1                            # 258 from the previous (+1 at 256 → −1 at 385)
    theta[3, 1499] = 1                            # far from row 1's last point and the row start
    theta[4, 0] = -1
    theta[6, [5, 6, 1000, 1001]] = [1, 1, -1, -1]
    g = _check(theta)
    np.testing.assert_array_equal(g.counts.astype(int) > 0, np.any(theta != 0, axis=1) | (g.counts > 0))
    assert g.counts[[0, 8]].tolist() == [0, 0]
    _check(np.zeros((5, 10), np.int8))


def _walk(positions, span, live, slots):
    """Brute force: (bytes, listed hops) to reach each position in turn, 256 at most at a time.
    Without ``slots``, each hop goes 256 on and is listed unless it lands in a span's dead tail (a
    position p with p mod span >= live); with ``slots``, each stops on a zero slot (a position ≡ 255
    mod 256), the first one it finds, and none is listed."""
    n, at, listed = 0, -1, []
    for p in positions:
        while p - at > 256:
            if slots:
                at = next(z for z in range(at + 1, at + 257) if z % 256 == 255)
            else:
                at += 256
                if at % span < live:
                    listed.append(n)
            n += 1
        at, n = p, n + 1
    return n, listed


@pytest.mark.parametrize("width,span,slots", [(4096, 4096, False), (4000, 4096, False), (1568, 8192, False),
                                              (1568, 65536, False), (2, 256, False), (600, 2048, False),
                                              (4000, 8192, True), (1568, 65536, True), (2, 256, True),
                                              (600, 2048, True)])
def test_bytes_match_a_brute_force_walk(width, span, slots):
    """One byte per point, plus one per hop on a step longer than 256 positions; without zero slots
    the hops that land on a row's positions are listed, those in a dead tail are not."""
    rng = np.random.default_rng(width)
    m = gaps.per_span(width, span, slots)
    rows = 3 * m + 2
    for density in (0.3, 0.02, 0.002):
        theta = _theta(rng, rows, width // 2, density)
        index, starts = _points(theta)
        row = np.repeat(np.arange(rows), np.diff(np.append(starts, index.size)))
        steps, length, listed = gaps.encode(index, row, width, span, slots)
        assert steps.size == length.sum()
        u = (row % m) * width + index
        n, walked = _walk(((row // m) * span + (u + u // 255 if slots else u)).tolist(), span, m * width, slots)
        assert steps.size == n and listed.tolist() == walked
        assert np.all(steps[listed] == 255)
    assert gaps.per_span(4096, 4096) == 1 and gaps.per_span(1568, 8192) == 5 and gaps.per_span(2, 256) == 128
    assert gaps.per_span(255, 256, True) == 1 and gaps.per_span(256, 256, True) == 0
    assert gaps.per_span(2, 512, True) == 255
    assert gaps.slot(np.array([0, 254, 255, 509, 510])).tolist() == [0, 254, 256, 510, 512]


@pytest.mark.parametrize("slack", [0.0, 0.005, 0.05])
@pytest.mark.parametrize("density", [0.05, 0.01])
def test_layout_is_the_first_within_the_slack_of_fewest_bytes(monkeypatch, slack, density):
    """Bytes counted as the steps plus 4 per listed hop; spans in increasing order, without zero
    slots first."""
    monkeypatch.setattr(gaps, "SPAN_SLACK", slack)
    rng = np.random.default_rng(5)
    index, starts = _points(_theta(rng, 256, 784, density))
    row = np.repeat(np.arange(256), np.diff(np.append(starts, index.size)))
    sizes = {}
    for slots, first in ((False, 2048), (True, 2048)):
        for span in (first, 4096, 8192, 16384, 32768, 65536):
            steps, _, listed = gaps.encode(index, row, 1568, span, slots)
            assert listed.size == 0 or not slots
            sizes[slots, span] = steps.size + gaps.LISTED_BYTES * listed.size
    assert len(set(sizes.values())) > 1
    g = gaps.GapCodes.build(index, starts, 256, 1568)
    fewest = min(sizes.values())
    order = list(sizes)
    chosen = order.index((g.slots, g.span))
    assert sizes[g.slots, g.span] <= fewest * (1 + slack)
    assert all(sizes[key] > fewest * (1 + slack) for key in order[:chosen])
    assert g.matmul(np.ones((784, 1), np.float32)).shape == (256, 1)


def test_a_power_of_two_width_is_its_own_span():
    """W = 2^j: one row a span, no dead tail; the few-column gather table is the interleaved input."""
    rng = np.random.default_rng(6)
    g = gaps.GapCodes.build(*_points(_theta(rng, 512, 1024, 0.05)), 512, 2048)
    assert g.span == 2048
    x = rng.standard_normal((1024, 1)).astype(np.float32)
    assert gaps._table(sparse.interleave(x), g.span, 512).shape == (2048, 1)


def test_too_wide_rows_are_refused():
    theta = np.zeros((2, 32769), np.int8)  # 65 538 point positions; a span holds 2^16
    theta[0, 5] = 1
    assert gaps.GapCodes.build(*_points(theta), 2, 65538) is None
    assert gaps.GapCodes.build(*_points(np.ascontiguousarray(theta[:, :32768])), 2, 65536) is not None


@pytest.mark.parametrize("density,chunk", [(0.1, 7), (0.004, 7), (0.004, 40)])
def test_small_chunks_agree(monkeypatch, density, chunk):
    """Chunks of one row or a few, with (at 0.4 %) listed hops in most of them."""
    rng = np.random.default_rng(9)
    theta = _theta(rng, 50, 512, density)
    monkeypatch.setattr(gaps, "FLAT_BYTES", 0)
    whole = gaps.GapCodes.build(*_points(theta), 50, 1024)
    monkeypatch.setattr(gaps, "CHUNK_BYTES", chunk)
    g = _check(theta, rng=rng)
    assert len(g.chunks) > len(whole.chunks)
    monkeypatch.setattr(gaps, "LAYOUTS", (False,))
    packed = gaps.GapCodes.build(*_points(theta), 50, 1024)
    assert sum(c[4].size > 0 for c in packed.chunks) > len(packed.chunks) // 2 or density > 0.01


def test_size_near_one_byte_per_nonzero():
    """About 8.2 bits per non-zero weight at 5 % non-zero, 1.15–1.21× the ts stream; at 2 %, 1.1–1.2×."""
    rng = np.random.default_rng(11)
    theta = _theta(rng, 1024, 1024, 0.05)
    g = gaps.GapCodes.build(*_points(theta), 1024, 2048)
    nz = np.count_nonzero(theta)
    buf, _ = pack.encode(theta, "ternary", "ts")
    assert 8.0 <= 8 * g.nbytes / nz <= 8.3
    assert 1.1 <= g.nbytes / len(buf) <= 1.21
    theta = _theta(rng, 1024, 1024, 0.02)
    g = gaps.GapCodes.build(*_points(theta), 1024, 2048)
    assert 1.1 <= g.nbytes / len(pack.encode(theta, "ternary", "ts")[0]) <= 1.2


def test_split_costs_about_a_byte_per_row():
    """The split form (conv weights) stores 2R rows: its bytes are the interleaved form's plus at
    most about 1.5 bytes per output row (the second row's count and its first step)."""
    rng = np.random.default_rng(14)
    for rows, cols in ((256, 2304), (64, 576), (128, 1152)):
        index, starts = _points(_theta(rng, rows, cols, 0.05))
        inter = gaps.GapCodes.build(index, starts, rows, 2 * cols)
        split = gaps.GapCodes.build(index, starts, rows, 2 * cols, split=True)
        assert split.counts.size == 2 * rows and split.width == cols
        assert 0 <= split.nbytes - inter.nbytes <= 1.5 * rows, (rows, cols, split.nbytes, inter.nbytes)


def test_from_sparse_codes():
    rng = np.random.default_rng(12)
    theta = _theta(rng, 30, 200, 0.05)
    buf, params = pack.encode(theta, "ternary", "ts")
    sc = sparse.SparseCodes(np.frombuffer(buf, np.uint8), theta.shape, params)
    g = gaps.GapCodes.build(*sc.decode_all(), 30, 400)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    np.testing.assert_allclose(g.matmul(x), sc.matmul(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [0, 1 << 40])  # always split by sign / always interleaved
@pytest.mark.parametrize("gather_bytes", [1, 100, 3000, 1 << 20])
def test_padded_sums_in_blocks(monkeypatch, gather_bytes, split):
    """Several columns: rows by event count, padded blocks within the bound, column slices for a row
    too long for it alone; empty rows, rows of one event and a long row included; the sign split
    off or part of the index."""
    monkeypatch.setattr(sparse, "GATHER_BYTES", gather_bytes)
    monkeypatch.setattr(sparse, "SPLIT", split)
    x = np.ones((200, 3), np.float32)
    assert sparse.Columns(x, False, 10).split == (split == 0)
    rng = np.random.default_rng(13)
    theta = _theta(rng, 300, 200, 0.03)
    theta[[0, 150, 299]] = 0  # empty rows first, inside and last
    theta[7] = 0
    theta[7, 11] = -1  # one event
    theta[8] = rng.choice([-1, 1], 200)  # every column
    _check(theta, batches=(2, 5, 40), rng=rng)
    buf, params = pack.encode(theta, "ternary", "ts")
    for cache in (False, True):
        sc = sparse.SparseCodes(np.frombuffer(buf, np.uint8), theta.shape, params, cache_indices=cache)
        x = rng.standard_normal((200, 5)).astype(np.float32)
        np.testing.assert_allclose(sc.matmul(x), theta.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)
        padded = np.concatenate([x, np.zeros((1, 5), np.float32)])  # as the convolution passes its patches
        np.testing.assert_allclose(sc.matmul(padded, zero_row=True), theta.astype(np.float64) @ x,
                                   rtol=1e-5, atol=1e-5)
