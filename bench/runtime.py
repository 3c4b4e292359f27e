"""Benchmark: the numpy runtime against onnxruntime running the float model (not a test).

For the paper's MLP (784-2048-2048-2048-10; ``--width`` shrinks it) and the VGG-style CNN (zoo
"vgg" on 1x28x28 at ``--vgg-width``), with weights projected to ternary at about 5 % and 50 %
non-zero and to binary (W = s_c·θ, random BatchNorm statistics), it measures side by side in one
process:

(a) bits per discrete weight of the ``.tern`` file against the empirical entropy bound
    H(p0, p+, p−) (``pack.entropy_bits``, per tensor, weighted by size) and against 2 bits;
(b) latency of ``Runtime.run`` against onnxruntime running the float model (``--threads``
    intra-op threads, default 2), at batch 1, 4 and 64, and at batch 1 also against onnxruntime on
    one thread (the runtime's sparse paths run on one) in a second pass, whose medians are the
    columns "b1 ms1" and "ort1 ms" and whose paired ratio is "b1 x1". Both take turns in blocks of runs, so load
    from other processes hits both alike; "x" is the median over rounds of the paired ratio
    runtime / onnxruntime (below 1: the runtime is faster), "min x" the ratio of the fastest runs;
(c) resident memory of the weights: ``Runtime.weight_bytes`` and the growth of traced memory
    (tracemalloc) while loading, against the encoded size (the tensors' ``nbytes``) and against
    float32 weights.

Sparse (``ts``) weights are held as ``Runtime.load`` does by default (``sparse="auto"``: re-encoded as
a byte per non-zero weight while the resident weights stay within 1.2× the encoded size). The rows
"ternary 5% stream" and "ternary 5% indices" load the same file with ``sparse="stream"`` (the
Rice-coded stream as stored, decoded on every call) and ``sparse="indices"`` (decoded int32
positions, about 4 bytes per non-zero weight). The row "ternary 50% as t2" asks the writer for the
dense 2-bit encoding, which it would not choose (ts is smaller at 1.5 bits), to show what the
size-optimal choice costs the runtime.

Example::

    python bench/runtime.py                                  # full size: takes a few minutes
    python bench/runtime.py --width 256 --vgg-width 0.25 --runs 50 --json out.json
    python bench/runtime.py --models mlp --profile           # where the sparse MLP spends batch 1

Options and the ``--json`` path are checked before the timing; a problem is one line on stderr and
exit code 2.
"""

import os
import sys

# bench/ holds onnx.py: drop this directory from the path so `import onnx` finds the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import cProfile  # noqa: E402
import gc  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from ternarize import _scripts, lower, pack, tern  # noqa: E402
from ternarize.runtime import Runtime  # noqa: E402
from ternarize.testing import project, synthetic  # noqa: E402

# row name → (kind, non-zero fraction, Runtime.load options, encoding asked of the writer or None)
VARIANTS = {
    "ternary 5%": ("ternary", 0.05, {}, None),
    "ternary 5% stream": ("ternary", 0.05, {"sparse": "stream"}, None),
    "ternary 5% indices": ("ternary", 0.05, {"sparse": "indices"}, None),
    "ternary 50%": ("ternary", 0.5, {}, None),
    "ternary 50% as t2": ("ternary", 0.5, {}, "t2"),
    "binary": ("binary", 1.0, {}, None),
}


def float_onnx(name: str, width: float, folder: Path, threads: int):
    """The float model exported to ONNX (ternarize.onnx if present, else torch.onnx), a session on
    ``threads`` intra-op threads and one on a single thread."""
    model, shape = synthetic(name, width)
    path = folder / f"{name}-float.onnx"
    try:
        from ternarize import onnx as tonnx

        tonnx.export(lower(model, torch.zeros(1, *shape), discrete={}), path)
        how = "ternarize.onnx"
    except ImportError:
        torch.onnx.export(model, torch.zeros(1, *shape), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}}, dynamo=False)
        how = "torch.onnx"
    sessions = []
    for n in (threads, 1):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = n, 1
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    return {"session": sessions[0], "session1": sessions[1], "input": sessions[0].get_inputs()[0].name,
            "how": how, "size": path.stat().st_size, "float_weight_bytes": 4 * params}


# ---------------------------------------------------------------------- the variants


def compile_variant(name: str, width: float, variant: str, folder: Path) -> dict:
    kind, density, opts, encoding = VARIANTS[variant]
    model, shape = synthetic(name, width)
    discrete = project(model, kind, density)
    graph = lower(model, torch.zeros(1, *shape), discrete=discrete)
    path = folder / f"{name}-{variant.split()[0]}-{int(100 * density)}-{encoding}.tern"
    info = tern.write(graph, path, encodings={n: encoding for n in discrete} if encoding else None)
    disc = [e for e in info.tensors if e.kind != "float32"]
    n = sum(e.count for e in disc)
    entropy = sum(e.count * pack.entropy_bits(graph.consts[e.name].data) for e in disc) / n
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    rt = Runtime.load(path, **opts)
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    x = np.random.default_rng(2).standard_normal((50, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    held = [rt.forms[n] for n in sorted(rt.forms)]
    return {"model": name, "variant": variant, "runtime": rt, "shape": shape,
            "held": ",".join(f"{f}:{held.count(f)}" for f in sorted(set(held))) or "-",
            "encodings": sorted({e.encoding for e in disc}), "file_size": info.size,
            "nonzero": float(sum(np.count_nonzero(graph.consts[e.name].data) for e in disc) / n),
            "bits": 8 * sum(e.nbytes for e in disc) / n, "entropy": entropy,
            "encoded": sum(e.nbytes for e in info.tensors), "weight_bytes": rt.weight_bytes, "traced": traced,
            "err": float(np.abs(rt.run(x) - ref).max() / np.abs(ref).max())}


def latency(rows: list[dict], ref: dict, batch: int, runs: int, block: int = 5, session: str = "session",
            tag: str = "") -> None:
    """Median ms of each runtime and of onnxruntime (float), and the median paired ratio; the keys
    are ``b{batch}{tag}_ms`` and so on."""
    x = np.random.default_rng(3).standard_normal((batch, *rows[0]["shape"])).astype(np.float32)
    feed = {ref["input"]: x}

    def timed(fn):
        fn()  # untimed: warms caches after the other side ran
        out = []
        for _ in range(block):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    for r in rows:
        ours, theirs = [], []
        for k in range(max(1, -(-runs // block))):
            pair = [lambda r=r: r["runtime"].run(x), lambda: ref[session].run(None, feed)]
            a, b = (timed(f) for f in (pair if k % 2 == 0 else pair[::-1]))
            ours.append(a if k % 2 == 0 else b)
            theirs.append(b if k % 2 == 0 else a)
        flat_o, flat_t = [t for b in ours for t in b], [t for b in theirs for t in b]
        key = f"b{batch}{tag}"
        r[f"{key}_ms"] = 1e3 * statistics.median(flat_o)
        r[f"{key}_ort_ms"] = 1e3 * statistics.median(flat_t)
        r[f"{key}_x"] = statistics.median(statistics.median(o) / statistics.median(t) for o, t in zip(ours, theirs))
        r[f"{key}_min_x"] = min(flat_o) / min(flat_t)


def table(rows: list[dict], ref: dict) -> str:
    head = (f"{'variant':18} {'ts held as':16} {'enc':6} {'nz':>5} {'bits/w':>6} {'H':>6} {'/H':>5} {'/2':>5} "
            f"{'b1 ms':>8} {'ort ms':>7} {'b1 x':>6} {'min x':>6} {'b1 ms1':>7} {'ort1 ms':>7} {'b1 x1':>6} "
            f"{'b4 ms':>8} {'ort ms':>7} {'b4 x':>6} "
            f"{'b64 ms':>8} {'ort ms':>7} {'b64 x':>6} "
            f"{'resident':>9} {'encoded':>9} {'res/enc':>7} {'traced/enc':>10} {'vs f32':>7} {'err':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:18} {r['held']:16} {','.join(r['encodings']):6} {100 * r['nonzero']:>4.1f}% "
            f"{r['bits']:>6.3f} "
            f"{r['entropy']:>6.3f} {r['bits'] / r['entropy']:>5.3f} {r['bits'] / 2:>5.3f} "
            f"{r['b1_ms']:>8.3f} {r['b1_ort_ms']:>7.3f} {r['b1_x']:>6.2f} {r['b1_min_x']:>6.2f} "
            f"{r['b1_t1_ms']:>7.3f} {r['b1_t1_ort_ms']:>7.3f} {r['b1_t1_x']:>6.2f} "
            f"{r['b4_ms']:>8.3f} {r['b4_ort_ms']:>7.3f} {r['b4_x']:>6.2f} "
            f"{r['b64_ms']:>8.2f} {r['b64_ort_ms']:>7.2f} {r['b64_x']:>6.2f} "
            f"{r['weight_bytes']:>9} {r['encoded']:>9} {r['weight_bytes'] / r['encoded']:>7.3f} "
            f"{r['traced'] / r['encoded']:>10.3f} {r['weight_bytes'] / ref['float_weight_bytes']:>6.2%} "
            f"{r['err']:>6.0e}")
    return "\n".join(lines)


def profile(rt: Runtime, shape: tuple, runs: int = 50) -> None:
    x = np.zeros((1, *shape), np.float32)
    rt.run(x)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(runs):
        rt.run(x)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def bench_model(name: str, width: float, args, folder: Path) -> tuple[list[dict], dict]:
    ref = float_onnx(name, width, folder, args.threads)
    rows = [compile_variant(name, width, v, folder) for v in VARIANTS]
    latency(rows, ref, 1, args.runs)
    latency(rows, ref, 1, args.runs, session="session1", tag="_t1")
    latency(rows, ref, 4, max(2, args.runs // 4), block=2)
    latency(rows, ref, 64, max(2, args.runs // 10), block=1)
    if args.profile:
        print(f"\nprofile: {name} ternary 5%, batch 1")
        profile(rows[0]["runtime"], rows[0]["shape"])
    return rows, ref


def main(argv=None) -> None:
    ap = _scripts.parser(__file__, __doc__)
    _scripts.model_options(ap)
    ap.add_argument("--runs", type=_scripts.positive_int, default=100,
                    help="timed runs at batch 1 (batch 4: runs/4, 64: runs/10)")
    ap.add_argument("--threads", type=_scripts.positive_int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--profile", action="store_true", help="cProfile the sparse model at batch 1")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    _scripts.check_output(args.json)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            width = args.width if name == "mlp" else args.vgg_width
            with _scripts.out_of_memory("choose a smaller --width or --vgg-width"):
                rows, ref = bench_model(name, width, args, Path(tmp))
            print(f"\n{name} (width {width}): runtime (numpy {np.__version__}; sparse paths 1 thread, dense codes "
                  f"through BLAS) vs onnxruntime "
                  f"{ort.__version__} float ({args.threads} threads, export: {ref['how']}); "
                  f"x = runtime / onnxruntime; x1: a second batch-1 pass, onnxruntime on 1 thread; "
                  f"float weights {ref['float_weight_bytes']} bytes")
            print(table(rows, ref))
            results += [{k: v for k, v in r.items() if k != "runtime"} for r in rows]
    if args.json:
        _scripts.write_json(args.json, {"onnxruntime": ort.__version__, "numpy": np.__version__,
                                        "threads": args.threads, "rows": results})


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
