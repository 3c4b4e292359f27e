"""The intermediate representation: ordered nodes over named tensors (numpy only).

One ``Graph`` feeds the three consumers: the ``.tern`` writer, the ONNX exporter and the reference
runtime. Activations have a dynamic batch dimension (``None`` in shapes); constants (weights,
scales, biases) live in ``Graph.consts``. A discrete weight is stored as its codes
θ ∈ {-1, 0, +1} (``ternary``) or {-1, +1} (``binary``) as int8; its per-output-channel scale is a
separate float32 constant, so a layer computes ``(x ⋆ θ) · scale + bias``.

Operators (inputs in order; ``""`` marks an absent optional input; attributes in brackets):

=================  ==========================================  =============================================
op                 inputs                                      attributes
=================  ==========================================  =============================================
linear             x (N,K), weight (O,K), [scale (O)], [bias]  —
conv2d             x (N,C,H,W), weight (O,C/g,kh,kw),          strides [2], pads [2], dilations [2], groups
                   [scale (O)], [bias (O)]
channel_affine     x (N,C,...), scale (C), shift (C)           —   (y = x·scale[c] + shift[c], axis 1)
relu               x                                           —
leaky_relu         x                                           alpha
hardtanh           x                                           min_val, max_val
maxpool2d          x (N,C,H,W)                                 kernel [2], strides [2], pads [2],
                                                               dilations [2], ceil_mode
avgpool2d          x (N,C,H,W)                                 kernel [2], strides [2], pads [2], ceil_mode,
                                                               count_include_pad
global_avgpool     x (N,C,H,W) -> (N,C,1,1)                    —
flatten            x -> (N, prod(rest))                        —
reshape            x -> (N, *shape)                            shape (batch excluded; at most one -1)
add                a, b (equal shapes)                         —
concat             x1, ..., xn                                 axis (>= 1)
softmax            x                                           axis (>= 1)
log_softmax        x                                           axis (>= 1)
=================  ==========================================  =============================================

Padding is symmetric (``pads = [ph, pw]``), as in torch. Pooling follows torch's output-size rule,
including ``ceil_mode``. ``validate`` checks everything a hostile producer could get wrong: unique
names, definition before use (a use of a later output is reported as a cycle), constant kinds and
shapes, attribute types and ranges, and shapes through every node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import GraphError

KINDS = ("float32", "ternary", "binary")
MAX_DIM = (1 << 31) - 1
MAX_ELEMENTS = 1 << 31  # per sample, for activations and constants alike


@dataclass
class Const:
    """A constant tensor: ``kind`` is float32, ternary (int8 in {-1,0,1}) or binary (int8 in {-1,1})."""

    kind: str
    data: np.ndarray

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GraphError(f"constant kind {self.kind!r} is unknown; expected one of {', '.join(KINDS)}")
        if self.kind == "float32":
            self.data = np.ascontiguousarray(self.data, dtype=np.float32)
        else:
            self.data = np.ascontiguousarray(self.data, dtype=np.int8)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)

    def check_values(self, name: str) -> None:
        """Raise GraphError when codes leave the allowed set or a float is not finite."""
        d = self.data
        if self.kind == "ternary":
            bad = (d < -1) | (d > 1)
        elif self.kind == "binary":
            bad = (d != -1) & (d != 1)
        else:
            bad = ~np.isfinite(d)
        if bad.any():
            i = int(np.flatnonzero(bad.ravel())[0])
            raise GraphError(f"constant {name!r} ({self.kind}) holds invalid value {d.ravel()[i]!r} at index {i}")


class ConstSpec:
    """A constant known by kind and shape only: enough for ``Graph.validate`` to check a graph and
    infer every shape before (or without) decoding any tensor."""

    def __init__(self, kind: str, shape: tuple[int, ...]):
        if kind not in KINDS:
            raise GraphError(f"constant kind {kind!r} is unknown; expected one of {', '.join(KINDS)}")
        self.kind, self.shape = kind, tuple(int(d) for d in shape)


@dataclass
class Value:
    """A graph input: a name and a shape whose first dimension is the dynamic batch (None)."""

    name: str
    shape: tuple

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape)}


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"op": self.op, "name": self.name, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "attrs": dict(self.attrs)}


@dataclass
class Graph:
    inputs: list[Value]
    outputs: list[str]
    nodes: list[Node]
    consts: dict[str, Const | ConstSpec]
    metadata: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ serialization
    def to_json(self) -> dict:
        """The structure without constant data (the .tern header's ``graph`` object)."""
        return {"inputs": [v.to_json() for v in self.inputs], "outputs": list(self.outputs),
                "nodes": [n.to_json() for n in self.nodes]}

    @classmethod
    def from_json(cls, obj: Any, consts: dict[str, Const], metadata: dict | None = None) -> Graph:
        """Build from ``to_json`` output, checking types (hostile input raises GraphError)."""
        obj = _expect(obj, dict, "graph")
        _no_extra(obj, {"inputs", "outputs", "nodes"}, "graph")
        inputs = []
        for i, v in enumerate(_expect(obj.get("inputs"), list, "graph.inputs")):
            v = _expect(v, dict, f"graph.inputs[{i}]")
            _no_extra(v, {"name", "shape"}, f"graph.inputs[{i}]")
            shape = _expect(v.get("shape"), list, f"graph.inputs[{i}].shape")
            inputs.append(Value(_expect(v.get("name"), str, f"graph.inputs[{i}].name"), tuple(shape)))
        outputs = [_expect(o, str, f"graph.outputs[{i}]")
                   for i, o in enumerate(_expect(obj.get("outputs"), list, "graph.outputs"))]
        nodes = []
        for i, n in enumerate(_expect(obj.get("nodes"), list, "graph.nodes")):
            where = f"graph.nodes[{i}]"
            n = _expect(n, dict, where)
            _no_extra(n, {"op", "name", "inputs", "outputs", "attrs"}, where)
            nodes.append(Node(
                op=_expect(n.get("op"), str, f"{where}.op"),
                name=_expect(n.get("name"), str, f"{where}.name"),
                inputs=[_expect(s, str, f"{where}.inputs") for s in _expect(n.get("inputs"), list, f"{where}.inputs")],
                outputs=[_expect(s, str, f"{where}.outputs")
                         for s in _expect(n.get("outputs"), list, f"{where}.outputs")],
                attrs=_expect(n.get("attrs", {}), dict, f"{where}.attrs"),
            ))
        return cls(inputs, outputs, nodes, consts, dict(metadata or {}))

    # ------------------------------------------------------------------ queries
    def producer(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def discrete_weights(self) -> list[str]:
        return [k for k, c in self.consts.items() if c.kind != "float32"]

    # ------------------------------------------------------------------ checking
    def validate(self) -> dict[str, tuple]:
        """Check the whole graph; return every activation's shape (batch dimension None)."""
        shapes: dict[str, tuple] = {}
        seen: set[str] = set()

        def define(name: str, where: str) -> None:
            if not isinstance(name, str) or not name:
                raise GraphError(f"{where}: tensor names must be non-empty strings, got {name!r}")
            if name in seen:
                raise GraphError(f"{where}: tensor name {name!r} is defined twice")
            seen.add(name)

        for name, c in self.consts.items():
            define(name, "constants")
            if not isinstance(c, (Const, ConstSpec)):
                raise GraphError(f"constant {name!r} is not a Const")
            _check_elements(c.shape, f"constant {name!r}")
        if not self.inputs:
            raise GraphError("the graph has no inputs")
        for v in self.inputs:
            define(v.name, "graph inputs")
            shape = tuple(v.shape)
            if len(shape) < 2 or shape[0] is not None:
                raise GraphError(f"input {v.name!r} has shape {list(shape)}; expected [null, d1, ...] "
                                 "(a dynamic batch dimension, then at least one fixed one)")
            for d in shape[1:]:
                _check_int(d, f"input {v.name!r} shape", lo=1, hi=MAX_DIM)
            _check_elements(shape[1:], f"input {v.name!r}")
            shapes[v.name] = shape
        later = self.producer()
        names = set()
        for i, node in enumerate(self.nodes):
            where = f"node {node.name!r} ({node.op})"
            if not isinstance(node.name, str) or not node.name or node.name in names:
                raise GraphError(f"node #{i} has an empty or duplicate name {node.name!r}")
            names.add(node.name)
            spec = OPS.get(node.op)
            if spec is None:
                raise GraphError(f"{where}: unknown op {node.op!r}")
            for name in node.inputs:
                if name and name not in shapes and name not in self.consts:
                    if name in later:
                        raise GraphError(f"{where} uses {name!r}, which is produced by node "
                                         f"{later[name].name!r} at or after it: the graph has a cycle "
                                         "or is not in topological order")
                    raise GraphError(f"{where} names missing tensor {name!r}")
            if len(node.outputs) != 1:
                raise GraphError(f"{where} must have exactly one output, has {len(node.outputs)}")
            _check_attrs(node, spec, where)
            out = spec.infer(self, node, shapes, where)
            _check_elements(out[1:], f"{where} output")
            define(node.outputs[0], where)
            shapes[node.outputs[0]] = out
        if not self.outputs:
            raise GraphError("the graph has no outputs")
        for o in self.outputs:
            if o not in shapes:
                raise GraphError(f"graph output {o!r} is not produced by any node or input")
        used = {n for node in self.nodes for n in node.inputs}
        for name in self.consts:
            if name not in used:
                raise GraphError(f"constant {name!r} is not used by any node")
        return shapes

    def __repr__(self) -> str:
        return (f"Graph({len(self.nodes)} nodes, {len(self.consts)} constants, "
                f"inputs={[v.name for v in self.inputs]}, outputs={self.outputs})")


# ---------------------------------------------------------------------- helpers


def _expect(value, typ, where):
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise GraphError(f"{where} must be {typ.__name__}, got {type(value).__name__} {_short(value)}")
    return value


def _no_extra(obj: dict, allowed: set, where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise GraphError(f"{where} has unknown field {extra[0]!r}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_int(value, where, lo=None, hi=None) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise GraphError(f"{where} must be an integer, got {_short(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise GraphError(f"{where} is {value}, outside [{lo}, {hi}]")
    return int(value)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # a JSON integer beyond the float range
        return False


def _check_elements(dims, where) -> None:
    """Each dimension at most MAX_DIM, at most MAX_ELEMENTS in all (per sample)."""
    n = 1
    for d in dims:
        if int(d) > MAX_DIM:
            raise GraphError(f"{where} has a dimension of {int(d)}, more than the limit {MAX_DIM}")
        n *= int(d)
    if n > MAX_ELEMENTS:
        raise GraphError(f"{where} has {n} elements per sample, more than the limit {MAX_ELEMENTS}")


def _const(graph: Graph, name: str, where: str, role: str, kinds=KINDS) -> Const:
    c = graph.consts.get(name)
    if c is None:
        raise GraphError(f"{where}: {role} {name!r} must be a constant")
    if c.kind not in kinds:
        raise GraphError(f"{where}: {role} {name!r} has kind {c.kind}, expected {'/'.join(kinds)}")
    return c


def _act(shapes, name, where, rank=None) -> tuple:
    if name not in shapes:
        raise GraphError(f"{where}: input {name!r} must be an activation, not a constant")
    s = shapes[name]
    if rank is not None and len(s) != rank:
        raise GraphError(f"{where}: input {name!r} has rank {len(s)}, expected {rank}")
    return s


def _inputs(node: Node, lo: int, hi: int, where: str) -> list[str]:
    if not lo <= len(node.inputs) <= hi:
        raise GraphError(f"{where} takes {lo}..{hi} inputs, has {len(node.inputs)}")
    return list(node.inputs) + [""] * (hi - len(node.inputs))


def _vector(graph, name, n, where, role) -> None:
    if name:
        c = _const(graph, name, where, role, ("float32",))
        if c.shape != (n,):
            raise GraphError(f"{where}: {role} {name!r} has shape {list(c.shape)}, expected [{n}]")


def out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's output size of a window op along one axis (below 1: the kernel is larger than the
    padded input): ``ceil_mode`` keeps a last, clipped window only when it starts inside the input
    or its left padding."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _window(size, k, s, p, d, ceil_mode, where, pool: bool = False) -> int:
    """:func:`out_size`, checked: a pool's padding is at most half its kernel (a convolution's may
    be larger: it pads with zeros), and one window at least."""
    if pool and 2 * p > k:
        raise GraphError(f"{where}: padding {p} is more than half the kernel {k}")
    out = out_size(size, k, s, p, d, ceil_mode)
    if out < 1:
        raise GraphError(f"{where}: kernel {k} (dilation {d}) is larger than the padded input {size + 2 * p}")
    return out


# ---------------------------------------------------------------------- operators


@dataclass(frozen=True)
class OpSpec:
    attrs: dict  # name -> type; every attribute is required
    infer: Any


def _infer_linear(g, node, shapes, where):
    x, w, scale, bias = _inputs(node, 2, 4, where)
    xs = _act(shapes, x, where, 2)
    wc = _const(g, w, where, "weight")
    if len(wc.shape) != 2 or wc.shape[1] != xs[1]:
        raise GraphError(f"{where}: weight {w!r} has shape {list(wc.shape)}; input has {xs[1]} features")
    _vector(g, scale, wc.shape[0], where, "scale")
    _vector(g, bias, wc.shape[0], where, "bias")
    return (None, wc.shape[0])


def _infer_conv2d(g, node, shapes, where):
    x, w, scale, bias = _inputs(node, 2, 4, where)
    n, c, h, wd = _act(shapes, x, where, 4)
    wc = _const(g, w, where, "weight")
    groups = node.attrs["groups"]
    if len(wc.shape) != 4:
        raise GraphError(f"{where}: weight {w!r} has rank {len(wc.shape)}, expected 4")
    o, cg, kh, kw = wc.shape
    if c % groups or o % groups or cg * groups != c:
        raise GraphError(f"{where}: weight {w!r} shape {list(wc.shape)} does not fit {c} input "
                         f"channels in {groups} groups")
    _vector(g, scale, o, where, "scale")
    _vector(g, bias, o, where, "bias")
    (sh, sw), (ph, pw), (dh, dw) = node.attrs["strides"], node.attrs["pads"], node.attrs["dilations"]
    return (None, o, _window(h, kh, sh, ph, dh, False, where), _window(wd, kw, sw, pw, dw, False, where))


def _infer_pool(g, node, shapes, where):
    (x,) = _inputs(node, 1, 1, where)
    n, c, h, w = _act(shapes, x, where, 4)
    (kh, kw), (sh, sw), (ph, pw) = node.attrs["kernel"], node.attrs["strides"], node.attrs["pads"]
    dh, dw = node.attrs.get("dilations", [1, 1])
    ceil_mode = node.attrs["ceil_mode"]
    return (None, c, _window(h, kh, sh, ph, dh, ceil_mode, where, pool=True),
            _window(w, kw, sw, pw, dw, ceil_mode, where, pool=True))


def _infer_affine(g, node, shapes, where):
    x, scale, shift = _inputs(node, 3, 3, where)
    xs = _act(shapes, x, where)
    if len(xs) < 2:
        raise GraphError(f"{where}: input must have a channel axis")
    if not scale or not shift:
        raise GraphError(f"{where}: scale and shift are required")
    _vector(g, scale, xs[1], where, "scale")
    _vector(g, shift, xs[1], where, "shift")
    return xs


def _infer_unary(g, node, shapes, where):
    (x,) = _inputs(node, 1, 1, where)
    return _act(shapes, x, where)


def _infer_softmax(g, node, shapes, where):
    (x,) = _inputs(node, 1, 1, where)
    xs = _act(shapes, x, where)
    if node.attrs["axis"] >= len(xs):
        raise GraphError(f"{where}: axis {node.attrs['axis']} is out of range for rank {len(xs)}")
    return xs


def _infer_global_avgpool(g, node, shapes, where):
    (x,) = _inputs(node, 1, 1, where)
    xs = _act(shapes, x, where, 4)
    return (None, xs[1], 1, 1)


def _infer_flatten(g, node, shapes, where):
    (x,) = _inputs(node, 1, 1, where)
    xs = _act(shapes, x, where)
    return (None, math.prod(xs[1:]))


def _infer_reshape(g, node, shapes, where):
    (x,) = _inputs(node, 1, 1, where)
    xs = _act(shapes, x, where)
    shape = node.attrs["shape"]
    total = math.prod(xs[1:])
    known = math.prod(d for d in shape if d != -1)
    if sum(d == -1 for d in shape) > 1 or any(d == 0 or d < -1 for d in shape):
        raise GraphError(f"{where}: shape {shape} must hold positive sizes and at most one -1")
    if -1 in shape:
        if total % known:
            raise GraphError(f"{where}: cannot reshape {list(xs[1:])} to {shape}")
        shape = [total // known if d == -1 else d for d in shape]
    elif known != total:
        raise GraphError(f"{where}: cannot reshape {list(xs[1:])} ({total} elements) to {shape}")
    return (None, *shape)


def _infer_add(g, node, shapes, where):
    a, b = _inputs(node, 2, 2, where)
    sa, sb = _act(shapes, a, where), _act(shapes, b, where)
    if sa != sb:
        raise GraphError(f"{where}: shapes {list(sa[1:])} and {list(sb[1:])} differ (batch excluded)")
    return sa


def _infer_concat(g, node, shapes, where):
    if len(node.inputs) < 1:
        raise GraphError(f"{where} needs at least one input")
    ss = [_act(shapes, x, where) for x in node.inputs]
    axis = node.attrs["axis"]
    rank = len(ss[0])
    if axis >= rank:
        raise GraphError(f"{where}: axis {axis} is out of range for rank {rank}")
    for s in ss[1:]:
        if len(s) != rank or any(a != b for i, (a, b) in enumerate(zip(s, ss[0])) if i not in (0, axis)):
            raise GraphError(f"{where}: shapes {[list(t[1:]) for t in ss]} cannot be joined on axis {axis}")
    out = list(ss[0])
    out[axis] = sum(s[axis] for s in ss)
    return tuple(out)


INT, FLOAT, BOOL, PAIR, LIST = "int", "float", "bool", "pair", "list"

OPS: dict[str, OpSpec] = {
    "linear": OpSpec({}, _infer_linear),
    "conv2d": OpSpec({"strides": PAIR, "pads": PAIR, "dilations": PAIR, "groups": INT}, _infer_conv2d),
    "channel_affine": OpSpec({}, _infer_affine),
    "relu": OpSpec({}, _infer_unary),
    "leaky_relu": OpSpec({"alpha": FLOAT}, _infer_unary),
    "hardtanh": OpSpec({"min_val": FLOAT, "max_val": FLOAT}, _infer_unary),
    "maxpool2d": OpSpec({"kernel": PAIR, "strides": PAIR, "pads": PAIR, "dilations": PAIR, "ceil_mode": BOOL},
                        _infer_pool),
    "avgpool2d": OpSpec({"kernel": PAIR, "strides": PAIR, "pads": PAIR, "ceil_mode": BOOL,
                         "count_include_pad": BOOL}, _infer_pool),
    "global_avgpool": OpSpec({}, _infer_global_avgpool),
    "flatten": OpSpec({}, _infer_flatten),
    "reshape": OpSpec({"shape": LIST}, _infer_reshape),
    "add": OpSpec({}, _infer_add),
    "concat": OpSpec({"axis": INT}, _infer_concat),
    "softmax": OpSpec({"axis": INT}, _infer_softmax),
    "log_softmax": OpSpec({"axis": INT}, _infer_softmax),
}

_PAIR_RANGES = {"strides": (1, 1 << 16), "pads": (0, 1 << 16), "dilations": (1, 1 << 16), "kernel": (1, 1 << 16)}


def _check_attrs(node: Node, spec: OpSpec, where: str) -> None:
    attrs = node.attrs
    if not isinstance(attrs, dict):
        raise GraphError(f"{where}: attrs must be an object")
    extra = sorted(set(attrs) - set(spec.attrs))
    if extra:
        raise GraphError(f"{where}: unknown attribute {extra[0]!r}")
    for name, typ in spec.attrs.items():
        if name not in attrs:
            raise GraphError(f"{where}: attribute {name!r} is missing")
        v = attrs[name]
        w = f"{where} attribute {name}"
        if typ == INT:
            _check_int(v, w, lo=1, hi=1 << 20)  # groups >= 1; axes >= 1 (never the batch axis)
        elif typ == FLOAT:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
                raise GraphError(f"{w} must be a finite number, got {_short(v)}")
        elif typ == BOOL:
            if not isinstance(v, bool):
                raise GraphError(f"{w} must be true or false, got {_short(v)}")
        elif typ == PAIR:
            if not isinstance(v, list) or len(v) != 2:
                raise GraphError(f"{w} must be a list of two integers, got {_short(v)}")
            lo, hi = _PAIR_RANGES[name]
            for d in v:
                _check_int(d, w, lo=lo, hi=hi)
        elif typ == LIST:
            if not isinstance(v, list) or not v or len(v) > 8:
                raise GraphError(f"{w} must be a list of 1..8 integers, got {_short(v)}")
            for d in v:
                _check_int(d, w, lo=-1, hi=MAX_DIM)
    if node.op == "hardtanh" and not attrs["min_val"] < attrs["max_val"]:
        raise GraphError(f"{where}: min_val {attrs['min_val']} must be below max_val {attrs['max_val']}")
