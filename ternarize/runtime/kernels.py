"""The op kernels of the reference runtime: torch semantics in numpy (numpy only).

Each kernel takes float32 NCHW (or (N, K)) arrays and returns a new float32 array; ``flatten`` and
``reshape`` return views. Convolution is im2col followed by the layer's weight op (see
:mod:`ternarize.runtime.weights`), in chunks of samples so that the patch matrix stays under
``PATCH_BYTES`` (one sample's patches at least). Pooling follows torch exactly: max-pool pads with
−inf and supports dilation; both pools follow torch's ``ceil_mode`` output size, and avg-pool's
divisor counts the window clipped to the padded input (``count_include_pad``) or to the input.

Example::

    y = maxpool2d(x, kernel=[2, 2], strides=[2, 2], pads=[0, 0], dilations=[1, 1], ceil_mode=False)
"""

from __future__ import annotations

import numpy as np

from ..graph import out_size

PATCH_BYTES = 16 << 20  # bound on one chunk of the im2col patch matrix


def samples_per_chunk(c: int, kh: int, kw: int, oh: int, ow: int) -> int:
    """Samples of a convolution whose im2col patches (a zero row included) fit ``PATCH_BYTES``, one
    at least: :func:`conv2d` works in chunks of that many, ``plan.node_temp_bytes`` counts them."""
    return max(1, PATCH_BYTES // (4 * (c * kh * kw + 1) * oh * ow))


# ---------------------------------------------------------------------- weighted layers


def _f32(v: np.ndarray) -> np.ndarray:
    """A float vector as float32: an f16 one (held as stored) is widened for the call, which is
    faster than numpy's mixed-type broadcasting and exact."""
    return v if v.dtype == np.float32 else v.astype(np.float32)


def affine_rows(y: np.ndarray, scale, bias) -> np.ndarray:
    """y (O, M) *= scale[:, None]; += bias[:, None] (in place): one multiply per output."""
    if scale is not None:
        y *= _f32(scale)[:, None]
    if bias is not None:
        y += _f32(bias)[:, None]
    return y


def linear(x: np.ndarray, weight, scale, bias) -> np.ndarray:
    """(N, K) → (N, O): the weight op works on columns, so the input goes in transposed."""
    y = affine_rows(weight.matmul(x.T), scale, bias)
    return np.ascontiguousarray(y.T)


def conv2d(x: np.ndarray, weight, scale, bias, kshape, strides, pads, dilations) -> np.ndarray:
    """(N, C, H, W) → (N, O, OH, OW) via im2col, in chunks of samples (the weight op applies groups)."""
    n, c, h, w = x.shape
    o, _, kh, kw = kshape
    oh = out_size(h, kh, strides[0], pads[0], dilations[0], False)
    ow = out_size(w, kw, strides[1], pads[1], dilations[1], False)
    if pads[0] or pads[1]:
        x = _pad(x, pads[0], pads[0], pads[1], pads[1], 0.0)
    step = samples_per_chunk(c, kh, kw, oh, ow)
    zero_row = getattr(weight, "zero_row", False)  # sparse ops read a zero row for their padding
    out = None if n == 1 else np.empty((n, o, oh, ow), np.float32)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        patches = im2col(x[n0:n1], kh, kw, oh, ow, strides, dilations, zero_row)
        y = weight.matmul(patches, zero_row=True) if zero_row else weight.matmul(patches)
        y = affine_rows(y, scale, bias)
        if out is None:  # one sample: the (O, oh·ow) product is already in the output's layout
            return np.ascontiguousarray(y).reshape(1, o, oh, ow)
        out[n0:n1] = y.reshape(o, n1 - n0, oh, ow).transpose(1, 0, 2, 3)
    return out


def im2col(xp: np.ndarray, kh: int, kw: int, oh: int, ow: int, strides, dilations,
           zero_row: bool = False) -> np.ndarray:
    """Padded (N, C, H, W) → (C·kh·kw, N·oh·ow): row c·kh·kw + i·kw + j, column (n, y, x); with
    ``zero_row`` one more row of zeros at the end.

    The row order is the weight's (O, C/g, kh, kw) flattening, so group g's rows are contiguous.
    """
    n, c, _, _ = xp.shape
    xp = np.ascontiguousarray(xp)
    sn, sc, sh, sw = xp.strides
    # the windows as a view of xp (an ndarray over its buffer: a tenth of as_strided's cost)
    view = np.ndarray((c, kh, kw, n, oh, ow), xp.dtype, xp, 0,
                      (sc, dilations[0] * sh, dilations[1] * sw, sn, strides[0] * sh, strides[1] * sw))
    k, m = c * kh * kw, n * oh * ow
    out = np.empty((k + zero_row, m), np.float32)
    out[:k].reshape(c, kh, kw, n, oh, ow)[...] = view  # the one copy
    if zero_row:
        out[k] = 0
    return out


# ---------------------------------------------------------------------- pooling


def _pad_for_windows(x, k, s, p, d, ceil_mode, fill):
    """x padded by p on the left and as much as the last (ceil_mode) window needs on the right."""
    _, _, h, w = x.shape
    oh = out_size(h, k[0], s[0], p[0], d[0], ceil_mode)
    ow = out_size(w, k[1], s[1], p[1], d[1], ceil_mode)
    right_h = max(0, (oh - 1) * s[0] + d[0] * (k[0] - 1) + 1 - h - p[0])
    right_w = max(0, (ow - 1) * s[1] + d[1] * (k[1] - 1) + 1 - w - p[1])
    if p[0] or p[1] or right_h or right_w:
        x = _pad(x, p[0], right_h, p[1], right_w, fill)
    return x, oh, ow


def _pad(x, top: int, bottom: int, left: int, right: int, fill: float) -> np.ndarray:
    """x (N, C, H, W) inside a border of ``fill`` (what ``np.pad`` gives, in two numpy calls)."""
    n, c, h, w = x.shape
    out = np.full((n, c, h + top + bottom, w + left + right), fill, np.float32)
    out[:, :, top:top + h, left:left + w] = x
    return out


def _windows(xp, k, s, d, oh, ow):
    """Every kernel offset's strided view (N, C, oh, ow) of the padded input."""
    for i in range(k[0]):
        for j in range(k[1]):
            yield xp[:, :, i * d[0]:i * d[0] + (oh - 1) * s[0] + 1:s[0],
                     j * d[1]:j * d[1] + (ow - 1) * s[1] + 1:s[1]]


def maxpool2d(x, kernel, strides, pads, dilations, ceil_mode) -> np.ndarray:
    xp, oh, ow = _pad_for_windows(x, kernel, strides, pads, dilations, ceil_mode, -np.inf)
    views = _windows(xp, kernel, strides, dilations, oh, ow)
    out = np.array(next(views), np.float32)
    for v in views:
        np.maximum(out, v, out=out)
    return out


def avgpool2d(x, kernel, strides, pads, ceil_mode, count_include_pad) -> np.ndarray:
    ones = [1, 1]
    xp, oh, ow = _pad_for_windows(x, kernel, strides, pads, ones, ceil_mode, 0.0)
    views = _windows(xp, kernel, strides, ones, oh, ow)
    out = np.array(next(views), np.float32)
    for v in views:
        out += v
    dh = _divisor(x.shape[2], kernel[0], strides[0], pads[0], oh, count_include_pad)
    dw = _divisor(x.shape[3], kernel[1], strides[1], pads[1], ow, count_include_pad)
    out /= np.outer(dh, dw).astype(np.float32)
    return out


def _divisor(size, k, s, p, n_out, count_include_pad) -> np.ndarray:
    """torch's avg-pool divisor along one axis: the window clipped to the padded input (whose end
    is size + p), then, without count_include_pad, to the input itself."""
    start = np.arange(n_out) * s - p
    end = np.minimum(start + k, size + p)
    if count_include_pad:
        return end - start
    return np.minimum(end, size) - np.maximum(start, 0)


def global_avgpool(x) -> np.ndarray:
    return x.mean(axis=(2, 3), keepdims=True, dtype=np.float32)


# ---------------------------------------------------------------------- elementwise and shape


def channel_affine(x, scale, shift) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * _f32(scale).reshape(shape) + _f32(shift).reshape(shape)


def relu(x) -> np.ndarray:
    return np.maximum(x, np.float32(0))


def leaky_relu(x, alpha) -> np.ndarray:
    return np.where(x > 0, x, x * np.float32(alpha))


def hardtanh(x, min_val, max_val) -> np.ndarray:
    return np.clip(x, np.float32(min_val), np.float32(max_val))


def softmax(x, axis) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax(x, axis) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def flatten(x) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def reshape(x, shape) -> np.ndarray:
    return x.reshape(x.shape[0], *shape)


def add(a, b) -> np.ndarray:
    return a + b


def concat(*xs, axis) -> np.ndarray:
    return np.concatenate(xs, axis=axis)
