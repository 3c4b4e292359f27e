"""The numpy runtime against the torch model as the oracle.

Zoo models (with weights projected to ternary, sparse ternary and binary, and random BatchNorm
statistics) are lowered, written, loaded by :class:`ternarize.runtime.Runtime` and run; hand-built
graphs check every op against torch functions directly; a model trained on digits (and on MNIST
when its files are present) must predict the same classes. Also: memory (weights stay encoded,
temporaries stay bounded, liveness), input validation, and a run where importing torch fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ternarize import data, tern, zoo
from ternarize import runtime as runtime_module
from ternarize.errors import ConfigError, DataError, TernFormatError
from ternarize.graph import Const, Graph, Node, Value
from ternarize.lowering import lower
from ternarize.runtime import Runtime, gaps, kernels, sparse, weights

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "formats" / "golden"


# ---------------------------------------------------------------------- helpers


def project(model: nn.Module, mode: str, seed: int = 0, density: float = 2 / 3, keep_float=()) -> dict:
    """Make every Linear/Conv2d weight s_c·θ (θ random, ternary or binary) and give every BatchNorm
    random statistics (some γ negative); return the ``discrete`` mapping for ``lower``."""
    g = torch.Generator().manual_seed(seed)
    discrete = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name not in keep_float:
            shape = m.weight.shape
            sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
            theta = sign if mode == "binary" else sign * (torch.rand(shape, generator=g) < density)
            s = 0.2 + torch.rand(shape[0], generator=g)
            with torch.no_grad():
                m.weight.copy_(theta * s.reshape(-1, *([1] * (len(shape) - 1))))
            discrete[f"{name}.weight"] = mode if mode == "binary" else "ternary"
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(torch.randn(c, generator=g))  # about half negative
                m.bias.copy_(torch.randn(c, generator=g))
    return discrete


def compile_model(model, in_shape, discrete, path, **write_kw) -> tuple[Runtime, tern.WriteInfo]:
    model.eval()
    graph = lower(model, torch.zeros(1, *in_shape), discrete)
    info = tern.write(graph, path, **write_kw)
    return Runtime.load(path), info


def torch_out(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def assert_close(got, ref, rel=1e-4):
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert got.shape == ref.shape
    assert err <= rel * max(scale, 1e-6), f"max |Δ| {err:.3g} > {rel} · max |ref| {scale:.3g}"


def inputs(in_shape, n=100, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *in_shape)).astype(np.float32)


# ---------------------------------------------------------------------- zoo models vs torch

ZOO = [
    ("mlp", (1, 28, 28), {"width": 32}),
    ("vgg", (1, 28, 28), {"width": 0.125}),
    ("vgg", (3, 32, 32), {"width": 0.125}),
    ("lenet", (1, 28, 28), {}),
    ("resnet", (1, 28, 28), {"width": 8}),
    ("resnet", (3, 32, 32), {"width": 8}),
]
# (kind, density, the encoding asked for or expected): dense ternary asks for t2, which the writer
# would otherwise not choose (ts is smaller below about 90 % non-zero)
MODES = {"ternary": ("ternary", 0.5, "t2"), "sparse": ("ternary", 0.05, "ts"), "binary": ("binary", 1.0, "b1")}
CASES = [(name, shape, kw, mode) for name, shape, kw in ZOO for mode in ("ternary", "sparse")]
CASES += [("mlp", (1, 28, 28), {"width": 32}, "binary"), ("lenet", (1, 28, 28), {}, "binary"),
          ("resnet", (3, 32, 32), {"width": 8}, "binary")]


@pytest.mark.parametrize("name,in_shape,kw,mode", CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[3]}" for c in CASES])
def test_zoo_matches_torch(tmp_path, name, in_shape, kw, mode):
    torch.manual_seed(0)
    model = zoo.create(name, in_shape=in_shape, **kw)
    kind, density, encoding = MODES[mode]
    discrete = project(model, kind, density=density)
    model.eval()
    graph = lower(model, torch.zeros(1, *in_shape), discrete)
    asked = {n: "t2" for n in graph.discrete_weights()} if encoding == "t2" else None
    info = tern.write(graph, tmp_path / "m.tern", encodings=asked)
    rt = Runtime.load(tmp_path / "m.tern")
    used = {e.encoding for e in info.tensors if e.kind != "float32"}
    assert encoding in used, f"expected some {encoding} tensors, got {used}"
    x = inputs(in_shape)
    assert_close(rt.run(x), torch_out(model, x))
    assert rt.weight_bytes <= 1.2 * rt.encoded_bytes


@pytest.mark.parametrize("form", ["stream", "gaps", "indices"])
@pytest.mark.parametrize("name,in_shape,kw", ZOO, ids=[f"{z[0]}-{'x'.join(map(str, z[1]))}" for z in ZOO])
def test_zoo_sparse_forms_match_torch(tmp_path, name, in_shape, kw, form):
    """Each way of holding ts weights, on every zoo model at 5 % non-zero, batch 1 and batch 100."""
    torch.manual_seed(0)
    model = zoo.create(name, in_shape=in_shape, **kw)
    compile_model(model, in_shape, project(model, "ternary", density=0.05), tmp_path / "m.tern")
    rt = Runtime.load(tmp_path / "m.tern", sparse=form)
    assert set(rt.forms.values()) == {form}
    x = inputs(in_shape)
    assert_close(rt.run(x), torch_out(model, x))
    assert_close(rt.run(x[:1]), torch_out(model, x[:1]))


@pytest.mark.parametrize("name,in_shape,kw", ZOO, ids=[f"{z[0]}-{'x'.join(map(str, z[1]))}" for z in ZOO])
def test_dense_ts_weights_are_held_as_t2_codes(tmp_path, name, in_shape, kw):
    """At 85 % non-zero the writer keeps ts (smaller than t2 by about 7 %), and "auto" holds such
    weights as dense 2-bit codes: within the budget, and as torch computes them."""
    torch.manual_seed(0)
    model = zoo.create(name, in_shape=in_shape, **kw)
    compile_model(model, in_shape, project(model, "ternary", density=0.85), tmp_path / "m.tern")
    rt = Runtime.load(tmp_path / "m.tern")
    assert rt.forms and set(rt.forms.values()) <= {"t2", "gaps"} and "t2" in rt.forms.values(), rt.forms
    assert rt.weight_bytes <= 1.2 * rt.encoded_bytes
    x = inputs(in_shape)
    assert_close(rt.run(x), torch_out(model, x))
    assert_close(rt.run(x[:1]), torch_out(model, x[:1]))


def test_half_dense_weights_take_t2_codes_while_the_budget_lasts(tmp_path):
    """At 50 % non-zero t2 codes are 1.33× the ts stream: some weights fit within 1.2×, the rest
    stay streams; a budget of 1.4 holds them all as t2; "gaps" never picks t2."""
    _sparse_mlp(tmp_path / "m.tern", seed=2, width=128, density=0.5)
    x = inputs((1, 28, 28), n=5)
    ref = Runtime.load(tmp_path / "m.tern", sparse="stream")
    auto = Runtime.load(tmp_path / "m.tern")
    assert set(auto.forms.values()) == {"t2", "stream"}, auto.forms
    assert auto.weight_bytes <= 1.2 * auto.encoded_bytes
    roomy = Runtime.load(tmp_path / "m.tern", budget=1.4)
    assert set(roomy.forms.values()) == {"t2"} and roomy.weight_bytes <= 1.4 * roomy.encoded_bytes
    assert set(Runtime.load(tmp_path / "m.tern", sparse="gaps").forms.values()) == {"gaps"}
    for rt in (auto, roomy):
        assert_close(rt.run(x), ref.run(x), 1e-6)


def test_mixed_float_and_discrete(tmp_path):
    torch.manual_seed(1)
    model = zoo.create("lenet", in_shape=(1, 28, 28))
    discrete = project(model, "ternary", density=0.3, keep_float=("0", "15"))
    rt, info = compile_model(model, (1, 28, 28), discrete, tmp_path / "m.tern")
    kinds = {e.name: e.encoding for e in info.tensors}
    assert kinds["0.weight"] == "f32" and kinds["15.weight"] == "f32"
    x = inputs((1, 28, 28), n=50)
    assert_close(rt.run(x), torch_out(model, x))


def test_f16_floats(tmp_path):
    """f16 tensors: exact against the decoded graph, within float16 precision against torch."""
    sys.path.insert(0, str(Path(__file__).parent))
    import ir_torch

    torch.manual_seed(2)
    model = zoo.create("lenet", in_shape=(1, 28, 28))
    discrete = project(model, "ternary", density=0.3, keep_float=("0",))
    rt, info = compile_model(model, (1, 28, 28), discrete, tmp_path / "m.tern", allow_lossy=True)
    assert "f16" in {e.encoding for e in info.tensors}
    x = inputs((1, 28, 28), n=50)
    got = rt.run(x)
    assert got.dtype == np.float32
    assert_close(got, ir_torch.run(tern.read(tmp_path / "m.tern"), x))
    assert_close(got, torch_out(model, x), rel=2e-2)
    # f16 scales and biases stay as stored: no decoded float32 copies beside the buffer
    f16 = {e.name for e in info.tensors if e.encoding == "f16"}
    vectors = [n for n in rt._vectors if n in f16]
    assert vectors and all(rt._vectors[n].dtype == np.float16 for n in vectors)
    lazy = Runtime.load(tmp_path / "m.tern", sparse="stream")
    assert lazy.weight_bytes - lazy._store.nbytes == sum(op.nbytes for op in lazy._ops.values())


# ---------------------------------------------------------------------- hand-built graphs vs torch


def run_graph(tmp_path, graph: Graph, x: np.ndarray, **write_kw) -> np.ndarray:
    tern.write(graph, tmp_path / "g.tern", **write_kw)
    return Runtime.load(tmp_path / "g.tern").run(x)


def one_op(op, in_shape, attrs, consts=None, extra_inputs=()) -> Graph:
    return Graph([Value("x", (None, *in_shape))], ["y"],
                 [Node(op, "n", ["x", *extra_inputs], ["y"], attrs)], consts or {})


UNARY = [
    ("leaky_relu", {"alpha": 0.1}, lambda t: F.leaky_relu(t, 0.1)),
    ("leaky_relu", {"alpha": -2.5}, lambda t: F.leaky_relu(t, -2.5)),
    ("hardtanh", {"min_val": -0.5, "max_val": 1.25}, lambda t: F.hardtanh(t, -0.5, 1.25)),
    ("relu", {}, F.relu),
    ("softmax", {"axis": 1}, lambda t: F.softmax(t, 1)),
    ("softmax", {"axis": 3}, lambda t: F.softmax(t, 3)),
    ("log_softmax", {"axis": 2}, lambda t: F.log_softmax(t, 2)),
    ("global_avgpool", {}, lambda t: t.mean((2, 3), keepdim=True)),
    ("flatten", {}, lambda t: t.flatten(1)),
    ("reshape", {"shape": [5, -1, 3]}, lambda t: t.reshape(len(t), 5, -1, 3)),
]


@pytest.mark.parametrize("op,attrs,fn", UNARY, ids=[f"{u[0]}-{i}" for i, u in enumerate(UNARY)])
def test_unary_ops(tmp_path, op, attrs, fn):
    x = inputs((3, 5, 6), n=4) * 4
    x[0, 0, 0, :3] = [1e4, -1e4, 0.0]  # softmax must be stable
    assert_close(run_graph(tmp_path, one_op(op, (3, 5, 6), attrs), x), fn(torch.from_numpy(x)).numpy(), 1e-5)


POOLS = [  # kernel, stride, pad, dilation, ceil_mode, count_include_pad, input H, W
    ((2, 2), (2, 2), (0, 0), (1, 1), False, True, 7, 8),
    ((2, 2), (2, 2), (0, 0), (1, 1), True, True, 7, 7),
    ((3, 3), (2, 2), (1, 1), (1, 1), True, False, 6, 7),
    ((3, 2), (2, 3), (1, 1), (1, 1), True, True, 8, 9),
    ((3, 3), (3, 3), (1, 0), (1, 1), True, False, 10, 5),
    ((3, 3), (2, 1), (1, 1), (2, 2), True, None, 9, 8),    # max-pool only: dilation
    ((2, 3), (1, 2), (1, 1), (2, 1), False, None, 6, 9),
    ((4, 4), (3, 3), (2, 2), (1, 1), True, False, 11, 10),
    ((3, 3), (2, 2), (0, 0), (1, 1), True, True, 2, 2),     # kernel beyond the input: one clipped window
    ((4, 3), (2, 3), (1, 0), (1, 1), True, False, 1, 2),
]


@pytest.mark.parametrize("k,s,p,d,ceil,cip,h,w", POOLS)
def test_pools(tmp_path, k, s, p, d, ceil, cip, h, w):
    x = inputs((3, h, w), n=2)
    t = torch.from_numpy(x)
    attrs = {"kernel": list(k), "strides": list(s), "pads": list(p), "ceil_mode": ceil}
    ref = F.max_pool2d(t, k, s, p, d, ceil_mode=ceil).numpy()
    assert_close(run_graph(tmp_path, one_op("maxpool2d", (3, h, w), {**attrs, "dilations": list(d)}), x), ref, 1e-6)
    if cip is not None:
        ref = F.avg_pool2d(t, k, s, p, ceil_mode=ceil, count_include_pad=cip).numpy()
        got = run_graph(tmp_path, one_op("avgpool2d", (3, h, w), {**attrs, "count_include_pad": cip}), x)
        assert_close(got, ref, 1e-5)


def test_a_pool_without_a_window_is_refused():
    from ternarize.errors import GraphError

    attrs = {"kernel": [3, 3], "strides": [2, 2], "pads": [0, 0], "dilations": [1, 1], "ceil_mode": False}
    with pytest.raises(GraphError, match=r"node 'n' \(maxpool2d\): kernel 3 \(dilation 1\) is larger than the "
                                         r"padded input 2$"):
        one_op("maxpool2d", (1, 2, 2), attrs).validate()
    with pytest.raises(RuntimeError):  # torch refuses it too
        F.max_pool2d(torch.zeros(1, 1, 2, 2), 3, 2)
    assert one_op("maxpool2d", (1, 2, 2), {**attrs, "ceil_mode": True}).validate()["y"] == (None, 1, 1, 1)


def test_add_and_concat(tmp_path):
    g = Graph([Value("x", (None, 2, 3, 4))], ["y"], [
        Node("relu", "r", ["x"], ["a"]),
        Node("add", "s", ["a", "x"], ["b"]),
        Node("concat", "c", ["b", "x", "a"], ["c"], {"axis": 2}),
        Node("concat", "c2", ["c", "c"], ["y"], {"axis": 1}),
    ], {})
    x = inputs((2, 3, 4), n=3)
    t = torch.from_numpy(x)
    b = F.relu(t) + t
    c = torch.cat([b, t, F.relu(t)], 2)
    assert_close(run_graph(tmp_path, g, x), torch.cat([c, c], 1).numpy(), 1e-6)


CONVS = [  # in channels, out channels, kernel, stride, pad, dilation, groups
    (4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (4, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    (6, 6, (3, 3), (1, 2), (1, 1), (2, 2), 6),
    (4, 8, (1, 3), (2, 1), (0, 1), (1, 3), 4),
    (3, 5, (5, 4), (3, 2), (2, 2), (1, 1), 1),
]
ENCODINGS = [("ternary", "t2"), ("ternary", "ts"), ("binary", "b1"), ("binary", "t2"), ("float32", "f32"),
             ("float32", "f16")]


@pytest.mark.parametrize("kind,encoding", ENCODINGS)
@pytest.mark.parametrize("cin,cout,k,s,p,d,groups", CONVS)
def test_conv_and_linear_encodings(tmp_path, kind, encoding, cin, cout, k, s, p, d, groups):
    rng = np.random.default_rng(3)
    wshape = (cout, cin // groups, *k)
    w = _codes(rng, kind, wshape)
    scale = (0.5 + rng.random(cout)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    consts = {"w": Const(kind, w), "b": Const("float32", bias)}
    inputs_ = ["x", "w", "", "b"]
    wf = w.astype(np.float32)
    if kind != "float32":
        consts["s"] = Const("float32", scale)
        inputs_[2] = "s"
        wf = wf * scale.reshape(-1, 1, 1, 1)
    attrs = {"strides": list(s), "pads": list(p), "dilations": list(d), "groups": groups}
    g = Graph([Value("x", (None, cin, 11, 10))], ["y"], [Node("conv2d", "c", inputs_, ["y"], attrs)], consts)
    x = inputs((cin, 11, 10), n=3)
    lossy = encoding == "f16"
    if lossy:
        wf = wf.astype(np.float16).astype(np.float32)
        bias = bias.astype(np.float16).astype(np.float32)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(wf), torch.from_numpy(bias), s, p, d, groups).numpy()
    got = run_graph(tmp_path, g, x, encodings={"w": encoding}, allow_lossy=lossy)
    assert_close(got, ref, 1e-3 if lossy else 1e-5)


def _codes(rng, kind, shape, density=0.4):
    if kind == "float32":
        return rng.standard_normal(shape).astype(np.float32)
    sign = np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int8)
    return sign if kind == "binary" else sign * (rng.random(shape) < density).astype(np.int8)


@pytest.mark.parametrize("kind,encoding", ENCODINGS)
@pytest.mark.parametrize("k", [1, 7, 8, 33, 300])
def test_linear_encodings(tmp_path, kind, encoding, k):
    rng = np.random.default_rng(k)
    w = _codes(rng, kind, (13, k), density=0.1)
    scale = (0.5 + rng.random(13)).astype(np.float32)
    consts = {"w": Const(kind, w), "s": Const("float32", scale)} if kind != "float32" else {"w": Const(kind, w)}
    g = Graph([Value("x", (None, k))], ["y"], [Node("linear", "fc", ["x", "w", "s" if kind != "float32" else ""],
                                                    ["y"])], consts)
    x = inputs((k,), n=5)
    wf = w.astype(np.float32) * (scale[:, None] if kind != "float32" else 1)
    lossy = encoding == "f16"
    if lossy:
        wf = wf.astype(np.float16).astype(np.float32)
        if kind != "float32":
            pytest.skip("f16 is for float tensors")
    assert_close(run_graph(tmp_path, g, x, encodings={"w": encoding}, allow_lossy=lossy), x @ wf.T, 1e-5)


# ---------------------------------------------------------------------- the ts decoder itself


@pytest.mark.parametrize("k", range(1, 21))
def test_remainder_slots_every_k(k):
    rng = np.random.default_rng(k)
    groups = 37
    p = rng.integers(0, 256, groups * k).astype(np.uint8)
    bits = np.unpackbits(p, bitorder="little").reshape(groups * 8, k).astype(np.int64)
    expected = (bits << np.arange(k)).sum(axis=1).reshape(groups, 8).T
    assert np.array_equal(sparse._slots(p, groups, k).astype(np.int64), expected)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.05, 0.01, 0.002, 0.0])
@pytest.mark.parametrize("cache", [False, True])
def test_sparse_codes_against_dense(monkeypatch, density, cache):
    from ternarize import pack

    monkeypatch.setattr(sparse, "EVENTS_PER_GROUP", 300)  # many groups, and groups of one block
    rng = np.random.default_rng(int(density * 1000))
    # up to sparse.FEW_COLUMNS columns gather rows of the interleaved input, more go through Columns
    for rows, cols, groups, m in [(40, 500, 1, 1), (12, 3000, 3, 4), (9, 7, 9, 2), (100, 20, 1, 3),
                                  (30, 200, 1, 12), (12, 300, 3, 9)]:
        theta = _codes(rng, "ternary", (rows, cols), density)
        buf, params = pack.encode(theta, "ternary", "ts")
        w = sparse.SparseCodes(np.frombuffer(buf, np.uint8), (rows, cols), params, groups, cache)
        x = rng.standard_normal((groups * cols, m)).astype(np.float32)
        og = rows // groups
        ref = np.concatenate([theta[i * og:(i + 1) * og].astype(np.float64) @ x[i * cols:(i + 1) * cols]
                              for i in range(groups)])
        assert_close(w.matmul(x), ref, 1e-5)


@pytest.mark.parametrize("density", [0.05, 0.005])  # remainders of k <= 5 and k > 5 bits
@pytest.mark.parametrize("cache", [False, True])
def test_sparse_codes_whose_last_blocks_are_empty(density, cache):
    from ternarize import pack

    rng = np.random.default_rng(5)
    theta = _codes(rng, "ternary", (12, 6000), density)
    theta[11:] = 0  # blocks of 11 rows: the last block has no event
    buf, params = pack.encode(theta, "ternary", "ts")
    assert params["block_rows"] == 11
    w = sparse.SparseCodes(np.frombuffer(buf, np.uint8), theta.shape, params, 1, cache)
    x = rng.standard_normal((6000, 3)).astype(np.float32)
    assert_close(w.matmul(x), theta.astype(np.float64) @ x, 1e-5)
    index, starts = w.decode_all()
    assert starts[-1] == index.size  # the empty last row starts after the last event


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_sparse_sums_of_one_sign_inputs_keep_float32_precision(tmp_path, layer):
    """A wide ts layer after a ReLU, each row as many +1 as −1 weights, over 64 input columns (a
    batch of 64, or a 1×1 convolution's 8×8 patches): the sparse forms sum the +1 and the −1
    inputs apart, two sums of about 12 300 whose difference is at most 300. In one running float32
    sum each, that difference was off by 1.7–2.4× the tolerance (pairwise: 0.15–0.23×), against a
    float64 oracle."""
    k, rows = 16384, 8
    rng = np.random.default_rng(0)
    theta = np.zeros((rows, k), np.int8)
    for r in range(rows):
        at = rng.permutation(k)[:k // 2]
        theta[r, at[:k // 4]], theta[r, at[k // 4:]] = 1, -1
    scale = (0.5 + rng.random(rows)).astype(np.float32)
    w = theta.astype(np.float64) * scale[:, None]
    if layer == "linear":
        consts = {"w": Const("ternary", theta), "s": Const("float32", scale)}
        x = (rng.standard_normal((64, k)) + 3).astype(np.float32)
        ref = np.maximum(x, 0).astype(np.float64) @ w.T
        node = Node("linear", "fc", ["h", "w", "s"], ["y"])
    else:
        consts = {"w": Const("ternary", theta.reshape(rows, k, 1, 1)), "s": Const("float32", scale)}
        x = (rng.standard_normal((1, k, 8, 8)) + 3).astype(np.float32)
        ref = np.einsum("ok,nkhw->nohw", w, np.maximum(x, 0).astype(np.float64))
        node = Node("conv2d", "c", ["h", "w", "s"], ["y"],
                    {"strides": [1, 1], "pads": [0, 0], "dilations": [1, 1], "groups": 1})
    g = Graph([Value("x", (None, *x.shape[1:]))], ["y"], [Node("relu", "act", ["x"], ["h"]), node], consts)
    tern.write(g, tmp_path / "m.tern", encodings={"w": "ts"})
    for form in ("stream", "gaps", "indices"):
        rt = Runtime.load(tmp_path / "m.tern", sparse=form)
        assert rt.forms == {"w": form}
        assert_close(rt.run(x), ref)


def test_chunked_paths_agree(tmp_path, monkeypatch):
    """Tiny blocks, event groups, gather chunks and patch chunks give the same outputs."""
    torch.manual_seed(4)
    model = zoo.create("resnet", in_shape=(3, 16, 16), width=8)
    discrete = project(model, "ternary", density=0.05)
    discrete.update({k: "ternary" for k in list(discrete)[::2]})
    rt, _ = compile_model(model, (3, 16, 16), discrete, tmp_path / "m.tern")
    x = inputs((3, 16, 16), n=6)
    before = rt.run(x)
    monkeypatch.setattr(weights, "BLOCK_BYTES", 64)
    monkeypatch.setattr(sparse, "EVENTS_PER_GROUP", 50)
    monkeypatch.setattr(sparse, "GATHER_BYTES", 1024)
    monkeypatch.setattr(kernels, "PATCH_BYTES", 1)
    monkeypatch.setattr(gaps, "CHUNK_BYTES", 40)
    monkeypatch.setattr(gaps, "FLAT_BYTES", 0)
    for form in ("stream", "gaps"):
        rt = Runtime.load(tmp_path / "m.tern", sparse=form)
        for batch in (x, x[:1]):
            after = rt.run(batch)
            assert_close(after, before[:len(batch)], 1e-6)
            assert_close(after, torch_out(model, batch))


# ---------------------------------------------------------------------- trained models


def _trained_mlp(ds, width=64, epochs=3):
    from ternarize.train.loop import TrainConfig, fit

    torch.manual_seed(0)
    model = zoo.create("mlp", in_shape=ds.in_shape, num_classes=ds.num_classes, width=width)
    result = fit(model, ds, TrainConfig(epochs=epochs, progress=False), log=lambda s: None)
    return model.eval(), result.discrete


def _agreement(tmp_path, model, discrete, ds) -> float:
    rt, _ = compile_model(model, ds.in_shape, discrete, tmp_path / "trained.tern")
    with torch.no_grad():
        want = model(torch.from_numpy(ds.x_test)).argmax(1).numpy()
    got = rt.predict(ds.x_test)
    assert rt.accuracy(ds.x_test, ds.y_test) == pytest.approx(float(np.mean(got == ds.y_test)))
    return float(np.mean(got == want))


def test_trained_on_digits_predicts_like_torch(tmp_path):
    ds = data.load_dataset("digits")
    model, discrete = _trained_mlp(ds)
    assert discrete and set(discrete.values()) == {"ternary"}
    assert _agreement(tmp_path, model, discrete, ds) >= 0.999


@pytest.mark.mnist
def test_trained_on_mnist_predicts_like_torch(tmp_path):
    try:
        ds = data.load_dataset("mnist")
    except DataError:
        pytest.skip("MNIST is not under the data root; run: ternarize data fetch mnist")
    ds = dataclasses.replace(ds, x_train=ds.x_train[:6000], y_train=ds.y_train[:6000])
    model, discrete = _trained_mlp(ds, width=64, epochs=1)
    assert len(ds.x_test) == 10000
    assert _agreement(tmp_path, model, discrete, ds) >= 0.999


# ---------------------------------------------------------------------- memory


def test_weights_stay_encoded(tmp_path):
    """Resident weight bytes ≈ the encoded size; loading keeps no copy of the file; running a layer
    whose float form is 16 MiB allocates no more than a few blocks."""
    rng = np.random.default_rng(5)
    consts = {"w1": Const("ternary", _codes(rng, "ternary", (1024, 4096), 0.6)),
              "w2": Const("binary", _codes(rng, "binary", (512, 1024))),
              "w3": Const("ternary", _codes(rng, "ternary", (256, 512), 0.03))}
    g = Graph([Value("x", (None, 4096))], ["y"], [Node("linear", "a", ["x", "w1"], ["h"]),
                                                   Node("linear", "b", ["h", "w2"], ["h2"]),
                                                   Node("linear", "c", ["h2", "w3"], ["y"])], consts)
    info = tern.write(g, tmp_path / "big.tern", encodings={"w1": "t2"})
    assert [e.encoding for e in info.tensors] == ["t2", "b1", "ts"]
    encoded = sum(e.nbytes for e in info.tensors)
    x = inputs((4096,), n=1)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        rt = Runtime.load(tmp_path / "big.tern")
        resident = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        y = rt.run(x)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert rt.weight_bytes <= 1.2 * encoded and rt.encoded_bytes == encoded
    assert resident <= rt.weight_bytes + (256 << 10), "the loaded file must not stay resident"
    assert peak <= 4 * weights.BLOCK_BYTES, f"running allocated {peak} bytes; a float layer is {4 * 4096 * 1024}"
    ref = x.astype(np.float64) @ consts["w1"].data.T.astype(np.float64)
    ref = ref @ consts["w2"].data.T.astype(np.float64) @ consts["w3"].data.T.astype(np.float64)
    assert_close(y, ref.astype(np.float32), 1e-5)


def _sparse_mlp(path, seed: int, width: int, density: float):
    """A zoo MLP on 1×28×28 with its weights projected to ternary at ``density``, written to ``path``."""
    torch.manual_seed(seed)
    model = zoo.create("mlp", in_shape=(1, 28, 28), width=width)
    compile_model(model, (1, 28, 28), project(model, "ternary", density=density), path)
    return path


def test_sparse_forms_same_results(tmp_path):
    _sparse_mlp(tmp_path / "m.tern", seed=6, width=64, density=0.05)
    x = inputs((1, 28, 28), n=7)
    rts = {form: Runtime.load(tmp_path / "m.tern", sparse=form) for form in ("stream", "gaps", "indices", "auto")}
    for form, rt in rts.items():
        assert set(rt.forms.values()) == ({form} if form != "auto" else {"gaps"}), (form, rt.forms)
        assert_close(rt.run(x), rts["stream"].run(x), 1e-6)
        assert_close(rt.run(x[:1]), rts["stream"].run(x[:1]), 1e-6)
    assert rts["stream"].weight_bytes < rts["gaps"].weight_bytes < rts["indices"].weight_bytes
    assert rts["auto"].weight_bytes <= 1.2 * rts["auto"].encoded_bytes


def test_auto_keeps_the_memory_budget(tmp_path):
    """Within budget × encoded bytes: tight budgets keep streams; the choice is the cheapest first."""
    _sparse_mlp(tmp_path / "m.tern", seed=8, width=128, density=0.04)
    x = inputs((1, 28, 28), n=3)
    ref = Runtime.load(tmp_path / "m.tern", sparse="stream")
    seen = set()
    for budget in (1.0, 1.05, 1.1, 1.2, 1.5, 3.0):
        rt = Runtime.load(tmp_path / "m.tern", budget=budget)
        assert rt.weight_bytes <= budget * rt.encoded_bytes or set(rt.forms.values()) == {"stream"}
        assert_close(rt.run(x), ref.run(x), 1e-6)
        seen.add(tuple(sorted(rt.forms.items())))
    assert len(seen) >= 2, "the budget never changed the choice"
    assert set(Runtime.load(tmp_path / "m.tern", budget=1.0).forms.values()) == {"stream"}


@pytest.mark.parametrize("kwargs, message", [
    ({"sparse": "fast"}, "sparse must be one of"),
    ({"budget": 0.5}, "budget must be a number >= 1"),
    ({"budget": "big"}, "budget must be a number >= 1"),
    ({"budget": float("nan")}, "budget must be a number >= 1"),
])
def test_bad_sparse_options(tmp_path, kwargs, message):
    g = Graph([Value("x", (None, 4))], ["y"], [Node("linear", "A", ["x", "w"], ["y"])],
              {"w": Const("ternary", np.eye(4, dtype=np.int8))})
    tern.write(g, tmp_path / "e.tern")
    with pytest.raises(ConfigError, match=message):
        Runtime.load(tmp_path / "e.tern", **kwargs)


def test_activation_bytes_by_hand(tmp_path):
    rng = np.random.default_rng(7)
    g = Graph([Value("x", (None, 8))], ["f"], [
        Node("linear", "A", ["x", "wa"], ["a"]),       # live x, a: 32 + 64
        Node("relu", "R", ["a"], ["b"]),               # x, a, b: 32 + 64 + 64 = 160 (the peak)
        Node("linear", "B", ["b", "wb"], ["c"]),       # x, b, c: 128
        Node("add", "S", ["c", "x"], ["d"]),           # x, c, d: 96
        Node("flatten", "V", ["d"], ["e"]),            # a view of d: 32
        Node("softmax", "P", ["e"], ["f"], {"axis": 1}),  # d, f: 64
    ], {"wa": Const("float32", rng.standard_normal((16, 8))), "wb": Const("float32", rng.standard_normal((8, 16)))})
    tern.write(g, tmp_path / "h.tern")
    rt = Runtime.load(tmp_path / "h.tern")
    assert rt.activation_bytes() == 160
    assert rt.activation_bytes(batch=3) == 480
    assert rt.run(inputs((8,), n=2)).shape == (2, 8)


@pytest.mark.parametrize("name,in_shape,kw", ZOO, ids=[f"{z[0]}-{'x'.join(map(str, z[1]))}" for z in ZOO])
@pytest.mark.parametrize("mode", ["ternary", "sparse"])
def test_memory_bytes_bounds_what_a_run_allocates(tmp_path, name, in_shape, kw, mode):
    kind, density, encoding = MODES[mode]
    model = zoo.create(name, in_shape=in_shape, **kw)
    discrete = project(model, kind, density=density)
    rt, _ = compile_model(model, in_shape, discrete, tmp_path / "m.tern",
                          encodings={n: encoding for n in discrete})
    for batch in (1, 7, 64):
        peak = _run_peak(rt, inputs(in_shape, n=batch))
        assert 0 < peak <= rt.memory_bytes(batch), (batch, peak, rt.memory_bytes(batch))


def _run_peak(rt: Runtime, x: np.ndarray) -> int:
    """The most a second run of ``x`` allocates at once beyond what was allocated before it."""
    rt.run(x)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        rt.run(x)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mode", ["ternary", "sparse", "binary"])
def test_memory_bytes_bounds_a_run_whose_activations_dominate(tmp_path, mode):
    """At a large batch the per-input terms alone must bound the run, without the fixed allowance."""
    kind, density, encoding = MODES[mode]
    model = zoo.create("mlp", in_shape=(1, 28, 28), width=256)
    discrete = project(model, kind, density=density)
    rt, _ = compile_model(model, (1, 28, 28), discrete, tmp_path / "m.tern", encodings={n: encoding for n in discrete})
    x = inputs((1, 28, 28), n=4096)
    peak = _run_peak(rt, x)
    assert rt.activation_bytes(4096) - x.nbytes < peak <= rt.memory_bytes(4096) - runtime_module.WORK_BYTES


def _padded_conv(tmp_path, pad: int) -> Runtime:
    w = np.zeros((2, 1, 3, 3), np.float32)
    w[:, 0, 1, 1] = 1
    g = one_op("conv2d", (1, 8, 8), {"strides": [1, 1], "pads": [pad, pad], "dilations": [1, 1], "groups": 1},
               {"w": Const("float32", w)}, ["w"])
    tern.write(g, tmp_path / "c.tern")
    return Runtime.load(tmp_path / "c.tern")


def test_a_run_larger_than_the_free_memory_is_refused(tmp_path, monkeypatch):
    from ternarize import _io

    huge = _padded_conv(tmp_path, 15000)  # a file of a few hundred bytes whose one input needs tens of GiB
    assert huge.memory_bytes(1) > 16 << 30
    monkeypatch.setattr(_io, "free_memory", lambda: 8 << 30)
    with pytest.raises(ConfigError, match=r"needs about .* GiB of memory to run one input, more than the 8\.0 GiB "
                                          r"free here; its graph is too large"):
        huge.run(inputs((1, 8, 8), n=1))
    monkeypatch.setattr(runtime_module, "CHECK_BYTES", 0)  # look at the free memory for every run
    small = _padded_conv(tmp_path, 1)
    per = small.memory_bytes(2) - small.memory_bytes(1)
    monkeypatch.setattr(_io, "free_memory", lambda: small.memory_bytes(10) + per // 2)
    assert small.run(inputs((1, 8, 8), n=10)).shape == (10, 2, 8, 8)
    with pytest.raises(ConfigError, match=r"running 11 inputs at once needs about .*; run at most 10 at a time"):
        small.run(inputs((1, 8, 8), n=11))
    assert small.fitting_batch(256) == 10 and small.fitting_batch(4) == 4
    small.check_memory = False  # the caller knows better
    assert small.run(inputs((1, 8, 8), n=11)).shape == (11, 2, 8, 8)
    small.check_memory = True
    monkeypatch.setattr(_io, "free_memory", lambda: None)  # not known: run
    assert small.run(inputs((1, 8, 8), n=11)).shape == (11, 2, 8, 8)
    assert small.fitting_batch(256) == 256


# ---------------------------------------------------------------------- interface and errors


def test_input_validation():
    rt = Runtime.load(GOLDEN / "conv.tern")
    assert rt.input_shape == (1, 8, 8)
    cases = [
        (np.zeros((2, 1, 8, 8)), r"^input dtype must be float32, got float64"),
        (np.zeros((2, 64), np.float32), r"^input shape must be \(N, 1, 8, 8\), got \(2, 64\)$"),
        (np.zeros((2, 1, 8, 9), np.float32), r"^input shape must be \(N, 1, 8, 8\), got \(2, 1, 8, 9\)$"),
        ([[0.0]], r"^input must be a float32 numpy array of shape \(N, 1, 8, 8\), got list$"),
    ]
    for x, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            rt.run(x)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="batch must be a positive integer"):
        rt.predict(np.zeros((1, 1, 8, 8), np.float32), batch=0)
    with pytest.raises(ConfigError, match="got 2 inputs but 3 labels"):
        rt.accuracy(np.zeros((2, 1, 8, 8), np.float32), [0, 1, 2])
    classes = rt.shapes[rt.graph.outputs[0]][1]
    x = np.zeros((3, 1, 8, 8), np.float32)
    for labels in ([0, 1, classes], [0, -1, 2], [0.0, 1.0, 2.0]):
        with pytest.raises(ConfigError, match=f"labels must be class indices from 0 to {classes - 1}"):
            rt.accuracy(x, labels)
    assert 0 <= rt.accuracy(x, [0, 1, classes - 1]) <= 1
    calls = []
    labels = rt.predict(np.zeros((10, 1, 8, 8), np.float32), batch=4, progress=lambda *a: calls.append(a))
    assert calls == [(4, 10), (8, 10), (10, 10)] and labels.shape == (10,)


def test_malformed_file(tmp_path):
    data_ = (GOLDEN / "mixed.tern").read_bytes()
    (tmp_path / "bad.tern").write_bytes(data_[:-1])
    with pytest.raises(TernFormatError, match="bad.tern"):
        Runtime.load(tmp_path / "bad.tern")


def test_golden_files_and_batches():
    sys.path.insert(0, str(Path(__file__).parent))
    import ir_torch

    for name in ("tiny", "mixed", "conv", "no_weights"):
        rt = Runtime.load(GOLDEN / f"{name}.tern")
        x = inputs(rt.input_shape, n=9, seed=8)
        ref = ir_torch.run(tern.read(GOLDEN / f"{name}.tern"), x)
        assert_close(rt.run(x), ref, 1e-5)
        assert_close(rt.run(x[::-2]), ref[::-2], 1e-5)  # a non-contiguous batch
        assert rt.run(x[:0]).shape == (0, *ref.shape[1:])
        assert np.array_equal(rt.predict(x, batch=4), ref.reshape(9, -1).argmax(1))


_NO_TORCH = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")

    sys.meta_path.insert(0, Block())
    import numpy as np
    from ternarize.runtime import Runtime

    out = {}
    for name in ("mixed", "conv"):
        rt = Runtime.load(sys.argv[1] + f"/{name}.tern")
        x = np.linspace(-2, 2, 3 * int(np.prod(rt.input_shape)), dtype=np.float32).reshape(3, *rt.input_shape)
        out[name] = rt.run(x).tolist()
        # the rest of the API too: sizes, memory estimates, batched prediction and accuracy
        assert rt.weight_bytes > 0 and rt.memory_bytes(2) >= rt.activation_bytes(2) > 0
        assert rt.fitting_batch(1 << 30) >= 1 and repr(rt)
        assert 0 <= rt.accuracy(x, rt.predict(x, batch=2)) == 1.0
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    print(json.dumps(out))
""")


def test_numpy_only_subprocess():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(GOLDEN)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for name in ("mixed", "conv"):
        rt = Runtime.load(GOLDEN / f"{name}.tern")
        x = np.linspace(-2, 2, 3 * int(np.prod(rt.input_shape)), dtype=np.float32).reshape(3, *rt.input_shape)
        assert np.array_equal(np.asarray(got[name], np.float32), rt.run(x))


_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import ternarize.runtime as runtime
    runtime._settled = sys.argv[2] == "unsettled"  # the control: skip the settling
    rt = runtime.Runtime.load(sys.argv[1])
    x = np.random.default_rng(0).standard_normal((4, *rt.input_shape)).astype(np.float32)
    for _ in range(3):
        rt.run(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        rt.run(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's dynamic mmap threshold")
def test_runs_reuse_heap_pages(tmp_path):
    """After load, repeated runs fault in no new pages: their temporaries (im2col patches of 1.8 MiB
    here, at batch 4) come from the heap. The control, without the settling, shows that they would
    (about 10,000 faults in 10 runs)."""
    torch.manual_seed(0)
    model = zoo.create("vgg", in_shape=(1, 28, 28), width=0.125)
    compile_model(model, (1, 28, 28), project(model, "ternary", density=0.05), tmp_path / "m.tern")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def faults(mode):
        proc = subprocess.run([sys.executable, "-c", _FAULTS, str(tmp_path / "m.tern"), mode],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    control = faults("unsettled")
    if control < 50:
        pytest.skip(f"this allocator reuses pages on its own ({control} faults in 10 runs)")
    assert faults("settled") <= 5, control


@pytest.mark.parametrize("budget", [1.0, 1.2])
def test_t2_codes_that_free_memory_are_taken_within_any_budget(tmp_path, budget):
    """A small weight at 99 % non-zero: its stream and the stream's block table take more than its t2
    codes would, so even a budget of 1.0 holds it as t2."""
    from ternarize import lower, tern

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 3, bias=False))
    with torch.no_grad():
        w = torch.sign(torch.randn(3, 300))
        w[0, 0] = 0
        model[0].weight.copy_(0.5 * w)
    tern.write(lower(model, torch.zeros(1, 300), {"0.weight": "ternary"}), tmp_path / "m.tern",
               encodings={"0.weight": "ts"})
    rt = Runtime.load(tmp_path / "m.tern", budget=budget)
    stream = Runtime.load(tmp_path / "m.tern", sparse="stream")
    assert rt.forms == {"0.weight": "t2"} and rt.weight_bytes < stream.weight_bytes
    assert rt.weight_bytes <= budget * rt.encoded_bytes
    x = inputs((300,), n=4)
    assert_close(rt.run(x), torch_out(model, x))


def test_t2_codes_that_free_memory_are_taken_where_the_streams_pass_the_budget(tmp_path):
    """Convolutions at 99 % non-zero with their scales and shifts: the streams' block tables alone
    pass a budget of 1.0, and t2 codes, smaller than the streams, are still taken."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    discrete = project(model, "ternary", density=0.99)
    path = tmp_path / "m.tern"
    compile_model(model, (2, 8, 8), discrete, path, encodings={n: "ts" for n in discrete})
    stream = Runtime.load(path, sparse="stream")
    assert stream.weight_bytes > stream.encoded_bytes
    rt = Runtime.load(path, budget=1.0)
    assert set(rt.forms.values()) == {"t2"} and rt.weight_bytes < stream.weight_bytes
    x = inputs((2, 8, 8), n=3)
    assert_close(rt.run(x), torch_out(model.eval(), x))
