"""Graph → ONNX: a standard-ops model that stock onnxruntime runs exactly, with weights kept packed.

Every IR node becomes standard ONNX nodes (formats/ONNX.md has the table and the measurements behind
each choice). A discrete weight is stored as its codes θ and dequantized in the graph by
``DequantizeLinear(axis=0)`` with the per-output-channel float32 scale, feeding ``Conv`` or
``Gemm(transB=1)`` — never ``MatMul``: onnxruntime rewrites ``DequantizeLinear → MatMul`` into its
approximate MatMulNBits kernel (wrong outright for INT2 when the output width is not a multiple of 4).

Codes are stored as (the *encoding* of each discrete weight, reported in :class:`ExportInfo`):

==========  =====================================================  ==========================
encoding    stored as                                              bits per weight
==========  =====================================================  ==========================
``int2``    INT2 initializer (opset 25): ONNX packing of flat θ    2
``int8``    int8 initializer (``compat=True``, opset 21)           8
``bits``    binary: uint8, 8 weights a byte, bit i of byte j is    1
            weight 8j+i (1 = +1), unpacked by Gather on a table
``base3``   ternary, ``compact=True``: uint8, 5 weights a byte     1.6
            (Σ dᵢ·3ⁱ, d = 0, 1, 2 for 0, +1, −1), Gather on a table
``sparse``  ternary, ``compact=True``: one byte per non-zero (gap  ≈ 8 × non-zero fraction
            from the previous one, and sign), scattered in-graph
==========  =====================================================  ==========================

The packed encodings decode with standard ops (Cast, Gather, CumSum, ScatterElements, Reshape)
into int8 θ before the DequantizeLinear; a tensor uses one when it is smaller (see :func:`_plan`).

:func:`session` sets ``session.disable_quant_qdq = "1"``: onnxruntime then constant-folds every
decode chain (unpacking and DequantizeLinear) into an fp32 weight at load, so inference runs the
float model's kernels at float speed. A default session is still exact but re-dequantizes every run.

Example::

    import torch
    from ternarize import lower, onnx as tonnx
    graph = lower(model, torch.zeros(1, 1, 28, 28))
    info = tonnx.export(graph, "model.onnx")          # ExportInfo(size=..., encodings={...})
    y = tonnx.run("model.onnx", x)                    # numpy (N, 10), equal to model(x) within ~1e-6
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx  # the onnx package (absolute import), not this module
from onnx import TensorProto, helper, numpy_helper

from ._io import atomic_write
from ._version import __version__
from .errors import ExportError
from .graph import Graph, Node

OPSET, IR_VERSION = 25, 13  # INT2 DequantizeLinear needs opset 25 (IR version 13)
COMPAT_OPSET, COMPAT_IR_VERSION = 21, 10  # int8 per-axis DequantizeLinear; no INT2 anywhere
MAX_PROTO = (1 << 31) - 1  # protobuf refuses larger messages; external data is not supported

# Sparse code byte b → (gap from the previous non-zero, value). b = 0 skips 127 positions (for longer
# gaps); 1..254 are gap (b+1)//2 with sign + (odd) or − (even); 255 writes a 0 at the next position
# (the whole stream of an all-zero tensor).
SPARSE_GAP = np.array([127] + [(b + 1) // 2 for b in range(1, 255)] + [1], np.int32)
SPARSE_VALUE = np.array([0] + [1 if b % 2 else -1 for b in range(1, 255)] + [0], np.int8)
# Byte → its 8 weights, bit i (little-endian) set = +1, clear = −1.
BITS_TABLE = (np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
              .astype(np.int8) * 2 - 1)
# Byte b < 243 → its 5 weights: digit i of b in base 3, mapped 0, 1, 2 → 0, +1, −1.
BASE3_TABLE = np.array([0, 1, -1], np.int8)[np.arange(243)[:, None] // 3 ** np.arange(5) % 3]
_MARGIN = 64  # bytes a packed encoding must save to be worth its extra nodes and shape constants


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export` wrote."""

    path: str
    size: int                   # bytes of the file
    opset: int
    ir_version: int
    encodings: dict             # discrete weight name → "int2" | "int8" | "bits" | "base3" | "sparse"
    nonzero: float | None       # non-zero fraction over all discrete weights; None when there are none
    nodes: int                  # ONNX nodes in the graph


# ---------------------------------------------------------------------- encodings (numpy)


def int2_bytes(theta: np.ndarray) -> bytes:
    """ONNX INT2 packing of the flattened codes: four per byte, low bits first, 0b01=+1, 0b11=−1.

    >>> int2_bytes(np.array([[1, 0, -1], [-1, 1, 0]], np.int8)).hex()
    'f101'
    """
    f = (np.asarray(theta, np.int8).ravel() & 3).astype(np.uint8)
    f = np.concatenate([f, np.zeros(-f.size % 4, np.uint8)]).reshape(-1, 4)
    return (f[:, 0] | f[:, 1] << 2 | f[:, 2] << 4 | f[:, 3] << 6).astype(np.uint8).tobytes()


def bit_bytes(theta: np.ndarray) -> bytes:
    """1-bit packing of binary codes (flattened): eight per byte, bit i of byte j is weight 8j+i, 1 = +1.

    >>> bit_bytes(np.array([[1, -1, 1], [1, 1, -1]], np.int8)).hex()
    '1d'
    """
    return np.packbits(np.asarray(theta).ravel() > 0, bitorder="little").tobytes()


def base3_bytes(theta: np.ndarray) -> bytes:
    """Base-3 packing of ternary codes (flattened): byte j holds weights 5j..5j+4 as Σ dᵢ·3ⁱ with
    digit d = θ mod 3 (0, +1, −1 → 0, 1, 2); the last byte is padded with zeros.

    >>> base3_bytes(np.array([1, -1, 0, 0, 1, -1], np.int8)).hex()
    '5802'
    """
    d = np.asarray(theta, np.int8).ravel().astype(np.int32) % 3
    d = np.concatenate([d, np.zeros(-d.size % 5, np.int32)]).reshape(-1, 5)
    return (d @ 3 ** np.arange(5)).astype(np.uint8).tobytes()


def sparse_codes(theta: np.ndarray) -> np.ndarray:
    """The sparse byte stream of ternary codes (see SPARSE_GAP): one byte per non-zero, plus one per
    further 127 zeros in a gap.

    >>> sparse_codes(np.array([0, 0, 1, -1, 0], np.int8))
    array([5, 2], dtype=uint8)
    """
    flat = np.asarray(theta, np.int8).ravel()
    pos = np.flatnonzero(flat)
    if pos.size == 0:
        return np.array([255], np.uint8)
    gaps = np.diff(pos, prepend=-1)
    skips = (gaps - 1) // 127  # b = 0 bytes before this non-zero
    rest = gaps - 127 * skips  # 1..127
    out = np.zeros(int(skips.sum() + pos.size), np.uint8)
    out[np.cumsum(skips + 1) - 1] = 2 * rest - (flat[pos] > 0)
    return out


def sparse_decode(codes: np.ndarray, n: int) -> np.ndarray:
    """The inverse of :func:`sparse_codes` (what the ONNX graph computes), for ``n`` weights."""
    codes = np.asarray(codes, np.uint8)
    out = np.zeros(n, np.int8)
    out[np.cumsum(SPARSE_GAP[codes]) - 1] = SPARSE_VALUE[codes]
    return out


# ---------------------------------------------------------------------- export


def export(graph: Graph, path, compat: bool = False, *, binary: str = "bits", compact: bool = False,
           overwrite: bool = True) -> ExportInfo:
    """Write ``graph`` as an ONNX model at ``path`` (atomically) and return what was written.

    ``compat``: opset 21 with int8 codes instead of INT2, for runtimes without INT2 support.
    ``binary``: "bits" stores binary weights at 1 bit each (unpacked in-graph); "dense" keeps
    them in the 2-bit (or compat 8-bit) code. ``compact``: store each ternary weight in the
    smallest of its dense code, base-3 (1.6 bits) and the sparse stream (≈ 8 bits per non-zero).
    ``overwrite`` False: an OutputError rather than replace a file at ``path`` (even one that
    appears while the model is built).
    Raises :class:`ExportError` when a node cannot be expressed, GraphError when the graph is malformed.
    """
    if not isinstance(graph, Graph):
        raise ExportError(f"export needs a Graph (ternarize.lower(model, x) or tern.read(path)), got "
                          f"{type(graph).__name__}")
    if binary not in ("bits", "dense"):
        raise ExportError(f"binary={binary!r} is not an encoding; use 'bits' or 'dense'")
    shapes = graph.validate()
    builder = _Builder(graph, shapes, compat, binary, compact)
    _check_size(graph, builder, compat, compact)
    model = builder.build()
    _check(model, graph, shapes)
    try:
        data = model.SerializeToString(deterministic=True)
    except MemoryError:
        raise
    except Exception as e:  # protobuf's EncodeError (its class differs between implementations)
        raise ExportError(f"protobuf cannot serialize the ONNX model ({type(e).__name__}: {str(e)[:80]}); "
                          "the .tern file holds the model, and ternarize run runs it") from e
    atomic_write(Path(path), data, create=not overwrite)
    return ExportInfo(str(path), len(data), builder.opset, model.ir_version, dict(builder.encodings),
                      _nonzero(graph), len(model.graph.node))


def metadata_props(metadata: dict, sparsity: float | None) -> dict[str, str]:
    """The ONNX model's metadata_props: each entry of the graph's metadata as JSON, ``producer``
    (this ternarize) and ``sparsity`` (non-zero fraction of the discrete weights, or null)."""
    props = dict(metadata)
    props.update(producer=f"ternarize {__version__}", sparsity=sparsity)
    out = {}
    for key in sorted(props):
        try:
            out[str(key)] = json.dumps(props[key], sort_keys=True, default=_jsonable)
        except (TypeError, ValueError) as e:
            raise ExportError(f"metadata entry {key!r} cannot be written as JSON: {e}") from None
    return out


def read_metadata_props(path) -> dict[str, str]:
    """The metadata_props of the ONNX model at ``path`` (its weights are not loaded from external
    files); ExportError when the file is not an ONNX model."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except MemoryError:
        raise
    except Exception as e:  # protobuf's DecodeError, OSError, ...: the class differs between implementations
        raise ExportError(f"{path} is not an ONNX model this ternarize reads ({type(e).__name__})") from e
    if not model.ir_version or not model.HasField("graph"):  # protobuf reads most bytes as unknown fields
        raise ExportError(f"{path} is not an ONNX model (no IR version or no graph)")
    return {p.key: p.value for p in model.metadata_props}


def _nonzero(graph: Graph) -> float | None:
    names = graph.discrete_weights()
    total = sum(graph.consts[n].data.size for n in names)
    if not total:
        return None
    return sum(int(np.count_nonzero(graph.consts[n].data)) for n in names) / total


_CODE_BYTES = {"int8": lambda n: n, "int2": lambda n: -(-n // 4), "bits": lambda n: -(-n // 8),
               "base3": lambda n: -(-n // 5)}


def _check_size(graph: Graph, builder: _Builder, compat: bool, compact: bool) -> None:
    """Refuse, before building anything, a model whose constants alone pass protobuf's limit."""
    total = 0
    for name, c in graph.consts.items():
        encoding = builder.encodings.get(name)
        if encoding is None:
            total += c.data.nbytes
        else:
            total += builder.streams[name].size if encoding == "sparse" else _CODE_BYTES[encoding](c.data.size)
    if total > MAX_PROTO:
        hint = ""
        if compat:
            hint = "; without --compat its ternary codes take 2 bits each instead of 8"
        elif not compact:
            hint = "; --compact may store it in fewer bytes"
        raise ExportError(f"the ONNX model's constants would take {total} bytes, over protobuf's 2 GiB limit{hint}; "
                          "the .tern file holds the model, and ternarize run runs it")


def _check(model: onnx.ModelProto, graph: Graph, shapes: dict) -> None:
    """onnx.checker (full), then ONNX's own shape inference against the IR's shapes, node by node."""
    if model.ByteSize() > MAX_PROTO:
        raise ExportError(f"the ONNX model would be {model.ByteSize()} bytes, over protobuf's 2 GiB limit")
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"the exported model fails onnx.checker: {first}") from e
    found = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in graph.nodes:
        info = found.get(node.outputs[0])
        if info is None:
            continue
        dims = info.type.tensor_type.shape.dim
        got = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)[1:]
        if got != tuple(shapes[node.outputs[0]][1:]):
            raise ExportError(f"node {node.name!r} ({node.op}): ONNX computes shape {list(got)} (batch excluded), "
                              f"the graph says {list(shapes[node.outputs[0]][1:])}; it cannot be exported")


# ---------------------------------------------------------------------- building


class _Builder:
    """Emits ONNX nodes and initializers for one graph, each constant once, in graph order."""

    def __init__(self, graph: Graph, shapes: dict, compat: bool, binary: str, compact: bool):
        self.graph, self.shapes, self.compat = graph, shapes, compat
        self.opset = COMPAT_OPSET if compat else OPSET
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}
        self.cache: dict[tuple, str] = {}  # (purpose, const name, ...) -> emitted tensor name
        self.coded: set[str] = set()  # discrete weights whose codes θ are emitted
        self.widened: set[str] = set()  # float constants stored as float16 and cast to float32
        self.encodings, self.streams = _plan(graph, compat, binary, compact)
        self.used = set(graph.consts) | set(shapes) | {n.name for n in graph.nodes}

    def build(self) -> onnx.ModelProto:
        for node in self.graph.nodes:
            emit = _EMITTERS.get(node.op)
            if emit is None:
                raise ExportError(f"node {node.name!r}: op {node.op!r} has no ONNX mapping in this exporter")
            emit(self, node)
        g = self.graph
        inputs = [_value_info(v.name, v.shape) for v in g.inputs]
        outputs = [_value_info(o, self.shapes[o]) for o in g.outputs]
        onnx_graph = helper.make_graph(self.nodes, "ternarize", inputs, outputs, list(self.inits.values()))
        model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  ir_version=COMPAT_IR_VERSION if self.compat else IR_VERSION,
                                  producer_name="ternarize", producer_version=__version__)
        helper.set_model_props(model, self.metadata())
        return model

    def metadata(self) -> dict[str, str]:
        return metadata_props(self.graph.metadata, _nonzero(self.graph))

    # -- names, nodes, initializers
    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}:{k}"
        self.used.add(name)
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, name: str | None = None, **attrs) -> str:
        output = output or self.fresh(f"{name or inputs[0]}/{op}")
        node_name = name if name is not None else self.fresh(f"{output}/{op}.node")
        self.nodes.append(helper.make_node(op, inputs, [output], name=node_name, **attrs))
        return output

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def shared(self, key: str, array: np.ndarray) -> str:
        """A constant used by many nodes (tables, 0, 1, shapes), emitted once."""
        if ("shared", key) not in self.cache:
            self.cache[("shared", key)] = self.init(self.fresh(key), array)
        return self.cache[("shared", key)]

    def const(self, name: str) -> str:
        """A float32 IR constant under its own name (see :meth:`floats`)."""
        if name not in self.inits and name not in self.widened:
            self.floats(name, self.graph.consts[name].data)
        return name

    def floats(self, name: str, data: np.ndarray) -> str:
        """float32 ``data`` as the tensor ``name``: an initializer, or, when every value is exactly a
        binary16 value (as after ``compress --float16``) and there are enough of them to pay for the
        node, a float16 initializer and a ``Cast`` to float32 (lossless; onnxruntime folds it at load)."""
        if not _half_exact(data):
            return self.init(name, data)
        half = self.init(self.fresh(f"{name}/f16"), data.astype(np.float16))
        self.widened.add(name)
        return self.node("Cast", [half], name, name=self.fresh(f"{name}/Cast.node"), to=TensorProto.FLOAT)


HALF_MIN_VALUES = 64  # below this, a Cast node costs about what float16 saves


def _half_exact(data: np.ndarray) -> bool:
    """Whether float32 ``data`` holds at least HALF_MIN_VALUES values, each exactly a binary16 value."""
    if data.size < HALF_MIN_VALUES:
        return False
    with np.errstate(over="ignore"):
        half = data.astype(np.float16)
    return bool(np.isfinite(half).all() and np.array_equal(half.astype(np.float32), data))


def _value_info(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *[int(d) for d in shape[1:]]])


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


# ---------------------------------------------------------------------- weights


def _weight(b: _Builder, node: Node) -> tuple[str, str]:
    """The float weight tensor (dequantized codes, or float times scale) and the bias name or ""."""
    _, w, scale, bias = list(node.inputs) + [""] * (4 - len(node.inputs))
    c = b.graph.consts[w]
    if c.kind == "float32":
        if not scale:
            return b.const(w), b.const(bias) if bias else ""
        key = ("scaled", w, scale)
        if key not in b.cache:  # same float32 rounding as the IR's weight·scale
            s = b.graph.consts[scale].data.reshape((-1,) + (1,) * (c.data.ndim - 1))
            b.cache[key] = b.init(b.fresh(f"{w}*{scale}"), c.data * s)
        return b.cache[key], b.const(bias) if bias else ""
    key = ("dq", w, scale)
    if key not in b.cache:
        codes = _codes(b, w)
        s = b.const(scale) if scale else b.shared("one_f32", np.array(1.0, np.float32))
        b.cache[key] = b.node("DequantizeLinear", [codes, s], b.fresh(f"{w}/dequantized"), axis=0)
    return b.cache[key], b.const(bias) if bias else ""


_TABLES = {"bits": BITS_TABLE.nbytes, "base3": BASE3_TABLE.nbytes, "sparse": SPARSE_GAP.nbytes + SPARSE_VALUE.nbytes}


def _plan(graph: Graph, compat: bool, binary: str, compact: bool) -> tuple[dict, dict]:
    """Each discrete weight's encoding, and the sparse streams. A tensor takes the packed encoding
    that saves it the most bytes over its dense code, beyond _MARGIN (its extra nodes and shape
    constants); an encoding is used at all only when its savings together pay for its shared table."""
    plan, streams, saved = {}, {}, {}
    for w in graph.discrete_weights():
        c = graph.consts[w]
        n = c.data.size
        dense = n if compat else -(-n // 4)
        plan[w] = "int8" if compat else "int2"
        sizes = {}
        if c.kind == "binary" and binary == "bits":
            sizes["bits"] = -(-n // 8)
        if c.kind == "ternary" and compact:
            streams[w] = sparse_codes(c.data)
            sizes.update(base3=-(-n // 5), sparse=streams[w].size)
        best = min(sizes, key=lambda e: (sizes[e], e), default=None)
        if best is not None and dense - sizes[best] > _MARGIN:
            saved[w] = (best, dense - sizes[best] - _MARGIN)
    for encoding, table in _TABLES.items():
        wins = {w: s for w, (e, s) in saved.items() if e == encoding}
        if sum(wins.values()) > table:
            plan.update(dict.fromkeys(wins, encoding))
    return plan, {w: s for w, s in streams.items() if plan[w] == "sparse"}


def _codes(b: _Builder, w: str) -> str:
    """The codes θ of discrete weight ``w``: a tensor named ``w`` (int2/int8 or decoded), made once
    even when layers share the weight with different scales."""
    if w not in b.coded:
        b.coded.add(_emit_codes(b, w))
    return w


def _emit_codes(b: _Builder, w: str) -> str:
    c = b.graph.consts[w]
    encoding = b.encodings[w]
    if encoding == "bits":
        return _table_decode(b, w, c.data, bit_bytes(c.data), "bits_table", BITS_TABLE)
    if encoding == "base3":
        return _table_decode(b, w, c.data, base3_bytes(c.data), "base3_table", BASE3_TABLE)
    if encoding == "sparse":
        return _sparse_decode(b, w, c.data, b.streams[w])
    if encoding == "int8":
        return b.init(w, c.data)
    b.inits[w] = helper.make_tensor(w, TensorProto.INT2, c.shape, int2_bytes(c.data), raw=True)
    return w


def _shape_const(b: _Builder, shape) -> str:
    return b.shared("shape_" + "x".join(str(int(d)) for d in shape), np.array(shape, np.int64))


def _table_decode(b: _Builder, w: str, theta: np.ndarray, packed: bytes, key: str, table: np.ndarray) -> str:
    """bytes → Cast int32 → Gather(table) (nbytes, k) → [Reshape, Slice off the padding] → Reshape."""
    raw = b.init(b.fresh(f"{w}/{key.split('_')[0]}"), np.frombuffer(packed, np.uint8))
    idx = b.node("Cast", [raw], to=TensorProto.INT32)
    unpacked = b.node("Gather", [b.shared(key, table), idx], b.fresh(f"{w}/unpacked"), axis=0)
    if theta.size % table.shape[1]:
        flat = b.node("Reshape", [unpacked, _shape_const(b, [-1])])
        zero, end = b.shared("zero_i64", np.array([0], np.int64)), _shape_const(b, [theta.size])
        unpacked = b.node("Slice", [flat, zero, end])
    return b.node("Reshape", [unpacked, _shape_const(b, theta.shape)], w)


def _sparse_decode(b: _Builder, w: str, theta: np.ndarray, codes: np.ndarray) -> str:
    """codes → positions = CumSum(gap table[codes]) − 1, values = value table[codes], scattered
    into zeros of the weight's size, reshaped. Constant inputs only: onnxruntime folds it at load."""
    raw = b.init(b.fresh(f"{w}/sparse"), codes)
    idx = b.node("Cast", [raw], to=TensorProto.INT32)
    gaps = b.node("Gather", [b.shared("sparse_gap", SPARSE_GAP), idx], axis=0)
    ends = b.node("CumSum", [gaps, b.shared("zero_i32", np.array(0, np.int32))])
    pos = b.node("Sub", [ends, b.shared("one_i32", np.array(1, np.int32))], b.fresh(f"{w}/positions"))
    values = b.node("Gather", [b.shared("sparse_value", SPARSE_VALUE), idx], b.fresh(f"{w}/values"), axis=0)
    zeros = b.node("ConstantOfShape", [_shape_const(b, [theta.size])], b.fresh(f"{w}/zeros"),
                   value=helper.make_tensor("value", TensorProto.INT8, [1], [0]))
    flat = b.node("ScatterElements", [zeros, pos, values], b.fresh(f"{w}/scattered"), axis=0)
    return b.node("Reshape", [flat, _shape_const(b, theta.shape)], w)


# ---------------------------------------------------------------------- ops


def _linear(b: _Builder, node: Node) -> None:
    w, bias = _weight(b, node)
    b.node("Gemm", [node.inputs[0], w] + ([bias] if bias else []), node.outputs[0], node.name, transB=1)


def _conv2d(b: _Builder, node: Node) -> None:
    w, bias = _weight(b, node)
    a = node.attrs
    (ph, pw), kernel = a["pads"], list(b.graph.consts[node.inputs[1]].shape[2:])
    b.node("Conv", [node.inputs[0], w] + ([bias] if bias else []), node.outputs[0], node.name,
           kernel_shape=kernel, strides=list(a["strides"]), pads=[ph, pw, ph, pw],
           dilations=list(a["dilations"]), group=int(a["groups"]))


def _channel_affine(b: _Builder, node: Node) -> None:
    """Mul then Add, constants shaped (C, 1, ...) so they broadcast along axis 1 (as x·s + t in the IR)."""
    x, scale, shift = node.inputs
    rank = len(b.shapes[x])
    mid = b.node("Mul", [x, _channel_const(b, scale, rank)], b.fresh(f"{node.outputs[0]}/scaled"), node.name)
    b.node("Add", [mid, _channel_const(b, shift, rank)], node.outputs[0], b.fresh(f"{node.name}/shift"))


def _channel_const(b: _Builder, name: str, rank: int) -> str:
    if rank == 2:
        return b.const(name)
    key = ("channel", name, rank)
    if key not in b.cache:
        data = b.graph.consts[name].data
        b.cache[key] = b.floats(b.fresh(f"{name}/c{'1' * (rank - 2)}"), data.reshape((-1,) + (1,) * (rank - 2)))
    return b.cache[key]


def _f32(node: Node, attr: str) -> float:
    """A float attribute, refused when float32 cannot hold it (it would turn into inf)."""
    v = float(node.attrs[attr])
    with np.errstate(over="ignore"):
        narrow = np.float32(v)
    if not np.isfinite(narrow):
        raise ExportError(f"node {node.name!r} ({node.op}): {attr}={v!r} does not fit in float32")
    return float(narrow)


def _unary(onnx_op: str, **fixed):
    def emit(b: _Builder, node: Node) -> None:
        b.node(onnx_op, [node.inputs[0]], node.outputs[0], node.name, **fixed)
    return emit


def _leaky_relu(b: _Builder, node: Node) -> None:
    b.node("LeakyRelu", [node.inputs[0]], node.outputs[0], node.name, alpha=_f32(node, "alpha"))


def _hardtanh(b: _Builder, node: Node) -> None:
    lo = b.shared(f"clip_{_f32(node, 'min_val')!r}", np.array(_f32(node, "min_val"), np.float32))
    hi = b.shared(f"clip_{_f32(node, 'max_val')!r}", np.array(_f32(node, "max_val"), np.float32))
    b.node("Clip", [node.inputs[0], lo, hi], node.outputs[0], node.name)


def _pool_attrs(a: dict) -> dict:
    (ph, pw) = a["pads"]
    return dict(kernel_shape=list(a["kernel"]), strides=list(a["strides"]), pads=[ph, pw, ph, pw],
                ceil_mode=int(a["ceil_mode"]))


def _pool(b: _Builder, node: Node, onnx_op: str, **attrs) -> None:
    """A pool, then (max-pool) −inf where a window lies wholly in the padding, as in torch.

    At the compat opset, whose output size rule keeps a ceil_mode window that starts in the right
    padding (torch and opset 22 on drop it), see :func:`_floor_pool`.
    """
    a, out = node.attrs, node.outputs[0]
    empty = _empty_windows(b.shapes[node.inputs[0]][2:], b.shapes[out][2:], a) if onnx_op == "MaxPool" else None
    target = b.fresh(f"{out}/{onnx_op}") if empty is not None else out
    if b.compat and a["ceil_mode"] and _kept(b.shapes[node.inputs[0]][2:], a) != list(b.shapes[out][2:]):
        _floor_pool(b, node, onnx_op, target, **attrs)
    else:
        b.node(onnx_op, [node.inputs[0]], target, node.name, **attrs, **_pool_attrs(a))
    if empty is not None:  # onnxruntime starts a max at float32's lowest finite value, torch at −inf
        mask = b.init(b.fresh(f"{out}/empty_windows"), empty[None, None])
        b.node("Where", [mask, b.shared("minus_inf", np.array(-np.inf, np.float32)), target], out)


def _kept(size, a: dict) -> list:
    """The output size by opset 21's ceil_mode rule (which keeps a window starting in the right padding)."""
    dil = a.get("dilations", [1, 1])
    return [-(-(n + 2 * p - d * (k - 1) - 1) // s) + 1
            for n, k, s, p, d in zip(size, a["kernel"], a["strides"], a["pads"], dil)]


def _floor_pool(b: _Builder, node: Node, onnx_op: str, out: str, **attrs) -> None:
    """A ceil_mode pool as a floor-mode one over explicitly padded input, so that every size rule gives
    torch's size: the right padding is extended to just cover torch's last window.

    A max-pool pads with −inf (``Pad``); an average pool counting the padding pads with zeros
    (``Pad``) and then counts only those, not the extension (``count_include_pad=0``), as torch's
    divisor stops at the right padding; one not counting it takes asymmetric ``pads``.
    """
    a, x = node.attrs, node.inputs[0]
    size, shape = b.shapes[x][2:], b.shapes[node.outputs[0]][2:]
    dil = a.get("dilations", [1, 1])
    left = list(a["pads"])
    right = [max(0, (o - 1) * s + d * (k - 1) + 1 - n - p)
             for o, n, k, s, p, d in zip(shape, size, a["kernel"], a["strides"], left, dil)]
    plain = dict(kernel_shape=list(a["kernel"]), strides=list(a["strides"]), ceil_mode=0)
    if onnx_op == "AveragePool" and not a["count_include_pad"]:
        b.node(onnx_op, [x], out, node.name, **{**attrs, **plain, "pads": left + right})
        return
    if onnx_op == "MaxPool":
        pads, fill, rest = left + right, -np.inf, [0, 0]
    else:  # counted padding is real zeros; the extension beyond it is not counted
        pads, fill = left + left, 0.0
        rest = [max(0, r - p) for r, p in zip(right, left)]
        attrs = {**attrs, "count_include_pad": 0}
    padded = b.node("Pad", [x, _shape_const(b, [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]]),
                            b.shared(f"fill_{fill}", np.array(fill, np.float32))], mode="constant")
    b.node(onnx_op, [padded], out, node.name, **{**attrs, **plain, "pads": [0, 0, *rest]})


def _empty_windows(size, shape, a: dict) -> np.ndarray | None:
    """(OH, OW) bool: the max-pool windows holding no input element (all padding); None when none."""
    dil = a.get("dilations", [1, 1])
    hit = []
    for n, o, k, s, p, d in zip(size, shape, a["kernel"], a["strides"], a["pads"], dil):
        at = np.arange(o)[:, None] * s - p + d * np.arange(k)[None, :]
        hit.append(((at >= 0) & (at < n)).any(axis=1))
    empty = ~(hit[0][:, None] & hit[1][None, :])
    return empty if empty.any() else None


def _maxpool(b: _Builder, node: Node) -> None:
    _pool(b, node, "MaxPool", dilations=list(node.attrs["dilations"]))


def _avgpool(b: _Builder, node: Node) -> None:
    _pool(b, node, "AveragePool", count_include_pad=int(node.attrs["count_include_pad"]))


def _reshape(b: _Builder, node: Node) -> None:
    shape = _shape_const(b, [0, *node.attrs["shape"]])  # 0 copies the (dynamic) batch dimension
    b.node("Reshape", [node.inputs[0], shape], node.outputs[0], node.name)


def _axis_op(onnx_op: str):
    def emit(b: _Builder, node: Node) -> None:
        b.node(onnx_op, list(node.inputs), node.outputs[0], node.name, axis=int(node.attrs["axis"]))
    return emit


def _add(b: _Builder, node: Node) -> None:
    b.node("Add", list(node.inputs), node.outputs[0], node.name)


_EMITTERS = {
    "linear": _linear,
    "conv2d": _conv2d,
    "channel_affine": _channel_affine,
    "relu": _unary("Relu"),
    "leaky_relu": _leaky_relu,
    "hardtanh": _hardtanh,
    "maxpool2d": _maxpool,
    "avgpool2d": _avgpool,
    "global_avgpool": _unary("GlobalAveragePool"),
    "flatten": _unary("Flatten", axis=1),
    "reshape": _reshape,
    "add": _add,
    "concat": _axis_op("Concat"),
    "softmax": _axis_op("Softmax"),
    "log_softmax": _axis_op("LogSoftmax"),
}


# ---------------------------------------------------------------------- onnxruntime


def session(path, providers=None, threads: int | None = None):
    """An onnxruntime InferenceSession set up for exact, fp32-speed inference of an exported model.

    ``session.disable_quant_qdq = "1"`` makes onnxruntime keep no Q/DQ pairs: constant folding turns
    every decode chain and DequantizeLinear on a constant into an fp32 initializer at load (measured:
    no DequantizeLinear left, load time as for the float model), and no QDQ fusion runs.
    ORT_ENABLE_ALL adds the fusion and layout (NCHWc) passes the float model gets too.
    ``threads``: intra-op threads (None: onnxruntime's default, one per physical core).
    """
    import onnxruntime as ort  # imported here: exporting needs only onnx

    return ort.InferenceSession(str(path), _options(threads), providers=list(providers or ["CPUExecutionProvider"]))


def _options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


def run(model, x) -> np.ndarray:
    """Run an exported model (a path or a session) on ``x`` and return its first output as float32."""
    sess = model if hasattr(model, "get_inputs") else session(model)
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


__all__ = ["ExportInfo", "export", "session", "run", "int2_bytes", "bit_bytes", "base3_bytes", "sparse_codes",
           "sparse_decode"]
