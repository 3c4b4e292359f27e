"""Benchmark: the bytes the same discrete model takes in the usual ways of storing it (not a test).

For each model it stores exactly the same weights (the discrete codes and the float tensors:
per-channel scales, biases, float-kept layers) in each way and prints the sizes side by side, with
each one's ratio to the ``.tern`` file:

* float32 weights as ``torch.save`` writes a state_dict (codes times scales, as after training);
* the codes as int8 and the floats as float32 in a ``.npz`` (``np.savez``), and zipped
  (``np.savez_compressed``);
* "packed codes": the codes packed dense, 2 bits each (1 bit for binary: what hand-rolled TWN /
  BinaryConnect exports and ONNX INT2 hold), plus the floats, raw and through gzip -9, bzip2 -9
  and xz -9e;
* the int8 codes plus floats through xz -9e (general-purpose compressors find more in bytes than
  in packed bits);
* the ONNX file ``ternarize export`` writes (INT2 initializers), and with ``--compact`` (each
  ternary weight in the smallest of its 2-bit code, base 3 and a sparse stream, unpacked in-graph);
* the ``.tern`` file as the writer makes it (a FILE's tensors keep their encodings), with a plain
  JSON header instead of the deflated one, with ``--float16``, and through xz -9e (what is left to
  find in it);
* the floor: the codes' empirical entropy H(p0, p+, p−) per weight (each tensor's own), plus 4 (or 2)
  bytes per float value.

For a FILE whose floats are stored as f16, the other ways hold those values widened to float32,
except the ONNX rows, whose exporter stores exact binary16 values in float16 too.

Models: with no FILE, the embedded demo (an MLP trained in float on the 8x8 digits, then 60 epochs
of ternary E-MSA, made in a temporary folder: some 10 seconds) and the paper's MLP
(784-2048-2048-2048-10; ``--width``) and the VGG-style CNN (``--vgg-width``) with weights projected
to ternary at 5 % and 50 % non-zero and to binary (``ternarize.testing.project``: random positions,
so no coder finds structure beyond the symbols' frequencies). FILE: ``.tern`` files, or folders made
by ``compress``, measured instead.

Example::

    python bench/size.py                              # demo + synthetic models: about a minute
    python bench/size.py out/model.tern --json size.json
    python bench/size.py --models mlp --width 512

Options, the files and the ``--json`` path are checked before the work; a problem is one line on
stderr and exit code 2.
"""

import os
import sys

# bench/ holds onnx.py: drop this directory from the path so `import onnx` finds the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import bz2  # noqa: E402
import gzip  # noqa: E402
import io  # noqa: E402
import lzma  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ternarize import _scripts, lower, pack, tern  # noqa: E402
from ternarize import onnx as tonnx  # noqa: E402
from ternarize.pipeline import halved  # noqa: E402
from ternarize.testing import project, synthetic  # noqa: E402

XZ = {"format": lzma.FORMAT_XZ, "preset": 9 | lzma.PRESET_EXTREME}
SYNTHETIC = (("ternary", 0.05), ("ternary", 0.5), ("binary", 1.0))


def _xz(data: bytes) -> int:
    return len(lzma.compress(data, **XZ))


def sizes(graph, encodings: dict | None = None) -> dict:
    """Each way's byte count for the weights of ``graph``; its .tern file as the writer makes it
    (with ``encodings``, those of a file given, else the writer's choice)."""
    lossy = bool(encodings) and "f16" in encodings.values()
    tern_bytes, _ = tern.dumps(graph, encodings, allow_lossy=lossy)
    plain, _ = tern.dumps(graph, encodings, allow_lossy=lossy, deflate=False)
    discrete = {n: c for n, c in graph.consts.items() if c.kind != "float32"}
    floats = {n: c for n, c in graph.consts.items() if c.kind == "float32"}
    # torch.save: a discrete weight as its float32 values (codes times the per-channel scale, which
    # it then holds), every other float tensor as it is
    state, used = {}, set()
    for node in graph.nodes:
        if len(node.inputs) > 2 and node.inputs[1] in discrete:
            codes = discrete[node.inputs[1]].data.astype(np.float32)
            scale = floats[node.inputs[2]].data
            state[node.inputs[1]] = torch.from_numpy(codes * scale.reshape(-1, *[1] * (codes.ndim - 1)))
            used.add(node.inputs[2])
    state |= {n: torch.from_numpy(c.data) for n, c in floats.items() if n not in used}
    buf = io.BytesIO()
    torch.save(state, buf)
    int8 = {n: c.data for n, c in discrete.items()} | {n: c.data for n, c in floats.items()}
    npz, npz_zip = io.BytesIO(), io.BytesIO()
    np.savez(npz, **int8)
    np.savez_compressed(npz_zip, **int8)
    dense = b"".join(pack.encode(c.data, c.kind, "b1" if c.kind == "binary" else "t2")[0] for c in discrete.values())
    float_raw = b"".join(c.data.tobytes() for c in floats.values())
    packed = dense + float_raw
    codes_int8 = b"".join(c.data.tobytes() for c in discrete.values()) + float_raw
    onnx_bytes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for compact in (False, True):
            onnx_path = Path(tmp) / f"m{compact}.onnx"
            tonnx.export(graph, onnx_path, compact=compact)
            onnx_bytes[compact] = onnx_path.stat().st_size
    half, _ = tern.dumps(halved(graph), allow_lossy=True)
    n_float = sum(c.data.size for c in floats.values())
    entropy = sum(c.data.size * pack.entropy_bits(c.data) for c in discrete.values()) / 8
    return {
        "torch.save, float32": len(buf.getvalue()),
        "int8 codes + f32, .npz": len(npz.getvalue()),
        "int8 codes + f32, .npz zipped": len(npz_zip.getvalue()),
        "packed codes + f32": len(packed),
        "packed codes + f32, gzip -9": len(gzip.compress(packed, 9, mtime=0)),
        "packed codes + f32, bzip2 -9": len(bz2.compress(packed, 9)),
        "packed codes + f32, xz -9e": _xz(packed),
        "int8 codes + f32, xz -9e": _xz(codes_int8),
        "ONNX (INT2)": onnx_bytes[False],
        "ONNX --compact": onnx_bytes[True],
        ".tern": len(tern_bytes),
        ".tern, plain JSON header": len(plain),
        ".tern --float16": len(half),
        ".tern, xz -9e": _xz(tern_bytes),
        "floor: entropy + f32": int(np.ceil(entropy)) + 4 * n_float,
        "floor: entropy + f16": int(np.ceil(entropy)) + 2 * n_float,
    }


def describe(graph) -> dict:
    discrete = [c.data for c in graph.consts.values() if c.kind != "float32"]
    n = sum(d.size for d in discrete)
    return {"discrete_weights": n, "nonzero": sum(np.count_nonzero(d) for d in discrete) / n if n else None,
            "float_values": sum(c.data.size for c in graph.consts.values() if c.kind == "float32")}


def tern_path(path: str) -> Path:
    """A FILE argument as the file read: a folder made by compress stands for its model.tern."""
    return Path(path) / "model.tern" if Path(path).is_dir() else Path(path)


def from_file(path: str) -> tuple[str, object, dict]:
    """A .tern file (or a compress folder's model.tern), checked as ``ternarize verify`` does: its
    graph and its tensors' encodings."""
    tf = tern.load(tern_path(path))  # TernFormatError (or OSError) names the file and what is wrong
    return str(path), tf.graph(), {e.name: e.encoding for e in tf.tensors}


def demo_model() -> tuple[str, object, None]:
    from ternarize.demo import run

    with tempfile.TemporaryDirectory() as tmp:
        result = run(out=os.path.join(tmp, "demo"), progress=False, log=lambda _s: None)
        return "demo (digits MLP, E-MSA)", tern.read(result.tern_path), None


def synthetic_model(name: str, width: float, kind: str, density: float) -> tuple[str, object, None]:
    model, shape = synthetic(name, width)
    graph = lower(model, torch.zeros(1, *shape), discrete=project(model, kind, density))
    label = f"{name} {kind}" + (f" {100 * density:g}%" if kind == "ternary" else "")
    return label, graph, None


def table(rows: list[dict]) -> str:
    ways = list(rows[0]["bytes"])
    head = ["way"] + [r["model"] for r in rows]
    lines = [head, ["non-zero"] + [f"{100 * r['nonzero']:.2f}%" if r["nonzero"] is not None else "-" for r in rows]]
    for way in ways:
        cells = [way]
        for r in rows:
            b, ref = r["bytes"][way], r["bytes"][".tern"]
            cells.append(f"{b:,} ({b / ref:.2f}x)")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> None:
    ap = _scripts.parser(__file__, __doc__)
    ap.add_argument("files", nargs="*", metavar="FILE", help=".tern files or folders made by compress")
    _scripts.model_options(ap)
    ap.add_argument("--no-demo", action="store_true", help="without FILE: leave out the demo model")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    _scripts.check_output(args.json, inputs=[tern_path(f) for f in args.files])
    models = [from_file(f) for f in args.files]  # every file is checked before the work
    if not args.files:
        if not args.no_demo:
            models.append(demo_model())
        for name in args.models:
            width = args.width if name == "mlp" else args.vgg_width
            with _scripts.out_of_memory("choose a smaller --width or --vgg-width"):
                models += [synthetic_model(name, width, kind, density) for kind, density in SYNTHETIC]
    rows = []
    for label, graph, encodings in models:
        rows.append({"model": label, **describe(graph), "bytes": sizes(graph, encodings)})
        print(f"measured {label}", file=sys.stderr, flush=True)
    print("\nbytes of the same weights stored each way (x: ÷ the .tern file)\n")
    print(table(rows))
    if args.json:
        _scripts.write_json(args.json, {"numpy": np.__version__, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
