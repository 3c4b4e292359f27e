"""Sparse ternary weights (``ts``) used straight from their Rice-coded stream (numpy only).

A ``ts`` tensor of R rows and K columns is stored as blocks of ``B`` rows (formats/TERN.md §5.3):
per block a unary stream (one 1 bit ends each event's quotient), a remainder stream (k bits per
event) and a sign stream (1 bit per event). :class:`SparseCodes` keeps those bytes as they are and,
on every call, decodes a *group* of consecutive blocks (at most ``EVENTS_PER_GROUP`` non-zero
weights) with a fixed number of vectorized passes, then computes

    Y[r, :] = Σ_{c: θ[r,c] = +1} X[c, :] − Σ_{c: θ[r,c] = −1} X[c, :]

with gathers and additions only. Up to ``FEW_COLUMNS`` input columns (a linear layer at a small
batch): the events' codes ``2·column + sign`` index the rows of ``[x₀, −x₀, x₁, −x₁, …]`` (the sign
is part of the gather index, no multiply), and ``np.add.reduceat`` sums each output row's segment.
More columns (:class:`Columns`): output rows are taken by event count in blocks, each block's events padded to a
(count × rows) index matrix with a zero input row, gathered as whole input rows and summed over
the first axis, so each addition runs over many contiguous floats; the sign is either part of the
index into an interleaved copy (x at even, −x at odd rows: when the events outnumber the input's
floats) or split off (+1 and −1 events summed apart, pairwise, and subtracted: a convolution's
patches are read as they are). The per-channel scale is applied by the caller, once per output.

Decoding a group, without any Python loop per event (only per block, to slice the streams):

* ``ends``: positions of the 1 bits of the group's concatenated unary streams (``flatnonzero``).
  The number of zeros before event j's 1 bit is the sum of the quotients up to j.
* remainders: each block's stream, zero-padded to whole 8-event groups of k bytes, is read 8
  fields at a time: a byte table for k = 1, 2, 4, else eight passes, one per slot, over the
  transposed bytes. Their running sum is formed inside each 8-event group (for k <= 5 by one
  multiplication of the 8 byte lanes of a uint64 by 0x0101010101010101, else by 7 additions of
  contiguous rows) plus a cumsum over the groups; padding slots hold 0 and are dropped afterwards
  (the sign stream is padded to 8 events per block in exactly the same way).
* ``T = 2·Σ(r − (2^k − 1)) + (ends << (k + 1))`` is strictly increasing over the group and
  differs from each event's doubled cell (row·K + column within its block) by one constant per
  block; the constants, the row boundaries (``searchsorted`` on ``T``) and a per-row offset turn
  ``T`` into the gather index ``2·(g·K + column) + sign``.

Cost: about 25 numpy passes over the group's events, i.e. some 15–30 ns per non-zero weight and
call, however large the batch; the gathers and sums then cost per column of ``X``.
``cache_indices=True`` (``Runtime.load(sparse="indices")``) keeps the decoded gather indices and row
starts (int32, about 4 bytes per non-zero weight) instead of decoding on every call: faster, and
reported as such by ``Runtime.weight_bytes``. :mod:`ternarize.runtime.gaps` re-encodes the decoded
positions as a byte per non-zero weight: nearly as fast, at about 1.2× the stream's bytes.

Example::

    w = SparseCodes(np.frombuffer(buf, np.uint8), shape=(300, 784), params={"block_rows": 84, "k": 4})
    y = w.matmul(x.T)          # (300, N) = θ @ xᵀ, float32
"""

from __future__ import annotations

import struct

import numpy as np

from ..pack import rows_cols

EVENTS_PER_GROUP = 1 << 16  # non-zeros decoded together: about 40 bytes of temporaries each (2.5 MiB)
GATHER_BYTES = 1 << 20  # bound on the gathered (events × columns) float32 temporary (L2-sized)
SPLIT = 8  # several columns: split the events by sign (no copy of the input) when 8 · events < K · M
FEW_COLUMNS = 7  # up to this many columns, each event gathers a row of the interleaved input (decoded once)
PAIRWISE = 32  # the split form's sums of one sign fold pairwise down to this many rows (_sum_first)
_ZERO = np.zeros(64, np.uint8)


def block_table(buf: np.ndarray, rows: int, block_rows: int, k: int) -> np.ndarray:
    """Per block: ``(n_events, offset of its unary stream)``, the only state kept beside the bytes.

    ``buf`` was fully validated by ``tern.load``; this walk only reads the 8-byte block headers.
    int32 when the buffer allows (8 bytes per block of about 65 536 weights).
    """
    nblocks = -(-rows // block_rows)
    table = np.empty((nblocks, 2), np.int32 if buf.size < (1 << 31) else np.int64)
    at = 0
    for b in range(nblocks):
        n, n_unary = struct.unpack_from("<II", buf, at)
        table[b] = (n, at + 8)
        at += 8 + n_unary + (n * k + 7) // 8 + (n + 7) // 8
    return table


def _spans(table: np.ndarray, size: int, k: int) -> np.ndarray:
    """(n, unary start, n_unary, n_rem, n_sign) per block, int64, from the compact table."""
    n, u0 = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
    n_rem, n_sign = (n * k + 7) // 8, (n + 7) // 8
    block_end = np.append(u0[1:] - 8, size)
    return np.stack([n, u0, block_end - u0 - n_rem - n_sign, n_rem, n_sign], axis=1)


def _groups(events: np.ndarray, cap: int) -> list[tuple[int, int]]:
    """Consecutive block ranges holding at most ``cap`` events each (or one block beyond it)."""
    out, b0, total = [], 0, 0
    for b, n in enumerate(events.tolist()):
        if b > b0 and total + n > cap:
            out.append((b0, b))
            b0, total = b, 0
        total += n
    out.append((b0, len(events)))
    return out


class SparseCodes:
    """A ``ts`` ternary weight of shape (O, C/g, ...) applied with additions and subtractions only.

    ``groups``: output rows ``[i·O/g, (i+1)·O/g)`` read input rows ``[i·K, (i+1)·K)`` (grouped conv).
    """

    def __init__(self, buf: np.ndarray, shape, params: dict, groups: int = 1, cache_indices: bool = False):
        self.buf = buf
        self.rows, self.cols = rows_cols(shape)
        self.groups = groups
        self.block_rows, self.k = int(params["block_rows"]), int(params["k"])
        self.table = block_table(buf, self.rows, self.block_rows, self.k)
        self.plan = _groups(self.table[:, 0], EVENTS_PER_GROUP)
        self.cache = self.decode_all() if cache_indices else None

    @property
    def nbytes(self) -> int:
        """Resident bytes beyond the shared encoded buffer: the block table (and the cache)."""
        return self.table.nbytes + (self.cache[0].nbytes + self.cache[1].nbytes if self.cache else 0)

    zero_row = True  # matmul takes the convolution's patches with a zero last row as they are

    def matmul(self, x: np.ndarray, zero_row: bool = False) -> np.ndarray:
        """θ @ x for x of shape (groups·K, M) (with ``zero_row``: one more row, zero): (O, M) float32."""
        m = x.shape[1]
        out = np.empty((self.rows, m), np.float32)
        if m <= FEW_COLUMNS:
            x2 = interleave(x[:x.shape[0] - zero_row])
            acc = lambda index, starts, o: _accumulate(x2, index, starts, o)  # noqa: E731
        else:
            acc = Columns(x, zero_row, int(self.table[:, 0].sum())).accumulate
        if self.cache is not None:
            acc(*self.cache, out)
            return out
        spans, rows2 = self._layer()
        for b0, b1 in self.plan:
            r0, r1 = b0 * self.block_rows, min(self.rows, b1 * self.block_rows)
            decoded = self._decode(spans[b0:b1], rows2[:, r0:r1])
            if decoded is None:
                out[r0:r1] = 0
            else:
                acc(*decoded, out[r0:r1])
        return out

    def decode_all(self):
        """Every group decoded once and joined: (int32 gather indices, int32 row starts)."""
        spans, rows2 = self._layer()
        index, starts, n = [], [], 0
        for b0, b1 in self.plan:
            r0, r1 = b0 * self.block_rows, min(self.rows, b1 * self.block_rows)
            decoded = self._decode(spans[b0:b1], rows2[:, r0:r1])
            if decoded is None:
                starts.append(np.full(r1 - r0, n, np.intp))
            else:
                index.append(decoded[0])
                starts.append(decoded[1] + n)
                n += decoded[0].size
        index = np.concatenate(index) if index else np.zeros(0, np.intp)
        return index.astype(np.int32 if 2 * self.groups * self.cols < (1 << 31) else np.intp), \
            np.concatenate(starts).astype(np.int32 if n < (1 << 31) else np.intp)

    def _layer(self):
        """Per call, once per layer: the block spans, and per row 2·K·(row in its block) and
        2·K·(its group), the doubled offsets of its cells and of its group's input rows."""
        spans = _spans(self.table, self.buf.size, self.k)
        rows = np.arange(self.rows)
        rows2 = np.stack([rows % self.block_rows, rows // (self.rows // self.groups)])
        rows2 *= 2 * self.cols
        return spans, rows2

    # ------------------------------------------------------------------ decoding one group of blocks
    def _decode(self, t: np.ndarray, rows2: np.ndarray):
        """Gather indices 2·(g·K + column) + sign, row-major, and each row's first event (or None).

        ``t``: the group's spans (n, unary start, n_unary, n_rem, n_sign per block); ``rows2``:
        the group's rows of ``_layer``.
        """
        events = t[:, 0]
        n = int(events.sum())
        if n == 0:
            return None
        spans = t.tolist()
        slot0 = 8 * (np.cumsum(t[:, 4]) - t[:, 4])  # first padded slot of each block
        real = _compactor(slot0.tolist(), events.tolist(), n, 8 * int(t[:, 4].sum()))
        index, offset = self._increasing(spans, t, slot0, real, n)
        first = np.cumsum(events) - events
        per_block = np.minimum(self.block_rows, rows2.shape[1] - np.arange(len(t)) * self.block_rows)
        base = np.repeat(offset, per_block)
        # row ρ of block b starts at its first event with T + offset_b >= 2·K·ρ
        starts = np.searchsorted(index, rows2[0] - base)
        np.clip(starts, np.repeat(first, per_block), np.repeat(first + events, per_block), out=starts)
        base += rows2[1] - rows2[0]  # from the doubled cell to the doubled input row
        index += np.repeat(base, np.diff(starts, append=n))
        sign = np.concatenate([self.buf[u0 + nu + nr:u0 + nu + nr + ns] for _, u0, nu, nr, ns in spans])
        index += real(np.unpackbits(sign, bitorder="little"))
        return index, starts

    def _increasing(self, spans: list, t: np.ndarray, slot0: np.ndarray, real, n: int):
        """T = 2·Σ_{i<=j} (r_i − mask) + (ends_j << (k+1)), strictly increasing over the group, and
        per block the constant that turns T into the doubled cell 2·(row·K + column) in the block."""
        k = self.k
        unary = np.concatenate([self.buf[u0:u0 + nu] for _, u0, nu, _, _ in spans])
        ends = np.flatnonzero(np.unpackbits(unary, bitorder="little").view(bool))
        np.left_shift(ends, k + 1, out=ends)  # each 1 bit ends a quotient: Σ q = zeros before it
        if k:
            prefix, r_first = self._remainder_prefix(spans, int(t[:, 4].sum()), slot0)
            index = real(prefix)
            index -= np.arange(0, ((1 << k) - 1) * n, (1 << k) - 1)
            index <<= 1
            index += ends
        else:
            index, r_first = ends, np.zeros(len(t), np.intp)  # offsets below read ends first
        events = t[:, 0]
        nz = events > 0
        f = (np.cumsum(events) - events)[nz]  # each nonempty block's first event
        unary_bits = 8 * (np.cumsum(t[:, 2]) - t[:, 2])
        offset = np.zeros(len(t), np.intp)
        offset[nz] = ends[f] - (unary_bits[nz] << (k + 1)) + 2 * r_first[nz] - index[f]
        return index, offset

    def _remainder_prefix(self, spans: list, ngroups: int, slot0: np.ndarray):
        """Inclusive prefix sums of the remainders over the padded slots, and each block's first one.

        Each block's stream is zero-padded to whole 8-event groups of k bytes; padding slots hold 0,
        so they do not change the sums of the events before them.
        """
        k = self.k
        pieces = []
        for _, u0, nu, nr, ns in spans:
            pieces.append(self.buf[u0 + nu:u0 + nu + nr])
            if ns * k > nr:
                pieces.append(_ZERO[:ns * k - nr])
        p = np.concatenate(pieces)
        # each block's first slot; an empty block's (read, never used) may be past the last slot
        first = np.minimum(slot0 // 8, ngroups - 1)
        if k <= 5:  # 8 fields of k bits fit the byte lanes of a uint64, sums included
            fields = _LUT[k].take(p, axis=0).reshape(ngroups, 8) if k in _LUT else \
                np.ascontiguousarray(_slots(p, ngroups, k).T)
            r_first = fields[first, 0].astype(np.intp)
            lanes = fields.view("<u8") * np.uint64(0x0101010101010101)  # lane s: Σ of fields 0..s
            lanes = lanes.astype("<u8", copy=False).view(np.uint8).reshape(ngroups, 8)
        else:
            lanes = _slots(p, ngroups, k)  # (8, groups), wide enough for the sums
            r_first = lanes[0, first].astype(np.intp)
            for s in range(1, 8):
                lanes[s] += lanes[s - 1]
            lanes = lanes.T
        totals = np.cumsum(lanes[:, 7], dtype=np.intp)
        totals -= lanes[:, 7]
        prefix = np.empty((ngroups, 8), np.intp)
        np.add(lanes, totals[:, None], out=prefix)
        return prefix.reshape(-1), r_first


def _compactor(slot0: list, events: list, n: int, slots: int):
    """A function dropping the padding slots (after each block's events) from a padded array."""
    if n == slots:
        return lambda a: a
    return lambda a: np.concatenate([a[s:s + e] for s, e in zip(slot0, events)])


def _byte_fields(k: int) -> np.ndarray:
    """byte → its 8/k fields of k bits (least significant first), as uint8 (k = 1, 2, 4)."""
    return ((np.arange(256)[:, None] >> (k * np.arange(8 // k))) & ((1 << k) - 1)).astype(np.uint8)


_LUT = {k: _byte_fields(k) for k in (1, 2, 4)}


def _slots(p: np.ndarray, ngroups: int, k: int) -> np.ndarray:
    """Remainders from whole 8-event groups of k bytes, as (8, groups): slot s is at bit s·k.

    The bytes are transposed first so that every pass below runs over contiguous rows. The dtype
    leaves room for the in-place prefix sums over the 8 slots (8·(2^k − 1) must fit).
    """
    mask = (1 << k) - 1
    dtype = np.uint8 if k <= 5 else np.uint16 if k <= 13 else np.uint32
    pt = np.ascontiguousarray(p.reshape(ngroups, k).T)  # (k, groups)
    out = np.empty((8, ngroups), dtype)
    wide = np.empty(ngroups, np.uint32)
    for s in range(8):
        byte, shift = (s * k) >> 3, (s * k) & 7
        if shift + k <= 8:
            np.right_shift(pt[byte], shift, out=wide, dtype=np.uint32)
        else:  # the field straddles two to four bytes (shift + k <= 27)
            np.left_shift(pt[byte + 1], 8, out=wide, dtype=np.uint32)
            wide |= pt[byte]
            for extra in range(2, (shift + k + 7) // 8):
                wide |= pt[byte + extra].astype(np.uint32) << np.uint32(8 * extra)
            wide >>= np.uint32(shift)
        np.bitwise_and(wide, mask, out=out[s], casting="unsafe")
    return out


def interleave(x: np.ndarray, zero_row: bool = False) -> np.ndarray:
    """The input as the gathers with the sign in the index read it: rows x₀, −x₀, x₁, −x₁, …
    (2·K, M), with ``zero_row`` one more row of zeros (the code 2·K)."""
    k, m = x.shape
    x2 = np.empty((2 * k + zero_row, m), np.float32)
    x2[0:2 * k:2] = x
    np.negative(x2[0:2 * k:2], out=x2[1:2 * k:2])  # from the copy: x may be a transposed view
    if zero_row:
        x2[2 * k] = 0
    return x2


class Columns:
    """The input of a product with M > 1 columns, prepared for gathers of whole rows.

    ``x``: (K, M), or with ``zero_row`` (K + 1, M) whose last row is zero (as the convolution kernel
    builds its patches). The events' codes are 2·k + s (s = 1 for −1; 2·K reads zero). Two ways:

    * *interleaved*, when the events outnumber the input's floats (about K·M/8 or more, e.g. a
      linear layer over a batch): a (2K + 1, M) copy holding x at even rows, −x at odd rows and a
      zero last row, gathered with the codes as they are;
    * *split by sign*, when the events are few beside the input (a convolution's patch matrix):
      no copy of the input; the events are regrouped as 2R rows, each output row's +1 events
      then its −1 events, summed from the input with its zero row, and the halves subtracted.
    """

    def __init__(self, x: np.ndarray, zero_row: bool, events: int):
        k, m = x.shape[0] - zero_row, x.shape[1]
        self.split = SPLIT * events < k * m
        if not self.split:
            self.x = interleave(x[:k], zero_row=True)
        elif zero_row:
            self.x = np.ascontiguousarray(x)
        else:
            self.x = np.empty((k + 1, m), np.float32)
            self.x[:k] = x
            self.x[k] = 0

    def accumulate(self, index: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
        """out[r] = the signed sum of the input rows of events starts[r] to starts[r + 1]."""
        if not self.split:
            _padded_sums(self.x, index, starts, out)
            return
        n, rows = index.size, starts.size
        row = np.repeat(np.arange(rows), np.diff(starts, append=n))
        neg = (index & 1).astype(bool)
        plus, minus = np.flatnonzero(~neg), np.flatnonzero(neg)
        k = index >> 1
        counts = np.concatenate([np.bincount(row[plus], minlength=rows), np.bincount(row[minus], minlength=rows)])
        sums = np.empty((2 * rows, self.x.shape[1]), np.float32)
        _padded_sums(self.x, np.concatenate([k[plus], k[minus]]), np.cumsum(counts) - counts, sums, counts, True)
        np.subtract(sums[:rows], sums[rows:], out=out)


def _accumulate(x2: np.ndarray, index: np.ndarray, starts: np.ndarray, out: np.ndarray,
                counts: np.ndarray | None = None) -> None:
    """A few columns: out[r] = Σ x2[index[starts[r]:starts[r+1]]] (x2: rows to gather, e.g. from
    ``interleave``): one gather of rows, then ``np.add.reduceat`` over the rows' segments.
    ``counts``: each row's number of indices, when known (else from ``starts``)."""
    n = index.size
    v = np.empty((n + 1, x2.shape[1]), np.float32)
    v[n] = 0  # reduceat needs indices < len: an empty last row points here
    x2.take(index, axis=0, out=v[:n], mode="wrap")  # in range by construction: "wrap" checks fastest
    np.add.reduceat(v, starts, axis=0, out=out)
    empty = counts == 0 if counts is not None else np.diff(starts, append=n) == 0
    out[empty] = 0  # reduceat returns the element at an empty segment's start


def _padded_sums(x: np.ndarray, index: np.ndarray, starts: np.ndarray, out: np.ndarray,
                 counts: np.ndarray | None = None, pairwise: bool = False) -> None:
    """out[r] = Σ x[index[starts[r]:starts[r+1]]] for x (rows, M) whose last row is zero
    (``counts``: each row's number of indices, when known; else from ``starts``; ``pairwise``: the
    sums of one sign's events, which the caller subtracts, see :func:`_sum_first`).

    Output rows are taken in order of their number of events, in blocks of rows whose gather fits
    ``GATHER_BYTES`` (one row at least; a row too long for it alone goes by column slices). A block
    of r rows with at most d events each is an (r, d) index matrix, each row's events then the zero
    row; all blocks lie end to end in one buffer, filled by one scatter of the events (a row's
    events land contiguously). Each block is gathered as (d, r, M) and summed over its first axis:
    every addition runs over r·M contiguous floats, where summing each row's segment separately
    runs over M.
    """
    n, rows, m = index.size, starts.size, x.shape[1]
    zero = x.shape[0] - 1
    if counts is None:
        counts = np.diff(starts, append=n)
    order = np.argsort(counts, kind="stable")
    cs = counts[order]
    row_bytes = 4 * m
    blocks, q0, size = [], int(np.searchsorted(cs, 1)), 0  # rows without events stay 0
    first = q0
    while q0 < rows:
        q1 = min(rows, q0 + max(1, GATHER_BYTES // (row_bytes * int(cs[q0]))))
        while q1 > q0 + 1 and (q1 - q0) * int(cs[q1 - 1]) * row_bytes > GATHER_BYTES:
            q1 = q0 + max(1, GATHER_BYTES // (row_bytes * int(cs[q1 - 1])))
        d = int(cs[q1 - 1])
        blocks.append((q0, q1, d, size))
        size += d * (q1 - q0)
        q0 = q1
    sums = np.empty((rows, m), np.float32)
    sums[:first] = 0
    if blocks:
        # where each sorted row's events start in the buffer: its block's offset + its place × d
        width = np.array([q1 - q0 for q0, q1, _, _ in blocks], np.intp)
        depth = np.array([d for _, _, d, _ in blocks], np.intp)
        offset = np.array([o - q0 * d for q0, _, d, o in blocks], np.intp)
        slot = np.zeros(rows, np.intp)
        slot[first:] = np.repeat(offset, width) + np.arange(first, rows) * np.repeat(depth, width)
        base = np.empty(rows, np.intp)
        base[order] = slot
        base -= starts
        at = np.repeat(base, counts)
        at += np.arange(n)
        buf = np.full(size, zero, np.intp)
        buf[at] = index
        for q0, q1, d, o in blocks:
            p = buf[o:o + d * (q1 - q0)].reshape(q1 - q0, d).T
            if d * (q1 - q0) * row_bytes <= GATHER_BYTES:
                _sum_first(x.take(p, axis=0, mode="clip"), sums[q0:q1], pairwise)
            else:  # one row whose events alone exceed the bound: column slices
                step = max(1, GATHER_BYTES // (4 * d))
                for m0 in range(0, m, step):
                    _sum_first(x[p, m0:m0 + step], sums[q0:q1, m0:m0 + step], pairwise)
    out[order] = sums


def _sum_first(g: np.ndarray, out: np.ndarray, pairwise: bool) -> None:
    """out = Σ g over its first axis; ``pairwise``: overwriting g, its second half of rows added to
    the first until ``PAIRWISE`` rows or fewer are left (one more call per halving), then summed.

    ``np.sum`` over a first axis keeps one running sum, rounded at the size of the whole sum at
    each of the d additions, as a plain float32 dot product's is. The split form sums each sign's
    events apart and subtracts; for inputs of one sign (after a ReLU or a hardtanh) the two sums
    are each far larger than their difference, which keeps both sums' errors: 2.8e-4 of the result
    at 5 200 events per sign and batch 64, where the signed running sum's is 2.8e-6. Folded, the
    running sum covers at most 32 partial sums: 2–7e-6 of the result where the signed running
    sum's is 1–6e-6. Folding on down to one row gains up to 2× more but costs a convolution's
    short sums (16–64 events) a pass or two more (VGG at batch 64: 3–8 % slower, against 0–4 %).
    The signed sums (interleaved input) keep the one running sum.
    """
    n = g.shape[0]
    while pairwise and n > PAIRWISE:
        h = (n + 1) // 2
        np.add(g[:n - h], g[h:n], out=g[:n - h])
        n = h
    np.sum(g[:n], axis=0, out=out)
