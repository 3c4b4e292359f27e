"""Sparse ternary weights held as one byte per non-zero: the runtime's fast form of ``ts`` (numpy only).

The ``ts`` stream of a file (formats/TERN.md §5.3) is within about 1 % of the entropy bound but takes
some 25 numpy passes to decode. :class:`GapCodes` re-encodes it once, at load, into about 8 bits
per non-zero weight that decode in a few numpy passes. At 2–5 % non-zero that is 1.1–1.2× the
``ts`` bytes; ``Runtime.load(sparse="auto")`` uses it within a memory budget.

Layout
------
Every non-zero weight (row r, column c, sign s: 0 for +1, 1 for −1) of an R × K weight is a point
``i = 2·c + s`` of a row of ``W = 2·K`` (``2·groups·K`` for a grouped convolution, whose points
then count the input rows of earlier groups too). Rows are laid end to end, m of them per *span* of
S positions (S a power of two from 256 to 2^16), in one of two ways:

* *packed*: ``m = ⌊S / W⌋`` and point i of row r is at position ``(r // m)·S + (r % m)·W + i``;
  the last ``S − m·W`` positions of a span (none when S = W) belong to no row: its *dead tail*;
* *with zero slots*: every position ≡ 255 (mod 256) is a zero slot, which belongs to no row, and
  ``m = ⌊255·S/256 / W⌋``: point i of row r is the ``u = (r % m)·W + i``-th point position of
  span ``r // m``, at position ``(r // m)·S + u + ⌊u / 255⌋``; the rest of a span is unused.

Per weight the first layout, packed ones by increasing S and then those with zero slots, whose
bytes are within ``SPAN_SLACK`` (0.5 %) of the fewest is kept: a small packed span is the fastest
(when S = W, for a layer of 2^j inputs, the gather table below is the input itself), zero slots
are the smallest where many steps are long (at 2 % non-zero and fewer).

*Split* form (``build(..., split=True)``, used for convolution weights): row r's +1 points are
stored as row r and its −1 points as row R + r, each point being its input row c (W = K, or
groups·K). A product over several columns then reads the input rows as they are (the patch matrix,
with the zero row that the hops below read) and subtracts the second R rows' sums from the first's;
no sign has to be separated per call. It takes about one byte more per output row.

The points of the whole weight are increasing positions p_1 < p_2 < …, stored as the steps
``p_j − p_{j−1} − 1`` (p_0 = −1), one byte each: a step of 1 to 256. A longer step goes by *hops*
until the point is within 256, and a hop adds nothing to its row. Packed, a hop goes 256 on: one
that lands in a dead tail reads a zero there; the others (a gap of over 256 positions inside the
rows, rare at 5 % non-zero) are *listed*, their byte indices kept (4 bytes each), and read zero by
that list. With zero slots, a hop stops on the next zero slot, then goes 256 at a time from slot to
slot, and reads zero there. Hops belong to the row of the point after them; ``counts[r]``
(uint8/16/32, the narrowest that fits) is the number of bytes of row r. At 5 % non-zero this is
about 8.1–8.3 bits per non-zero weight (1.19–1.22× the ``ts`` stream); at 2 %, 9.1–9.4
(1.11–1.16×); at 1 %, 12.4–13.2 (1.35–1.43×).

Decoding
--------
A weight of at most ``FLAT_BYTES`` bytes keeps them in order: one ``cumsum`` gives the positions,
which become input rows as in step 3 below; with up to ``FEW_COLUMNS`` columns the rows of the
interleaved input are gathered and summed per row with ``reduceat`` (few numpy calls and no table,
for small layers).
Larger weights are kept in chunks of whole rows, each transposed into ``L = 16`` rows of C columns:
column j holds bytes j·L … j·L + 15. Per call and chunk:

1. positions modulo 2^16 (uint16, wrapping): the steps + 1, then L − 1 additions of contiguous
   rows give the prefix sums down each column, a ``cumsum`` over the C column totals gives each
   column's start, one broadcast addition adds it; ``& (S − 1)`` maps a position into its span;
2. up to ``FEW_COLUMNS`` (7) input columns: the gather table holds the interleaved input rows
   ``[x₀, −x₀, x₁, −x₁, …]`` (the input rows as they are in the split form) once per row of a
   span, laid out as the positions are (zeros in the dead tail or at the zero slots), so position
   p reads table row ``p mod S``; packed with S = W it is the interleaved input itself, small
   enough for the fastest cache. One ``take``, the listed hops set to zero, then L − 1 additions
   for the prefix sums of the gathered values down each column; row r's sum is the totals of the
   whole columns between row r − 1's last byte and its own (one ``reduceat`` over the column
   totals) plus the prefix at its last byte minus the prefix at row r − 1's;
3. more input columns: the positions, back in byte order, become input rows (a row's offset
   within its span is subtracted per row; the hops read a zero row: those on a zero slot found by
   their position, those in a dead tail by being past the span's rows, the listed ones set),
   gathered and summed per output row by :class:`~ternarize.runtime.sparse.Columns` (split form:
   directly in padded blocks).

Example::

    g = GapCodes.build(index, starts, rows=300, width=2 * 784)   # from SparseCodes.decode_all()
    y = g.matmul(x.T)          # (300, N) = θ @ xᵀ
"""

from __future__ import annotations

import numpy as np

from .sparse import FEW_COLUMNS, Columns, _accumulate, _padded_sums, interleave

SPAN = 1 << 16  # positions are computed modulo 2^16 (uint16 arithmetic): the largest span
MIN_SPAN = 256
MAX_STEP = 256  # one byte: a step of 1 to 256
LISTED_BYTES = 4  # a listed hop: its byte index, int32
L = 16  # rows of a transposed chunk (a power of two)
_SHIFT = L.bit_length() - 1
CHUNK_BYTES = 1 << 18  # bytes decoded together (whole rows): about 12 + 4·M bytes of temporaries each
SPAN_SLACK = 0.005  # a smaller span may take up to 0.5 % more bytes than the one with the fewest
LAYOUTS = (False, True)  # tried in this order: without zero slots, then with them
FLAT_BYTES = 1 << 15  # a weight of at most this many bytes stays in byte order: one cumsum decodes it


def per_span(width: int, span: int, slots: bool = False) -> int:
    """Rows of W points that a span holds (``slots``: 255 of every 256 positions hold points, the
    last is a zero slot)."""
    return (span // 256 * 255 if slots else span) // width


def slot(u: np.ndarray) -> np.ndarray:
    """The position of the u-th point position of a span with zero slots: one after every 255."""
    return u + u // 255


def encode(points: np.ndarray, row: np.ndarray, width: int, span: int, slots: bool = False):
    """Steps (uint8), bytes per point (int64, hops included) and the listed hops (int64 byte
    indices, ascending) for points ascending within rows.

    ``row``: the row of each point, non-decreasing. A step longer than 256 positions goes by hops.
    Without ``slots``, hops of 256, each listed unless it lands in a span's dead tail (which reads
    zero); with ``slots``, to the next zero slot (a position ≡ 255 mod 256), then 256 at a time
    from slot to slot, and none is listed.
    """
    m = per_span(width, span, slots)
    u = (row % m) * width + points
    p = (row // m) * span + (slot(u) if slots else u)
    prev = np.empty_like(p)
    prev[:1] = -1
    prev[1:] = p[:-1]
    if np.any(p <= prev):
        raise ValueError("points must be strictly increasing within each row")
    if slots:  # where the first hop of a long step lands: the next zero slot, or 256 on
        first = (prev + 1) // MAX_STEP * MAX_STEP + (MAX_STEP - 1)
    else:
        first = prev + MAX_STEP
    hops = np.where(p - prev > MAX_STEP, (p - first - 1) // MAX_STEP + 1, 0)
    length = hops + 1
    end = np.cumsum(length)
    steps = np.full(int(end[-1]) if end.size else 0, MAX_STEP - 1, np.uint8)  # hops: 256 (a first one to a slot: less)
    far = np.flatnonzero(hops)
    steps[end - 1] = p - np.where(hops > 0, first + MAX_STEP * (hops - 1), prev) - 1
    steps[end[far] - length[far]] = first[far] - prev[far] - 1
    if slots:
        return steps, length, np.zeros(0, np.int64)
    which = np.repeat(far, hops[far])  # the point each hop leads to
    k = np.arange(which.size) - np.repeat(np.cumsum(hops[far]) - hops[far], hops[far])  # 0, 1, … per point
    land = first[which] + MAX_STEP * k
    return steps, length, (end[which] - length[which] + k)[land % span < m * width]


class GapCodes:
    """A sparse ternary weight of R rows as byte steps (see the module doc); ``matmul`` computes θ @ x.

    ``span``: S; ``slots``: the layout with zero slots (else packed). ``chunks``: per chunk ``(row0,
    row1, position before it, its bytes as (L, C) uint8, its listed hops as int32 indices into those
    bytes flattened)``.
    """

    def __init__(self, steps: np.ndarray, counts: np.ndarray, listed: np.ndarray, width: int, span: int,
                 split: bool = False, slots: bool = False):
        self.counts, self.width, self.span, self.split, self.slots = counts, width, span, split, slots
        self.rows = counts.size // 2 if split else counts.size  # output rows
        self.chunks = _chunks(steps, counts, listed)

    @property
    def nbytes(self) -> int:
        """Resident bytes: the transposed steps (≤ 15 padding bytes per chunk), the listed hops, the
        row counts and the chunk table (4 integers per chunk)."""
        return sum(c[3].nbytes + c[4].nbytes for c in self.chunks) + self.counts.nbytes + 32 * len(self.chunks)

    @classmethod
    def build(cls, index: np.ndarray, starts: np.ndarray, rows: int, width: int,
              split: bool = False) -> GapCodes | None:
        """From decoded points ``index`` (per row ascending) and each row's first one (``decode_all``).

        ``split``: store each row's +1 points and −1 points as two rows of W/2 points (see the module
        doc), for a weight that multiplies several columns at a time (a convolution's patches).
        Tries every span from the smallest power of two (256 at least) that holds a row up to 2^16,
        without zero slots and then with them, and keeps the first whose bytes (steps and listed
        hops) are within ``SPAN_SLACK`` of the fewest: a smaller span is a smaller gather table (one
        of W positions is the interleaved input itself), zero slots make one with many rows a span.
        None when a row does not fit a span of 2^16 positions (W > 65 536).
        """
        if width % 2:
            return None
        index = np.asarray(index, np.int64)
        per_row = np.diff(np.append(np.asarray(starts, np.int64), index.size))
        row = np.repeat(np.arange(rows, dtype=np.int64), per_row)
        if split:  # row r's +1 points become row r, its −1 points row R + r, each point its input row
            row += rows * (index & 1)
            order = np.argsort(row, kind="stable")
            row, index = row[order], index[order] >> 1
            rows, width = 2 * rows, width // 2
        if width > SPAN:
            return None
        sizes = []  # (bytes, span, slots) of every layout; only the kept one's steps are made again
        for slots in LAYOUTS:
            span = MIN_SPAN
            while per_span(width, span, slots) < 1:
                span *= 2
            while span <= SPAN:
                steps, _, listed = encode(index, row, width, span, slots)
                sizes.append((steps.size + LISTED_BYTES * listed.size, span, slots))
                span *= 2
        fewest = min(size for size, _, _ in sizes)
        _, span, slots = next(t for t in sizes if t[0] <= fewest * (1 + SPAN_SLACK))
        steps, length, listed = encode(index, row, width, span, slots)
        counts = np.bincount(row, weights=length, minlength=rows).astype(np.int64)
        top = counts.max(initial=0)
        dtype = np.uint8 if top < 1 << 8 else np.uint16 if top < 1 << 16 else np.uint32
        return cls(steps, counts.astype(dtype), listed, width, span, split, slots)

    zero_row = True  # matmul takes the convolution's patches with a zero last row as they are

    def matmul(self, x: np.ndarray, zero_row: bool = False) -> np.ndarray:
        """θ @ x for x of shape (groups·K, M) (with ``zero_row``: one more row, zero): (R, M) float32."""
        m, k = x.shape[1], x.shape[0] - zero_row
        if m == 0:
            return np.zeros((self.rows, 0), np.float32)
        lines = self.counts.size  # stored rows: 2R when split
        per = per_span(self.width, self.span, self.slots)
        out = np.empty((lines, m), np.float32)
        few = m <= FEW_COLUMNS  # each position reads one row (of a table, or of the input)
        if few and self.chunks[0][3].ndim == 2:  # positions decoded once, each reads a table row
            table = _table(x[:k] if self.split else interleave(x[:k]), self.span, lines, self.slots)
        elif self.split:  # the input rows as they are, then a zero row (read by the hops)
            xz = x if zero_row else np.concatenate([x, np.zeros((1, m), np.float32)])
        elif few:  # a small weight: its positions become input rows of the interleaved input
            xz = interleave(x[:k], zero_row=True)
        else:
            columns = Columns(x, zero_row, int(self.counts.sum(dtype=np.int64)))
        for r0, r1, before, steps, listed in self.chunks:
            counts = self.counts[r0:r1]
            if steps.size == 0:
                out[r0:r1] = 0
                continue
            if steps.ndim == 1:  # byte order (a small weight): one cumsum, fewer numpy calls
                pos = np.add(steps, 1, dtype=np.intp)
                np.add.accumulate(pos, out=pos)
                pos += before
                pos &= self.span - 1
            else:
                pos = positions(steps, before, self.span)
                if few:
                    # in range by construction (but the padding bytes after the last row); "wrap"
                    # checks bounds fastest and "raise" would copy first
                    v = table.take(pos, axis=0, mode="wrap")
                    if listed.size:
                        v.reshape(-1, m)[listed] = 0
                    out[r0:r1] = _row_sums(v, counts) if m > 1 else _row_sums(v.reshape(L, -1), counts)[:, None]
                    continue
                pos = pos.T.reshape(-1)[:int(counts.sum(dtype=np.int64))]  # back in byte order
                listed = _byte_order(listed, steps.shape[1])
            starts = np.add.accumulate(counts, dtype=np.intp)
            starts -= counts
            index = _input_rows(pos, self.width, r0, counts, per, self.span, listed, self.slots)
            if few:
                _accumulate(xz, index, starts, out[r0:r1], counts)
            elif self.split:
                _padded_sums(xz, index, starts, out[r0:r1], counts, pairwise=True)
            else:
                columns.accumulate(index, starts, out[r0:r1])
        return np.subtract(out[:self.rows], out[self.rows:]) if self.split else out


def positions(steps: np.ndarray, before: int, span: int = SPAN) -> np.ndarray:
    """Positions modulo ``span`` of transposed steps (L, C): entry (l, j) is byte j·L + l, whose
    position is ``before + Σ_{i <= j·L + l} (step_i + 1)``. uint16, shape (L, C)."""
    acc = np.add(steps, 1, dtype=np.uint16)  # each byte's step + 1
    _down_columns(acc)
    total = acc[-1]  # each column's sum
    start = np.add.accumulate(total, dtype=np.uint16)  # wraps modulo 2^16, as wanted
    start -= total
    start += np.uint16(before & 0xFFFF)
    acc += start
    if span < SPAN:
        acc &= np.uint16(span - 1)
    return acc


def _down_columns(a: np.ndarray) -> None:
    """In place, the prefix sums of ``a`` (L, …) down its first axis: L − 1 additions of contiguous
    rows (the row views taken once: indexing costs as much as a small addition)."""
    rows = list(a)
    for prev, cur in zip(rows, rows[1:]):
        np.add(cur, prev, cur)


def _row_sums(v: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row, the sum of its bytes' values, from the gathered values v (L, C, M) in transposed order
    (or (L, C) for one column: 1-D column totals make ``reduceat`` cheaper).

    After the prefix sums down each column, P(l, j) is the sum of column j's bytes up to l and
    P(L − 1, j) the column's total. With F the running sum over the bytes, row r's sum is
    F(its last byte) − F(row r − 1's), and F at byte (l, j) is the totals of the columns before j
    plus P(l, j). So the sum is the totals of the columns from row r − 1's last column up to
    (not including) row r's, one ``reduceat`` segment, plus P at its last byte minus P at row
    r − 1's. Returns (rows, M) float32 (or (rows,)). The rounding of a row's sum involves the values of the
    (at most 15) bytes before it in its first column, so it is relative to those neighbours' values
    as well as its own; a non-finite input value reaches its neighbouring rows, as it reaches every
    row of the dense float product (0 · inf is NaN).
    """
    c, rest = v.shape[1], v.shape[2:]
    _down_columns(v)
    last = np.add.accumulate(counts, dtype=np.intp)
    last -= 1  # each row's last byte (−1: none yet)
    lead = int(np.searchsorted(last, 0)) if counts[0] == 0 else 0  # rows before the first byte: F is 0
    col = np.empty(counts.size + 1, np.intp)  # the column of the last byte so far, 0 before any
    col[0] = 0
    np.right_shift(last, _SHIFT, out=col[1:])
    at = last & (L - 1)
    at *= c
    at += col[1:]
    inside = np.empty((counts.size + 1, *rest), np.float32)  # P at the last byte so far
    inside[0] = 0
    v.reshape(-1, *rest).take(at, axis=0, out=inside[1:], mode="wrap")
    if lead:
        col[1:lead + 1] = 0
        inside[1:lead + 1] = 0
    between = np.add.reduceat(v[-1], col, axis=0)[:-1]  # totals of columns col[r] … col[r + 1] − 1
    between[col[1:] == col[:-1]] = 0  # no column between (reduceat gives the column's own total)
    between += inside[1:]
    between -= inside[:-1]
    return between


def _table(x2: np.ndarray, span: int, rows: int, slots: bool = False) -> np.ndarray:
    """Row ``p mod span`` of position p is the input row its point reads (x2: (W, M)): x2 once per
    row of a span, then zeros for the dead tail (``slots``: and at every zero slot); just the rows
    when they all fit in one span (x2 itself for one row, or for rows of W = span positions)."""
    w, m = x2.shape
    per = per_span(w, span, slots)
    n = min(rows, per)
    if not slots:
        if w == span or rows == 1:
            return x2
        size = span if rows > n else n * w
        out = np.empty((size, m), np.float32)
        out[:n * w].reshape(n, w, m)[:] = x2
        out[n * w:] = 0
        return out
    blocks = -(-n * w // 255)
    lin = np.empty((blocks * 255, m), np.float32)
    lin[:n * w].reshape(n, w, m)[:] = x2
    lin[n * w:] = 0
    size = span if rows > n else blocks * 256
    out = np.empty((size, m), np.float32)
    at = out[:blocks * 256].reshape(blocks, 256, m)
    at[:, :255] = lin.reshape(blocks, 255, m)
    at[:, 255] = 0
    out[blocks * 256:] = 0
    return out


def _input_rows(pos: np.ndarray, width: int, row0: int, counts: np.ndarray, m: int, span: int,
                listed: np.ndarray, slots: bool = False) -> np.ndarray:
    """The input row (one of W, or W for the zero row) each position (modulo ``span``) reads, for the
    bytes of rows ``row0`` on (``counts`` bytes each), m rows to a span: a point of row r is at point
    position (r mod m)·W + its column within the span (subtracted per row: no division per byte). A
    hop reads the zero row: one in a dead tail is past the span's last row, a listed one
    (``listed``: its byte index) is set, one on a zero slot (``slots``) is found by its position.
    An intp ``pos`` (a small weight's, decoded in byte order) is overwritten instead of copied."""
    p = np.asarray(pos, np.intp)
    if slots:
        zero = (p & 255) == 255
        p -= p >> 8  # the point position within the span
    if m > 1:
        p -= np.repeat(width * (np.arange(row0, row0 + counts.size) % m), counts)
    if slots:
        np.copyto(p, width, where=zero)
    elif m * width < span:
        np.minimum(p, width, out=p)
    p[listed] = width
    return p


def _byte_order(listed: np.ndarray, cols: int) -> np.ndarray:
    """Indices into a transposed chunk's (L, C) bytes flattened, as indices of the bytes in order."""
    return listed % cols * L + listed // cols


def _chunks(steps: np.ndarray, counts: np.ndarray, listed: np.ndarray) -> list:
    """Row ranges of at most ``CHUNK_BYTES`` bytes (or one row beyond), each with the position before
    it, its bytes transposed to (L, C), zero-padded, and its listed hops (int32 indices into those
    bytes flattened); a weight of at most ``FLAT_BYTES`` bytes is one chunk of its bytes in order
    (1-D), with the position before it as is (−1) and its listed hops as byte indices."""
    if steps.size <= FLAT_BYTES:
        return [(0, counts.size, -1, steps.copy(), listed.astype(np.int32))]
    ends = np.cumsum(counts, dtype=np.int64)
    out, r0, b0, before = [], 0, 0, -1
    while r0 < counts.size:
        r1 = min(counts.size, max(r0 + 1, int(np.searchsorted(ends, b0 + CHUNK_BYTES, "right"))))
        b1 = int(ends[r1 - 1])
        n = b1 - b0
        cols = -(-n // L)
        block = np.zeros(cols * L, np.uint8)
        block[:n] = steps[b0:b1]
        block = np.ascontiguousarray(block.reshape(cols, L).T)
        mine = listed[np.searchsorted(listed, b0):np.searchsorted(listed, b1)] - b0
        out.append((r0, r1, before & 0xFFFF, block, (mine % L * cols + mine // L).astype(np.int32)))
        before += n + int(steps[b0:b1].sum(dtype=np.int64))
        r0, b0 = r1, b1
    return out
