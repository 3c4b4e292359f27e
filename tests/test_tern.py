"""The .tern file: golden bytes, round trips, determinism, atomic writes, verify, numpy-only imports."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from ternarize import pack, tern
from ternarize.errors import ConfigError, GraphError, OutputError, TernFormatError
from ternarize.graph import Const, Graph, Node, Value

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "formats" / "golden"
SPEC = ROOT / "formats" / "TERN.md"


def _make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _make_golden()


def assert_same_graph(got: Graph, want: Graph, lossy: set[str] = frozenset()):
    assert got.to_json() == want.to_json()
    assert set(got.consts) == set(want.consts)
    for name, c in want.consts.items():
        assert got.consts[name].kind == c.kind
        expect = c.data.astype(np.float16).astype(np.float32) if name in lossy else c.data
        np.testing.assert_array_equal(got.consts[name].data, expect)


def mlp(seed: int = 0, sizes=(20, 16, 8), nonzero: float = 0.05) -> Graph:
    """An MLP whose first layer is sparse ternary, second binary, with scales and a bias."""
    rng = np.random.default_rng(seed)
    a, b, c = sizes
    w1 = np.where(rng.random((b, a)) < nonzero, rng.choice(np.array([-1, 1]), (b, a)), 0)
    consts = {
        "l1.w": Const("ternary", w1), "l1.s": Const("float32", rng.random(b)),
        "l2.w": Const("binary", rng.choice(np.array([-1, 1]), (c, b))),
        "l2.s": Const("float32", rng.random(c)), "l2.b": Const("float32", rng.standard_normal(c)),
    }
    nodes = [Node("linear", "l1", ["x", "l1.w", "l1.s"], ["h"]), Node("relu", "r", ["h"], ["a"]),
             Node("linear", "l2", ["a", "l2.w", "l2.s", "l2.b"], ["y"])]
    return Graph([Value("x", (None, a))], ["y"], nodes, consts, {"accuracy": 0.75, "note": "é"})


# ---------------------------------------------------------------------- golden files


def _deflates_as_zlib() -> bool:
    """Whether this Python's deflate gives the golden file's stream for its JSON. Another
    implementation (zlib-ng, which some systems install as their zlib, or a fork) may choose other
    matches for the same text: then the deflated files' bytes are compared by what they hold."""
    buf = (GOLDEN / "deflated.tern").read_bytes()
    stored = buf[20:20 + int.from_bytes(buf[12:16], "little")]
    z = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return z.compress(zlib.decompress(stored[4:], -15)) + z.flush() == stored[4:]


ZLIB_NG = not _deflates_as_zlib()


@pytest.mark.parametrize("name", sorted(make_golden.GOLDEN))
def test_golden_bytes_are_what_the_writer_writes(name):
    built, golden = make_golden.build(name), (GOLDEN / name).read_bytes()
    if make_golden.GOLDEN[name][1].get("deflate", True) and ZLIB_NG:
        a, b = tern.parse(built), tern.parse(golden)
        assert a.header == b.header and all(bytes(a.raw(e.name)) == bytes(b.raw(e.name)) for e in a.tensors)
        return
    assert golden == built, f"run python formats/golden/make_golden.py and review the diff of {name}"


def test_the_deflated_golden_file_is_mixed_tern_with_its_header_deflated():
    plain, deflated = (GOLDEN / "mixed.tern").read_bytes(), (GOLDEN / "deflated.tern").read_bytes()
    p, d = tern.parse(plain), tern.parse(deflated)
    assert (p.deflated, d.deflated) == (False, True)
    assert d.header == p.header and d.json_len == p.header_len and d.header_len < p.header_len
    assert plain[p.data_start:] == deflated[d.data_start:]  # the same data section, earlier
    assert d.data_start == tern.align(20 + d.header_len) < p.data_start
    stored = deflated[20:20 + d.header_len]
    assert int.from_bytes(stored[:4], "little") == p.header_len
    assert zlib.decompress(stored[4:], -15) == plain[20:20 + p.header_len]  # raw deflate of the same JSON
    assert int.from_bytes(deflated[10:12], "little") == tern.FLAG_DEFLATE


def test_the_writer_deflates_the_header_only_when_that_moves_the_data_forward():
    for graph in (make_golden.tiny(), make_golden.no_weights(), make_golden.mixed(), mlp()):
        plain, _ = tern.dumps(graph, deflate=False)
        default, info = tern.dumps(graph)
        p, d = tern.parse(plain), tern.parse(default)
        assert d.header == p.header and plain[p.data_start:] == default[d.data_start:]
        stored_len = 4 + len(zlib.compress(plain[20:20 + p.header_len], 9)) - 6  # zlib wrapper: 2 + 4 bytes
        if tern.align(20 + stored_len) < p.data_start:
            assert d.deflated and d.data_start < p.data_start and info.header_len == d.header_len
        else:
            assert not d.deflated and default == plain
    text = bytes(random.Random(5).randrange(35, 127) for _ in range(40))  # 40 bytes that deflate cannot shrink
    assert tern._stored_header(text, True) == (text, 0) == tern._stored_header(text, False)
    stored, flags = tern._stored_header(b"[" + b"0," * 300 + b"0]", True)
    assert flags == tern.FLAG_DEFLATE and tern._inflate(stored) == b"[" + b"0," * 300 + b"0]"


@pytest.mark.parametrize("name", sorted(make_golden.GOLDEN))
def test_golden_files_read_back_as_their_graphs(name):
    builder, options = make_golden.GOLDEN[name]
    want = builder()
    got = tern.read(GOLDEN / name)
    lossy = {k for k, c in want.consts.items() if c.kind == "float32"} if options.get("allow_lossy") else set()
    assert_same_graph(got, want, lossy)
    assert got.metadata == {**want.metadata, "producer": make_golden.PRODUCER}
    assert all(ok for _, ok, _ in tern.verify(GOLDEN / name))


def test_golden_encodings():
    f = tern.load(GOLDEN / "mixed.tern")
    assert [e.encoding for e in f.tensors] == ["ts", "f32", "b1", "f32", "t2", "f32", "f32", "f32", "f32"]
    assert [e.encoding for e in tern.load(GOLDEN / "conv.tern").tensors] == ["t2", "f16", "f16", "ts", "f16"]
    assert tern.load(GOLDEN / "no_weights.tern").size == tern.load(GOLDEN / "no_weights.tern").data_start


def test_spec_listing_is_the_golden_file():
    text = SPEC.read_text(encoding="utf-8")
    listing = re.search(r"<!-- BEGIN DUMP tiny.tern -->\n```text\n(.*?)\n```\n<!-- END DUMP", text, re.S)
    assert listing, "TERN.md lost its worked example"
    assert listing.group(1) == make_golden.dump(make_golden.build("tiny.tern"))
    pretty = re.search(r"pretty-printed.*?```json\n(.*?)```", text, re.S)
    buf = (GOLDEN / "tiny.tern").read_bytes()
    assert json.loads(pretty.group(1)) == tern.load(GOLDEN / "tiny.tern").header
    assert buf[:8] == bytes.fromhex("89 54 45 52 4E 0D 0A 1A") == tern.MAGIC


def test_tiny_layout_matches_the_spec():
    f = tern.load(GOLDEN / "tiny.tern")
    header_len = int.from_bytes((GOLDEN / "tiny.tern").read_bytes()[12:16], "little")
    assert f.data_start == tern.align(20 + header_len) == 576
    assert [(e.name, e.offset, e.nbytes) for e in f.tensors] == [("w", 0, 6), ("s", 64, 12)]
    assert bytes(f.raw("w")) == bytes.fromhex("71 03 10 00 4f 01")
    if not ZLIB_NG:  # §8: what the writer makes of it by default
        _, info = tern.dumps(make_golden.tiny(), producer=make_golden.PRODUCER)
        assert (info.header_len, info.data_start, info.size) == (256, 320, 396)
        assert "507 bytes of JSON become 256 and the data starts at 320" in " ".join(SPEC.read_text().split())


# ---------------------------------------------------------------------- write / read


def test_round_trip(tmp_path):
    g = mlp()
    info = tern.write(g, tmp_path / "m.tern")
    assert info.size == (tmp_path / "m.tern").stat().st_size and info.path == str(tmp_path / "m.tern")
    assert [e.name for e in info.tensors] == ["l1.w", "l1.s", "l2.w", "l2.s", "l2.b"]  # order of first use
    assert [e.encoding for e in info.tensors] == ["ts", "f32", "b1", "f32", "f32"]
    back = tern.read(tmp_path / "m.tern")
    assert_same_graph(back, g)
    assert back.metadata == {"accuracy": 0.75, "note": "é", "producer": f"ternarize {tern.__version__}"}
    back.validate()


def test_write_is_deterministic(tmp_path):
    tern.write(mlp(), tmp_path / "a.tern")
    tern.write(mlp(), tmp_path / "b.tern")
    assert (tmp_path / "a.tern").read_bytes() == (tmp_path / "b.tern").read_bytes()
    again = tern.read(tmp_path / "a.tern")  # re-writing what was read gives the same bytes too
    assert tern.dumps(again)[0] == (tmp_path / "a.tern").read_bytes()


def test_multi_block_ts_round_trip(tmp_path):
    g = mlp(sizes=(64, 2500, 4), nonzero=0.02)  # 2500 rows of 64: blocks of 1024 rows
    info = tern.write(g, tmp_path / "m.tern")
    assert info.tensors[0].encoding == "ts" and info.tensors[0].params["block_rows"] == 1024
    assert_same_graph(tern.read(tmp_path / "m.tern"), g)


def test_explicit_encodings(tmp_path):
    g = mlp()
    info = tern.write(g, tmp_path / "m.tern", encodings={"l1.w": "t2", "l2.w": "t2", "l2.b": "f16"},
                      allow_lossy=True)
    assert [e.encoding for e in info.tensors] == ["t2", "f16", "t2", "f16", "f16"]
    assert_same_graph(tern.read(tmp_path / "m.tern"), g, lossy={"l1.s", "l2.s", "l2.b"})


@pytest.mark.parametrize("encodings,allow_lossy,message", [
    ({"l1.w": "b1"}, False, "cannot store 'l1.w' of kind ternary"),
    ({"l1.s": "f16"}, False, "allow_lossy"),
    ({"nope": "t2"}, False, "not a constant of the graph"),
    ({"l2.s": "zz"}, False, "cannot store"),
])
def test_bad_encodings_are_config_errors(tmp_path, encodings, allow_lossy, message):
    with pytest.raises(ConfigError, match=message):
        tern.write(mlp(), tmp_path / "m.tern", encodings=encodings, allow_lossy=allow_lossy)
    assert not list(tmp_path.iterdir())


def test_write_refuses_an_invalid_graph_or_metadata(tmp_path):
    g = mlp()
    g.nodes[0].inputs[0] = "missing"
    with pytest.raises(GraphError, match="missing"):
        tern.write(g, tmp_path / "m.tern")
    for bad in ({"x": float("nan")}, {"x": {1: "int key"}}, {"x": object()}, {"x": [10**400]}):
        g = mlp()
        g.metadata = bad
        with pytest.raises(GraphError, match="canonical JSON"):
            tern.write(g, tmp_path / "m.tern")
    g.metadata = {"x": [10**400]}
    with pytest.raises(GraphError, match="an integer of 1329 bits overflows a double"):
        tern.write(g, tmp_path / "m.tern")
    g.metadata = {"x": [2**1023, -(2**1023)]}  # within a double's range: kept exactly
    tern.write(g, tmp_path / "m.tern")
    assert tern.read(tmp_path / "m.tern").metadata["x"] == [2**1023, -(2**1023)]
    (tmp_path / "m.tern").unlink()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("node,dims", [
    (Node("concat", "c", ["x", "x"], ["y"], {"axis": 1}), [1 << 30]),  # 2^31 elements: within the limit
    (Node("reshape", "c", ["x"], ["y"], {"shape": [-1]}), [1 << 16, 1 << 15]),
])
def test_no_activation_dimension_beyond_the_limit(node, dims):
    g = Graph([Value("x", (None, *dims))], ["y"], [node], {}, {})
    with pytest.raises(GraphError, match=r"node 'c' \((concat|reshape)\) output has a dimension of 2147483648, "
                                         r"more than the limit 2147483647"):
        g.validate()


def test_numpy_scalars_in_metadata_and_attributes(tmp_path):
    g = mlp()
    g.metadata = {"epochs": np.int64(3), "acc": np.float32(0.5)}
    g.nodes.insert(2, Node("leaky_relu", "lr", ["a"], ["a2"], {"alpha": np.float64(0.1)}))
    g.nodes[1].outputs = ["a"]
    g.nodes[3].inputs[0] = "a2"
    tern.write(g, tmp_path / "m.tern")
    back = tern.read(tmp_path / "m.tern")
    assert back.metadata["epochs"] == 3 and back.nodes[2].attrs == {"alpha": 0.1}


def test_graph_without_constants_ends_at_data_start(tmp_path):
    g = Graph([Value("x", (None, 3))], ["y"], [Node("relu", "r", ["x"], ["y"])], {})
    info = tern.write(g, tmp_path / "r.tern")
    assert info.size == info.data_start and info.size % 64 == 0


# ---------------------------------------------------------------------- atomic writes


def _boom(*args, **kwargs):
    raise OSError("disk on fire")


@pytest.mark.parametrize("target", ["os.fsync", "os.replace"])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, target):
    monkeypatch.setattr(target, _boom)
    with pytest.raises(OutputError, match=r"^cannot write .*m\.tern: disk on fire; "):
        tern.write(mlp(), tmp_path / "m.tern")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "m.tern"
    tern.write(mlp(seed=1), path)
    before = path.read_bytes()
    monkeypatch.setattr("os.fsync", _boom)
    with pytest.raises(OutputError):
        tern.write(mlp(seed=2), path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class Interrupted:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr("os.fdopen", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        tern.write(mlp(), tmp_path / "m.tern")
    assert list(tmp_path.iterdir()) == []


def test_written_file_honours_the_umask(tmp_path):
    tern.write(mlp(), tmp_path / "m.tern")
    old = os.umask(0)
    os.umask(old)
    assert (tmp_path / "m.tern").stat().st_mode & 0o777 == 0o666 & ~old


# ---------------------------------------------------------------------- TernFile, verify


def test_tern_file_gives_zero_copy_raw_bytes():
    f = tern.load(GOLDEN / "mixed.tern")
    e = f.entry("fc1.w")
    raw = f.raw("fc1.w")
    assert isinstance(raw, memoryview) and raw.readonly and len(raw) == e.nbytes
    assert raw.obj is f.raw("fc2.w").obj  # views into the one buffer holding the file
    rebuilt = np.zeros(e.shape, np.int8)
    for row0, _, rows, cols, negative in pack.ts_blocks(raw, e.shape, e.params):
        rebuilt[row0 + rows, cols] = np.where(negative, -1, 1)
    np.testing.assert_array_equal(rebuilt, f.decode("fc1.w"))
    assert f.dense_nbytes == sum(t.count * (4 if t.kind == "float32" else 1) for t in f.tensors)
    with pytest.raises(KeyError):
        f.entry("nope")


def test_verify_reports_instead_of_raising(tmp_path):
    buf = bytearray((GOLDEN / "mixed.tern").read_bytes())
    f = tern.load(GOLDEN / "mixed.tern")
    buf[f.data_start + f.entry("fc2.w").offset] ^= 0xFF  # corrupt one tensor: its CRC check fails
    (tmp_path / "bad.tern").write_bytes(bytes(buf))
    results = tern.verify(tmp_path / "bad.tern")
    failed = [(name, msg) for name, ok, msg in results if ok is False]
    assert failed == [("tensors[2] 'fc2.w' crc32", failed[0][1])] and "computed" in failed[0][1]
    assert results[-1] == ("decode", None, "not run: a check above failed")  # listed as not run, not left out
    assert ("graph", True, "8 nodes valid") in results
    (tmp_path / "worse.tern").write_bytes(b"GIF89a" + bytes(30))
    assert tern.verify(tmp_path / "worse.tern") == [
        ("prelude", False, tern.verify(tmp_path / "worse.tern")[0][2]),
        ("remaining checks", None, "not run: the prelude check failed")]


def test_load_names_the_file(tmp_path):
    (tmp_path / "x.tern").write_bytes(b"\x89TERN\r\n\x1a" + bytes(4))
    with pytest.raises(TernFormatError, match=r"x\.tern: the file is 12 bytes, shorter than"):
        tern.load(tmp_path / "x.tern")


def test_only_regular_files_are_read():
    with pytest.raises(TernFormatError, match="not a regular file"):
        tern.load("/dev/zero")


# ---------------------------------------------------------------------- numpy only

_NO_TORCH = """
import sys, tempfile
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
import numpy as np
import ternarize.graph, ternarize.pack, ternarize.tern
g = ternarize.tern.read(sys.argv[1])
with tempfile.TemporaryDirectory() as d:  # the writer, the verifier and the encoders' choice too
    info = ternarize.tern.write(g, d + "/again.tern")
    assert all(ok for _, ok, _ in ternarize.tern.verify(d + "/again.tern"))
    codes = np.array([[1, 0, -1, 0]] * 3, np.int8)
    assert ternarize.pack.choose(codes, "ternary") in ("t2", "ts")
    print(ternarize.tern.load(d + "/again.tern").size == info.size, info.size > 0)
assert "torch" not in sys.modules, "torch was imported"
print(len(g.nodes))
"""


def test_numpy_only_modules_never_import_torch():
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, str(GOLDEN / "mixed.tern")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "8"]


NUMPY_ONLY = ("ternarize.graph", "ternarize.pack", "ternarize.tern", "ternarize.runtime")


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imported(name: str, path: Path, top_only: bool) -> set[str]:
    """The modules ``path`` (module ``name``) imports: anywhere in it, or with ``top_only`` only in
    its module-level statements (a package's lazy ``__getattr__`` aside). A dynamic import whose
    module is not a literal fails the test: it could not be checked."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    nodes = ast.iter_child_nodes(tree) if top_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if _module_file(f"{base}.{alias.name}"))
        elif isinstance(node, ast.Call) and (
                getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__"):
            arg = node.args[0] if node.args else None
            assert isinstance(arg, ast.Constant), f"{path.name}:{node.lineno}: a dynamic import cannot be checked"
            out.add(arg.value)
    return out


def test_numpy_only_modules_import_nothing_but_numpy_and_the_standard_library():
    """Every import in the numpy-only modules and in every ternarize module they import, function
    bodies included (an import inside a function that no test calls is found here too)."""
    todo, seen, outside = list(NUMPY_ONLY) + ["ternarize"], set(), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        assert path is not None, name
        for dep in _imported(name, path, top_only=name == "ternarize"):
            if dep == "ternarize" or dep.startswith("ternarize."):
                todo.extend(".".join(dep.split(".")[:i]) for i in range(2, dep.count(".") + 2))
            else:
                outside.setdefault(dep.split(".")[0], name)
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    assert {dep: name for dep, name in outside.items() if dep not in allowed} == {}
    assert {"ternarize.runtime.gaps", "ternarize.errors", "ternarize._io"} <= seen
    assert "ternarize.lowering" not in seen
