"""ONNX export: every zoo model agrees with torch through onnxruntime; every op; exact packings."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from ir_torch import run as ir_run
from onnx import TensorProto

from ternarize import graph as graph_mod
from ternarize import lower, zoo
from ternarize import onnx as tonnx
from ternarize.errors import ExportError, OutputError
from ternarize.graph import Const, Graph, Node, Value

TOL = 1e-5  # of max |reference|


# ---------------------------------------------------------------------- helpers


def project(model: torch.nn.Module, kind: str = "ternary", seed: int = 0, keep_float=(), density=None):
    """W = s_c·θ with random θ and s_c > 0 for every Linear/Conv2d not in ``keep_float``; random
    BatchNorm statistics with negative γ. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, m in model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and path not in keep_float:
                w = m.weight
                if kind == "ternary":
                    theta = torch.randint(-1, 2, w.shape, generator=g).float()
                    if density is not None:
                        sign = torch.randint(0, 2, w.shape, generator=g).float() * 2 - 1
                        theta = sign * (torch.rand(w.shape, generator=g) < density).float()
                else:
                    theta = torch.randint(0, 2, w.shape, generator=g).float() * 2 - 1
                scale = torch.rand(w.shape[0], generator=g) + 0.5
                w.copy_(theta * scale.reshape(-1, *[1] * (w.dim() - 1)))
            elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))  # about half negative
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def agree(model, shape, path, **opts):
    """Export ``model`` and assert onnxruntime matches torch on 100 random inputs; return the info."""
    x = torch.randn(100, *shape, generator=torch.Generator().manual_seed(1))
    graph = lower(model, x[:1])
    info = tonnx.export(graph, path, **opts)
    with torch.no_grad():
        ref = model(x).numpy()
    y = tonnx.run(path, x.numpy())
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() <= TOL * np.abs(ref).max()
    return info


def make_graph(in_shape, nodes, consts, out="output", metadata=None) -> Graph:
    g = Graph([Value("input", (None, *in_shape))], [out], nodes, consts, dict(metadata or {}))
    g.validate()
    return g


def agree_ir(graph: Graph, path, n=20, seed=0, **opts):
    """Export a hand-built graph and compare onnxruntime with the torch interpreter of the IR."""
    x = np.random.default_rng(seed).standard_normal((n, *graph.inputs[0].shape[1:])).astype(np.float32)
    tonnx.export(graph, path, **opts)
    ref = ir_run(graph, x)
    y = tonnx.run(path, x)
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() <= TOL * np.abs(ref).max()


def rand_codes(shape, kind="ternary", seed=0):
    rng = np.random.default_rng(seed)
    if kind == "ternary":
        return rng.integers(-1, 2, shape).astype(np.int8)
    return (rng.integers(0, 2, shape) * 2 - 1).astype(np.int8)


def linear_graph(theta, kind="ternary", bias=True, seed=0) -> Graph:
    rng = np.random.default_rng(seed)
    o, k = theta.shape
    consts = {"w": Const(kind, theta), "s": Const("float32", rng.uniform(0.5, 2, o))}
    if bias:
        consts["b"] = Const("float32", rng.standard_normal(o))
    inputs = ["input", "w", "s"] + (["b"] if bias else [])
    return make_graph((k,), [Node("linear", "fc", inputs, ["output"])], consts)


# ---------------------------------------------------------------------- zoo models vs torch


ZOO = [("mlp", {"width": 32}), ("vgg", {"width": 0.125}), ("lenet", {}), ("resnet", {"width": 8})]
SHAPES = [(1, 28, 28), (3, 32, 32)]
CASES = [(name, kw, shape, "ternary") for name, kw in ZOO for shape in SHAPES]
CASES += [(name, kw, shape, "binary") for name, kw in ZOO if name in ("mlp", "lenet") for shape in SHAPES]


@pytest.mark.parametrize("name,kw,shape,kind", CASES, ids=[f"{c[0]}-{c[2][0]}x{c[2][1]}-{c[3]}" for c in CASES])
def test_zoo_model_agrees_with_torch(name, kw, shape, kind, tmp_path):
    model = project(zoo.create(name, in_shape=shape, **kw), kind)
    info = agree(model, shape, tmp_path / "m.onnx")
    assert info.opset == 25 and info.ir_version == 13
    assert info.encodings and set(info.encodings.values()) <= {"int2", "bits"}
    if kind == "binary":
        assert info.nonzero == 1.0


def test_mixed_float_and_discrete_layers(tmp_path):
    model = project(zoo.create("lenet", in_shape=(1, 28, 28)), keep_float=("0", "15"))
    info = agree(model, (1, 28, 28), tmp_path / "m.onnx")
    assert set(info.encodings) == {"4.weight", "9.weight", "12.weight"}
    kinds = {t.name: t.data_type for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert kinds["0.weight"] == TensorProto.FLOAT and kinds["4.weight"] == TensorProto.INT2


@pytest.mark.parametrize("name,kw,kind", [("lenet", {}, "ternary"), ("mlp", {"width": 32}, "binary"),
                                          ("resnet", {"width": 8}, "ternary")])
def test_compat_mode_uses_int8_at_opset_21(name, kw, kind, tmp_path):
    model = project(zoo.create(name, in_shape=(3, 32, 32), **kw), kind)
    info = agree(model, (3, 32, 32), tmp_path / "m.onnx", compat=True, binary="dense")
    m = onnx.load(tmp_path / "m.onnx")
    assert (m.opset_import[0].version, m.ir_version) == (21, 10) == (info.opset, info.ir_version)
    types = {t.data_type for t in m.graph.initializer}
    assert TensorProto.INT2 not in types and TensorProto.INT8 in types
    assert set(info.encodings.values()) == {"int8"}


def test_compact_option_is_smaller_and_exact(tmp_path):
    shape = (1, 28, 28)
    model = project(zoo.create("mlp", in_shape=shape, width=256), density=0.05)
    dense = agree(model, shape, tmp_path / "dense.onnx")
    sparse = agree(model, shape, tmp_path / "sparse.onnx", compact=True)
    assert set(sparse.encodings.values()) == {"sparse"}
    assert sparse.size < 0.45 * dense.size
    model = project(zoo.create("mlp", in_shape=shape, width=256))  # 2/3 non-zero: base-3 wins
    base3 = agree(model, shape, tmp_path / "base3.onnx", compact=True)
    assert set(base3.encodings.values()) == {"base3"}
    assert base3.size < 0.9 * dense.size  # weights 0.8, plus float scales and biases
    vgg = project(zoo.create("vgg", in_shape=shape, width=0.125), density=0.05)
    info = agree(vgg, shape, tmp_path / "vgg.onnx", compact=True, compat=True)
    assert set(info.encodings.values()) == {"sparse"}


# ---------------------------------------------------------------------- packings, exactly


def test_int2_initializer_bytes_are_the_onnx_packing(tmp_path):
    theta = np.array([[1, 0, -1], [-1, 1, 0]], np.int8)  # rows of 3: the second row starts mid-byte
    tonnx.export(linear_graph(theta), tmp_path / "m.onnx")
    init = {t.name: t for t in onnx.load(tmp_path / "m.onnx").graph.initializer}["w"]
    assert init.data_type == TensorProto.INT2 and list(init.dims) == [2, 3]
    assert init.raw_data == bytes.fromhex("f101")  # 01 00 11 11 | 01 00 (low bits first)
    assert onnx.numpy_helper.to_array(init).tolist() == theta.tolist()


def test_packing_functions_pinned():
    assert tonnx.int2_bytes(np.array([1, -1, 0, 0, -1], np.int8)).hex() == "0d03"
    assert tonnx.bit_bytes(np.array([[1, -1, 1], [1, 1, -1]], np.int8)).hex() == "1d"
    assert tonnx.base3_bytes(np.array([[1, -1, 0], [0, 1, -1]], np.int8)).hex() == "5802"  # 1+2·3+1·81, 2
    assert tonnx.sparse_codes(np.array([0, 0, 1, -1, 0], np.int8)).tolist() == [5, 2]
    assert tonnx.sparse_codes(np.zeros(5, np.int8)).tolist() == [255]
    gap = np.zeros(400, np.int8)
    gap[[0, 127, 128, 399]] = [-1, 1, -1, 1]  # gaps 1, 127, 1, 271 = 127 + 127 + 17
    assert tonnx.sparse_codes(gap).tolist() == [2, 253, 2, 0, 0, 33]


@pytest.mark.parametrize("density", [0.0, 0.002, 0.05, 0.5, 1.0])
def test_sparse_and_table_packings_round_trip(density):
    rng = np.random.default_rng(3)
    theta = (np.sign(rng.standard_normal(5003)) * (rng.random(5003) < density)).astype(np.int8)
    assert np.array_equal(tonnx.sparse_decode(tonnx.sparse_codes(theta), theta.size), theta)
    packed = np.frombuffer(tonnx.base3_bytes(theta), np.uint8)  # what the graph's Gather computes
    assert packed.max() < 243 and np.array_equal(tonnx.BASE3_TABLE[packed].ravel()[:theta.size], theta)
    signs = np.where(theta < 0, -1, 1).astype(np.int8)
    packed = np.frombuffer(tonnx.bit_bytes(signs), np.uint8)
    assert np.array_equal(tonnx.BITS_TABLE[packed].ravel()[:theta.size], signs)


@pytest.mark.parametrize("kind,k,opts,encoding", [
    ("binary", 301, {}, "bits"),              # 81·301 weights: not a multiple of 8, Slice drops the padding
    ("binary", 304, {}, "bits"),
    ("ternary", 301, {"compact": True}, "sparse"),
    ("ternary", 602, {"compact": True}, "base3"),  # 81·602 = 5·9752 + 2
    ("binary", 301, {"binary": "dense", "compact": True}, "int2"),
    ("ternary", 301, {}, "int2"),
    ("ternary", 301, {"compat": True}, "int8"),
])
def test_decoded_weights_are_exact_in_onnxruntime(kind, k, opts, encoding, tmp_path):
    """Feeding the identity matrix reads the dequantized weight back: θ·s exactly, in both sessions."""
    theta = rand_codes((81, k), kind, seed=k)
    if encoding == "sparse":
        theta[:, : k - 3] = 0  # long gaps, escapes included
    graph = linear_graph(theta, kind, bias=False)
    info = tonnx.export(graph, tmp_path / "m.onnx", **opts)
    assert info.encodings == {"w": encoding}
    eye = np.eye(k, dtype=np.float32)
    expect = (theta.astype(np.float32) * graph.consts["s"].data[:, None]).T
    assert np.array_equal(tonnx.run(tmp_path / "m.onnx", eye), expect)
    plain = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(tonnx.run(plain, eye), expect)
    raw = {t.name: t.raw_data for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    packer = {"bits": tonnx.bit_bytes, "base3": tonnx.base3_bytes, "int2": tonnx.int2_bytes}.get(encoding)
    if packer is not None:
        assert raw["w" if encoding == "int2" else f"w/{encoding}"] == packer(theta)


def test_session_folds_decoding_into_fp32_weights(tmp_path):
    """With the session's settings, onnxruntime leaves no DequantizeLinear or decode node behind."""
    theta = rand_codes((64, 401), "binary")
    tern = rand_codes((256, 64), "ternary") * (np.random.default_rng(0).random((256, 64)) < 0.05)
    rng = np.random.default_rng(1)
    consts = {"w1": Const("binary", theta), "s1": Const("float32", rng.uniform(0.5, 2, 64)),
              "w2": Const("ternary", tern), "s2": Const("float32", rng.uniform(0.5, 2, 256))}
    nodes = [Node("linear", "fc1", ["input", "w1", "s1"], ["h"]), Node("linear", "fc2", ["h", "w2", "s2"], ["output"])]
    info = tonnx.export(make_graph((401,), nodes, consts), tmp_path / "m.onnx", compact=True)
    assert info.encodings == {"w1": "bits", "w2": "sparse"}
    so = tonnx._options(threads=1)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # serializable level
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(tmp_path / "opt.onnx")
    assert [n.op_type for n in opt.graph.node] == ["Gemm", "Gemm"]
    assert {t.data_type for t in opt.graph.initializer} == {TensorProto.FLOAT}


def test_float_constants_exact_in_binary16_are_stored_as_float16_and_folded_at_load(tmp_path):
    """After compress --float16 every scale and bias is a binary16 value: the file stores them in
    float16 with a Cast (lossless), which onnxruntime folds into float32 initializers at load."""
    from ternarize import tern as ttern
    from ternarize.pipeline import halved
    from ternarize.runtime import Runtime

    rng = np.random.default_rng(3)
    tern_codes = rand_codes((256, 64), "ternary")
    consts = {"w1": Const("ternary", tern_codes), "s1": Const("float32", rng.uniform(0.5, 2, 256)),
              "b1": Const("float32", rng.standard_normal(256)),
              "w2": Const("float32", rng.standard_normal((10, 256))), "b2": Const("float32", rng.standard_normal(10))}
    nodes = [Node("linear", "fc1", ["input", "w1", "s1", "b1"], ["h"]), Node("relu", "r", ["h"], ["a"]),
             Node("linear", "fc2", ["a", "w2", "", "b2"], ["output"])]
    full = make_graph((64,), nodes, consts)
    tonnx.export(full, tmp_path / "full.onnx")
    assert "Cast" not in [n.op_type for n in onnx.load(tmp_path / "full.onnx").graph.node]  # not binary16 values
    half = halved(full)
    tonnx.export(half, tmp_path / "half.onnx")
    m = onnx.load(tmp_path / "half.onnx")
    kinds = {t.name: t.data_type for t in m.graph.initializer}
    assert {k: kinds[k] for k in ("s1/f16", "b1/f16", "w2/f16", "b2")} == {
        "s1/f16": TensorProto.FLOAT16, "b1/f16": TensorProto.FLOAT16, "w2/f16": TensorProto.FLOAT16,
        "b2": TensorProto.FLOAT}  # b2 has 10 values: a Cast would cost what it saves
    assert [n.op_type for n in m.graph.node].count("Cast") == 3
    saved = (tmp_path / "full.onnx").stat().st_size - (tmp_path / "half.onnx").stat().st_size
    assert 2 * (256 + 256 + 2560) - 3 * 100 < saved < 2 * (256 + 256 + 2560), saved  # a Cast and a name: < 100 B
    ttern.write(half, tmp_path / "half.tern", allow_lossy=True)
    x = rng.standard_normal((50, 64)).astype(np.float32)
    want = Runtime.load(tmp_path / "half.tern").run(x)
    got = tonnx.run(tonnx.session(tmp_path / "half.onnx"), x)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    so = tonnx._options(threads=1)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "half.onnx"), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(tmp_path / "opt.onnx")
    assert "Cast" not in [n.op_type for n in opt.graph.node]
    assert {t.data_type for t in opt.graph.initializer} == {TensorProto.FLOAT}


def test_batchnorm_channel_constants_are_stored_as_float16_too(tmp_path):
    """A BatchNorm not folded into a convolution (channel_affine on 4-D activations) has its own
    reshaped constants: after halved() those of 64 values or more are float16 as well."""
    from ternarize.pipeline import halved

    model = project(zoo.create("vgg", in_shape=(1, 28, 28), width=0.5))
    graph = halved(lower(model, torch.zeros(1, 1, 28, 28)))
    affine = [n for n in graph.nodes if n.op == "channel_affine"]
    assert affine and any(graph.consts[n.inputs[1]].data.size >= 64 for n in affine)
    tonnx.export(graph, tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    wide = [t.name for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 64]
    assert wide == [], wide
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    want = ir_run(graph, x)
    got = tonnx.run(tonnx.session(tmp_path / "m.onnx"), x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_classifier_head_regression_no_matmul_and_default_session_exact(tmp_path):
    """onnxruntime 1.32 rewrites INT2 DequantizeLinear → MatMul into MatMulNBits, O(1) wrong when
    N % 4 != 0 (N = 10 here). The exporter emits Gemm, which even a default session runs exactly."""
    model = project(zoo.create("mlp", in_shape=(1, 28, 28), width=64, depth=1))
    info = agree(model, (1, 28, 28), tmp_path / "m.onnx", binary="dense")
    assert set(info.encodings.values()) == {"int2"}
    m = onnx.load(tmp_path / "m.onnx")
    ops = [n.op_type for n in m.graph.node]
    assert "MatMul" not in ops and ops.count("Gemm") == 2
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10
    x = torch.randn(100, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x).numpy()
    plain = ort.InferenceSession(str(tmp_path / "m.onnx"))  # no special configuration at all
    y = plain.run(None, {"input": x.numpy()})[0]
    assert np.abs(y - ref).max() <= TOL * np.abs(ref).max()


# ---------------------------------------------------------------------- the file


def test_checker_metadata_names_and_dynamic_batch(tmp_path):
    model = project(zoo.create("lenet", in_shape=(1, 28, 28)))
    graph = lower(model, torch.zeros(1, 1, 28, 28))
    graph.metadata.update(source_sha256="ab" * 32, epochs=3)
    info = tonnx.export(graph, tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(m, full_check=True)
    assert m.producer_name == "ternarize" and m.producer_version == tonnx.__version__
    props = {p.key: json.loads(p.value) for p in m.metadata_props}
    assert props["producer"] == f"ternarize {tonnx.__version__}"
    assert props["source_sha256"] == "ab" * 32 and props["epochs"] == 3
    assert props["sparsity"] == pytest.approx(info.nonzero) and 0.5 < info.nonzero < 0.8
    (inp,), (out,) = m.graph.input, m.graph.output
    assert (inp.name, out.name) == ("input", "output")
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 1, 28, 28]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 10]
    assert info.size == os.path.getsize(tmp_path / "m.onnx")


def test_export_is_deterministic(tmp_path):
    model = project(zoo.create("resnet", in_shape=(3, 32, 32), width=8), "binary")
    paths = []
    for i in range(2):
        graph = lower(model, torch.zeros(1, 3, 32, 32))  # lowered afresh each time
        tonnx.export(graph, tmp_path / f"m{i}.onnx", compact=True)
        paths.append(tmp_path / f"m{i}.onnx")
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_write_is_atomic(tmp_path, monkeypatch):
    theta = rand_codes((4, 8))
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken)
    with pytest.raises(OutputError, match="m.onnx: disk full"):
        tonnx.export(linear_graph(theta), target)
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.onnx"]
    monkeypatch.undo()
    with pytest.raises(ExportError):
        tonnx.export(linear_graph(theta), tmp_path / "new.onnx", binary="nope")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_a_model_over_protobufs_limit_is_refused_before_it_is_built(tmp_path, monkeypatch):
    theta = rand_codes((64, 64))  # 4096 codes: 1024 bytes as INT2, 4096 as int8, plus 512 of scale and bias
    built = []
    monkeypatch.setattr(tonnx._Builder, "build", lambda self: built.append(1))
    monkeypatch.setattr(tonnx, "MAX_PROTO", 4096)
    runs = r"; the \.tern file holds the model, and ternarize run runs it$"
    with pytest.raises(ExportError, match=r"constants would take 4608 bytes, over protobuf's 2 GiB limit; "
                                          r"without --compat its ternary codes take 2 bits each instead of 8" + runs):
        tonnx.export(linear_graph(theta), tmp_path / "m.onnx", compat=True)
    monkeypatch.setattr(tonnx, "MAX_PROTO", 1024)
    with pytest.raises(ExportError, match=r"constants would take 1536 bytes, .*limit; --compact may store it in "
                                          r"fewer bytes" + runs):
        tonnx.export(linear_graph(theta), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"constants would take 1536 bytes, over protobuf's 2 GiB limit" + runs):
        tonnx.export(linear_graph(theta), tmp_path / "m.onnx", compact=True)
    assert not built and not os.listdir(tmp_path)


def test_a_model_protobuf_cannot_serialize_is_one_error_and_no_file(tmp_path, monkeypatch):
    def refuse(self, **kw):
        raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")

    monkeypatch.setattr(tonnx, "_check", lambda *args: None)  # onnx.checker serializes the model too
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", refuse)
    with pytest.raises(ExportError, match=r"^protobuf cannot serialize the ONNX model \(ValueError: Message onnx"):
        tonnx.export(linear_graph(rand_codes((4, 8))), tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)


def test_unexpressible_nodes_raise_export_error(tmp_path, monkeypatch):
    g = make_graph((4,), [Node("leaky_relu", "act", ["input"], ["output"], {"alpha": 1e39})], {})
    with pytest.raises(ExportError, match=r"'act' \(leaky_relu\).*alpha"):
        tonnx.export(g, tmp_path / "m.onnx")
    # an op the IR gains later but the exporter does not know
    monkeypatch.setitem(graph_mod.OPS, "gelu", graph_mod.OpSpec({}, graph_mod._infer_unary))
    g = make_graph((4,), [Node("gelu", "act2", ["input"], ["output"])], {})
    with pytest.raises(ExportError, match=r"'act2'.*'gelu'"):
        tonnx.export(g, tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------- hand-built graphs, every op


def _conv(name, x, out, cin, cout, k, groups=1, dil=1, pad=1, stride=1, kind="ternary", seed=0):
    rng = np.random.default_rng(seed)
    w = rand_codes((cout, cin // groups, k, k), kind, seed) if kind != "float32" else rng.standard_normal(
        (cout, cin // groups, k, k))
    consts = {f"{name}.w": Const(kind, w), f"{name}.s": Const("float32", rng.uniform(0.5, 2, cout)),
              f"{name}.b": Const("float32", rng.standard_normal(cout))}
    node = Node("conv2d", name, [x, f"{name}.w", f"{name}.s", f"{name}.b"], [out],
                {"strides": [stride, stride], "pads": [pad, pad], "dilations": [dil, dil], "groups": groups})
    return node, consts


def _affine(name, x, out, c, seed=0):
    rng = np.random.default_rng(seed)
    consts = {f"{name}.m": Const("float32", rng.standard_normal(c)), f"{name}.t": Const("float32",
                                                                                       rng.standard_normal(c))}
    return Node("channel_affine", name, [x, f"{name}.m", f"{name}.t"], [out]), consts


def _pool(op, x, out, k, s, p, ceil, **extra):
    attrs = {"kernel": [k, k], "strides": [s, s], "pads": [p, p], "ceil_mode": ceil, **extra}
    return Node(op, f"{op}:{out}", [x], [out], attrs)


def test_conv_grouped_dilated_strided_and_affine_4d(tmp_path):
    c1, k1 = _conv("c1", "input", "a", 6, 12, 3, groups=3, dil=2, pad=2)
    c2, k2 = _conv("c2", "a", "b", 12, 12, 3, groups=12, stride=2, kind="binary", seed=1)
    c3, k3 = _conv("c3", "b", "c", 12, 8, 1, pad=0, kind="float32", seed=2)
    aff, k4 = _affine("bn", "c", "output", 8)
    agree_ir(make_graph((6, 11, 13), [c1, c2, c3, aff], {**k1, **k2, **k3, **k4}), tmp_path / "m.onnx")


def test_activations_affine_2d_softmaxes(tmp_path):
    aff, consts = _affine("bn", "input", "a", 7)
    nodes = [aff,
             Node("leaky_relu", "lr", ["a"], ["b"], {"alpha": 0.1}),
             Node("hardtanh", "ht", ["b"], ["c"], {"min_val": -0.5, "max_val": 0.75}),
             Node("relu", "r", ["a"], ["d"]),
             Node("add", "sum", ["c", "d"], ["e"]),
             Node("softmax", "sm", ["e"], ["f"], {"axis": 1}),
             Node("log_softmax", "lsm", ["a"], ["g"], {"axis": 1}),
             Node("concat", "cat", ["f", "g", "a"], ["output"], {"axis": 1})]
    agree_ir(make_graph((7,), nodes, consts), tmp_path / "m.onnx")


@pytest.mark.parametrize("count_include_pad", [False, True])
def test_pools_ceil_mode_reshape_softmax_axes(count_include_pad, tmp_path):
    nodes = [_pool("avgpool2d", "input", "a", 3, 2, 1, True, count_include_pad=count_include_pad),   # 7x8 -> 4x5
             _pool("maxpool2d", "a", "b", 2, 2, 1, True, dilations=[1, 1]),
             Node("reshape", "rs", ["b"], ["c"], {"shape": [1, 9, -1]}),  # (3, 3, 3) -> (1, 9, 3)
             Node("softmax", "sm", ["c"], ["d"], {"axis": 2}),
             Node("log_softmax", "lsm", ["d"], ["e"], {"axis": 3}),
             Node("flatten", "fl", ["e"], ["output"])]
    agree_ir(make_graph((3, 7, 8), nodes, {}), tmp_path / "m.onnx")


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("op, k, s, p, shape, extra", [
    ("maxpool2d", 3, 2, 0, (2, 2, 2), {"dilations": [1, 1]}),
    ("avgpool2d", 4, 2, 1, (2, 1, 5), {"count_include_pad": False}),
    ("avgpool2d", 3, 3, 0, (2, 2, 7), {"count_include_pad": True}),
    # a last window that would start in the right padding: torch drops it, opset 21's size rule keeps it
    ("maxpool2d", 1, 3, 0, (2, 2, 6), {"dilations": [1, 1]}),
    ("avgpool2d", 1, 2, 0, (2, 4, 4), {"count_include_pad": True}),
    ("avgpool2d", 3, 2, 1, (2, 4, 5), {"count_include_pad": False}),
])
def test_ceil_mode_pools_at_the_edges_of_the_input(op, k, s, p, shape, extra, compat, tmp_path):
    nodes = [_pool(op, "input", "a", k, s, p, True, **extra), Node("flatten", "fl", ["a"], ["output"])]
    agree_ir(make_graph(shape, nodes, {}), tmp_path / "m.onnx", compat=compat)


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("op, extra", [("avgpool2d", {"count_include_pad": True}),
                                       ("avgpool2d", {"count_include_pad": False}),
                                       ("maxpool2d", {"dilations": [1, 1]})])
def test_ceil_mode_pool_on_one_pixel_before_a_padded_strided_conv(op, extra, compat, tmp_path):
    """The window opset 21 keeps and torch drops, on a 1x1 map; a padded stride-3 convolution makes
    the next output 2x2. Computing that window and slicing it off made onnxruntime's buffer re-use
    fail ("Shape mismatch attempting to re-use buffer"); a floor-mode pool over explicit padding
    has one size under every rule."""
    c1, k1 = _conv("c1", "a", "b", 4, 4, 1, pad=2, stride=3)
    nodes = [_pool(op, "input", "a", 2, 2, 1, True, **extra), c1, Node("flatten", "fl", ["b"], ["output"])]
    g = make_graph((4, 1, 1), nodes, k1)
    agree_ir(g, tmp_path / "m.onnx", compat=compat)
    ops = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    assert "Slice" not in ops and ("Pad" in ops) == (compat and extra.get("count_include_pad", True))


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("ceil", [False, True])
def test_maxpool_window_wholly_in_the_padding_is_minus_inf(ceil, compat, tmp_path):
    """A 2x2 kernel at dilation 2 and padding 1 over a 1-pixel-wide input: windows that hold no input
    are −inf in torch; onnxruntime's max starts at float32's lowest finite value, so the export puts
    −inf there itself (and only there)."""
    nodes = [Node("maxpool2d", "mp", ["input"], ["a"], {"kernel": [2, 2], "strides": [1, 2], "pads": [1, 1],
                                                        "dilations": [2, 2], "ceil_mode": ceil}),  # all −inf
             _pool("maxpool2d", "input", "b", 1, 1, 0, ceil, dilations=[1, 1]),                       # x itself
             Node("concat", "cat", ["a", "b"], ["c"], {"axis": 1}),
             Node("flatten", "fl", ["c"], ["output"])]
    g = make_graph((2, 5, 1), nodes, {})
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 1)).astype(np.float32)
    tonnx.export(g, tmp_path / "m.onnx", compat=compat)
    ref, y = ir_run(g, x), tonnx.run(tmp_path / "m.onnx", x)
    assert np.isneginf(ref).any() and np.isfinite(ref).any()
    np.testing.assert_array_equal(y, ref)
    assert [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node].count("Where") == 1


def test_maxpool_dilated_global_avgpool_and_concat_channels(tmp_path):
    c1, k1 = _conv("c1", "input", "a", 2, 4, 3)
    nodes = [c1,
             _pool("maxpool2d", "a", "b", 3, 2, 1, True, dilations=[2, 2]),
             _pool("maxpool2d", "a", "c", 3, 2, 0, True, dilations=[1, 1]),
             Node("concat", "cat", ["b", "c"], ["d"], {"axis": 1}),
             Node("global_avgpool", "gap", ["d"], ["output"])]
    agree_ir(make_graph((2, 9, 10), nodes, k1), tmp_path / "m.onnx")


@pytest.mark.parametrize("opts", [{}, {"compact": True}])
def test_linear_shared_weight_float_with_scale_and_no_scale(opts, tmp_path):
    rng = np.random.default_rng(0)
    codes = rand_codes((128, 128)) * (rng.random((128, 128)) < 0.03)  # large and sparse enough for compact
    consts = {"w": Const("ternary", codes), "s": Const("float32", rng.uniform(0.5, 2, 128)),
              "f": Const("float32", rng.standard_normal((6, 128))), "fs": Const("float32", rng.uniform(0.5, 2, 6))}
    nodes = [Node("linear", "l1", ["input", "w", "s"], ["a"]),
             Node("linear", "l2", ["a", "w"], ["b"]),            # same codes, no scale: scale 1
             Node("linear", "l3", ["b", "w", "s"], ["c"]),       # same codes and scale: one DequantizeLinear
             Node("linear", "l4", ["c", "f", "fs"], ["output"])]  # float weight with a separate scale
    g = make_graph((128,), nodes, consts)
    agree_ir(g, tmp_path / "m.onnx", **opts)
    assert tonnx.export(g, tmp_path / "m.onnx", **opts).encodings == {"w": "sparse" if opts else "int2"}
    ops = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    assert ops.count("DequantizeLinear") == 2 and ops.count("Gemm") == 4


def test_asymmetric_kernels_pads_strides_dilations(tmp_path):
    """Height and width attributes differ everywhere, so a swapped pair would show."""
    rng = np.random.default_rng(4)
    consts = {"w": Const("ternary", rand_codes((5, 3, 3, 2))), "s": Const("float32", rng.uniform(0.5, 2, 5))}
    nodes = [Node("conv2d", "conv", ["input", "w", "s"], ["a"],
                  {"strides": [1, 2], "pads": [2, 1], "dilations": [2, 1], "groups": 1}),
             Node("maxpool2d", "mp", ["a"], ["b"], {"kernel": [3, 2], "strides": [2, 1], "pads": [1, 0],
                                                    "dilations": [1, 2], "ceil_mode": False}),
             Node("avgpool2d", "ap", ["b"], ["output"], {"kernel": [1, 3], "strides": [1, 2], "pads": [0, 1],
                                                         "ceil_mode": True, "count_include_pad": True})]
    agree_ir(make_graph((3, 12, 15), nodes, consts), tmp_path / "m.onnx")
