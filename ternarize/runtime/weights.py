"""Resident weights: one owned buffer of encoded bytes, and a matmul for each encoding (numpy only).

Every weight op computes ``θ @ X`` (or ``W @ X`` for a float weight) for ``X`` of shape
(groups·K, M) and returns (O, M) float32; output rows ``[i·O/g, (i+1)·O/g)`` read input rows
``[i·K, (i+1)·K)`` (grouped convolution; ``groups = 1`` for linear layers). The sparse ops have
``zero_row = True``: the convolution then passes its patches with one more row, of zeros, and
``matmul(x, zero_row=True)`` reads that row for the padding of its gathers instead of copying x.

==========  =================================================================================
encoding    how it is applied
==========  =================================================================================
``t2``      a block of output rows is unpacked through a 256-entry table (byte → 4 floats) into
            at most ``BLOCK_BYTES`` of float32, multiplied with BLAS, and the next block reuses
            the memory; the input gets zero rows for the padding codes of each row's last byte
``b1``      the same with a byte → 8 floats table (bit 1 → +1, bit 0 → −1); padding bits meet the
            zero rows of the padded input
``ts``      :class:`~ternarize.runtime.sparse.SparseCodes` (the stream as stored) or, when the
            runtime re-encodes it at load, :class:`~ternarize.runtime.gaps.GapCodes` (a byte per
            non-zero weight): additions and subtractions only
``f32``     a zero-copy float32 view of the buffer: one BLAS matmul per group
``f16``     blocks of rows converted to float32, as for ``t2``
==========  =================================================================================

:class:`Store` copies the encoded bytes of every tensor out of the loaded file into one owned,
buffer (float tensors aligned for zero-copy views), so the file itself (header, padding) is not kept alive: what stays
resident is exactly ``Store.nbytes`` plus the small per-tensor tables the ops report.

Example::

    store = Store(tern.load("model.tern"))
    w = weight_op(store, "fc1.weight", groups=1)
    y = w.matmul(x.T)          # (O, N)
"""

from __future__ import annotations

import numpy as np

from ..pack import rows_cols
from .sparse import SparseCodes

BLOCK_BYTES = 1 << 20  # bound on one block of unpacked float32 rows
_ALIGN = {"f32": 4, "f16": 2}  # what a zero-copy float view needs; codes are bytes


def _table(fields: int) -> np.ndarray:
    """byte → its ``fields`` values as float32: t2 codes (2 bits, 0/+1/−1) or b1 bits (±1)."""
    b = np.arange(256)[:, None]
    if fields == 4:
        code = (b >> (2 * np.arange(4))) & 3
        return np.select([code == 1, code == 3], [1.0, -1.0], 0.0).astype(np.float32)
    return np.where((b >> np.arange(8)) & 1, 1.0, -1.0).astype(np.float32)


_T2, _B1 = _table(4), _table(8)


class Store:
    """The encoded bytes of every tensor of a TernFile, copied into one owned buffer.

    ``skip``: tensors held in another form (re-encoded ``ts`` weights): their bytes are not copied.
    """

    def __init__(self, tf, skip=()):
        self.entries = {e.name: e for e in tf.tensors}
        self.offsets, total = {}, 0
        kept = [e for e in tf.tensors if e.name not in skip]
        for e in kept:
            align = _ALIGN.get(e.encoding, 1)
            total = -(-total // align) * align
            self.offsets[e.name] = total
            total += e.nbytes
        self.buf = np.zeros(total, np.uint8)
        for e in kept:
            o = self.offsets[e.name]
            self.buf[o:o + e.nbytes] = np.frombuffer(tf.raw(e.name), np.uint8)
        self.buf.flags.writeable = False

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    def raw(self, name: str) -> np.ndarray:
        """The encoded bytes of ``name``: a read-only view of the buffer."""
        o = self.offsets[name]
        return self.buf[o:o + self.entries[name].nbytes]

    def floats(self, name: str) -> np.ndarray:
        """A float vector as a zero-copy view of the buffer: float32 for f32, float16 for f16. The
        kernels combine it with float32 activations, so an f16 value is widened exactly where it is
        used and the resident bytes stay the encoded ones."""
        e = self.entries[name]
        return self.raw(name).view("<f4" if e.encoding == "f32" else "<f2").reshape(e.shape)


def weight_op(store: Store, name: str, groups: int = 1, cache_indices: bool = False):
    """The matmul op of weight ``name`` in its stored encoding (``ts``: the stream, decoded per call,
    or with ``cache_indices`` its decoded positions)."""
    e = store.entries[name]
    raw = store.raw(name)
    if e.encoding == "ts":
        return SparseCodes(raw, e.shape, e.params, groups, cache_indices)
    if e.encoding == "f32":
        return FloatWeight(raw.view("<f4").reshape(rows_cols(e.shape)), groups)
    return DenseCodes(raw, e.shape, e.encoding, groups)


class FloatWeight:
    """A float32 weight kept as a view of the buffer: one BLAS matmul per group."""

    nbytes = 0  # the view adds nothing to the buffer

    def __init__(self, w: np.ndarray, groups: int):
        self.w, self.groups = w, groups

    def matmul(self, x: np.ndarray) -> np.ndarray:
        o, k = self.w.shape
        if self.groups == 1:
            return self.w @ x
        og = o // self.groups
        out = np.empty((o, x.shape[1]), np.float32)
        for g in range(self.groups):
            np.matmul(self.w[g * og:(g + 1) * og], x[g * k:(g + 1) * k], out=out[g * og:(g + 1) * og])
        return out


class DenseCodes:
    """A t2, b1 or f16 weight, unpacked one block of output rows at a time and multiplied.
    ``owned``: ``raw`` is its own memory (a ``ts`` weight held as t2 codes), not a view of the
    store, and counts in ``nbytes``."""

    def __init__(self, raw: np.ndarray, shape, encoding: str, groups: int, owned: bool = False):
        self.nbytes = raw.nbytes if owned else 0
        self.rows, self.cols = rows_cols(shape)
        self.groups, self.encoding = groups, encoding
        if encoding == "f16":
            self.codes, self.width = raw.view("<f2").reshape(self.rows, self.cols), self.cols
        else:
            per_byte = 4 if encoding == "t2" else 8
            self.table = _T2 if encoding == "t2" else _B1
            self.codes = raw.reshape(self.rows, -(-self.cols // per_byte))
            self.width = self.codes.shape[1] * per_byte  # K rounded up to whole bytes
        self.block = max(1, BLOCK_BYTES // (4 * self.width))

    def unpack(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 as float32 (r1 − r0, width): the only place codes become floats."""
        if self.encoding == "f16":
            return self.codes[r0:r1].astype(np.float32)
        return self.table.take(self.codes[r0:r1], axis=0).reshape(r1 - r0, self.width)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        m = x.shape[1]
        og = self.rows // self.groups
        out = np.empty((self.rows, m), np.float32)
        for g in range(self.groups):
            xg = x[g * self.cols:(g + 1) * self.cols]
            if self.width != self.cols:  # zero rows meet the padding codes of each row's last byte
                xg = np.concatenate([xg, np.zeros((self.width - self.cols, m), np.float32)])
            for r0 in range(g * og, (g + 1) * og, self.block):
                r1 = min((g + 1) * og, r0 + self.block)
                np.matmul(self.unpack(r0, r1), xg, out=out[r0:r1])
        return out
