"""Benchmark: ONNX file size and onnxruntime latency of ternary/binary exports vs the float export.

For the paper's MLP (784-2048-2048-2048-10; ``--width`` shrinks it) and the VGG-style CNN (zoo
"vgg" on 1x28x28 at ``--vgg-width``), it builds a float model with random BatchNorm statistics and
its ternary (~5 % and ~50 % non-zero) and binary projections (W = s_c·θ), exports each with
``ternarize.onnx.export`` (the float model too, from ``lower()`` of the float model), and measures,
side by side in one process: file size, session load time, the median latency at batch 1 and 64 of
``ternarize.onnx.session`` (2 threads by default) and, for reference, of a default onnxruntime
session. Ratios are against the float export of the same model in the same kind of session: "x"
is the median over rounds of the paired ratio (sessions take turns, so load from other processes
hits all alike), "min x" the ratio of the fastest runs (robust on a busy machine), "dflt b1 x" the
paired ratio of default sessions at batch 1.

Example::

    python bench/onnx.py                              # the full-size models
    python bench/onnx.py --width 256 --vgg-width 0.25 --runs 50 --json out.json

Options and the ``--json`` path are checked before the timing; a problem is one line on stderr and
exit code 2.
"""

import os
import sys

# This file is named onnx.py: drop its directory from the path so `import onnx` finds the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from ternarize import _scripts, lower  # noqa: E402
from ternarize import onnx as tonnx  # noqa: E402
from ternarize.testing import project, synthetic  # noqa: E402

# name → (kind, non-zero fraction, export options)
VARIANTS = {
    "float": ("float32", 1.0, {}),
    "ternary 5%": ("ternary", 0.05, {}),
    "ternary 5% compact": ("ternary", 0.05, {"compact": True}),
    "ternary 50%": ("ternary", 0.5, {}),
    "ternary 50% compact": ("ternary", 0.5, {"compact": True}),
    "binary (1-bit)": ("binary", 1.0, {}),
    "binary (2-bit)": ("binary", 1.0, {"binary": "dense"}),
    "ternary 5% compat": ("ternary", 0.05, {"compat": True}),
}


def export_variants(name: str, width: float, variants: list[str], folder: Path) -> list[dict]:
    rows = []
    for v in variants:
        kind, density, opts = VARIANTS[v]
        model, shape = synthetic(name, width)
        discrete = {} if kind == "float32" else project(model, kind, density)
        graph = lower(model, torch.zeros(1, *shape), discrete=discrete)
        path = folder / f"{name}-{v.replace(' ', '_').replace('%', 'pct')}.onnx"
        info = tonnx.export(graph, path, **opts)
        rows.append({"model": name, "variant": v, "path": str(path), "size": info.size, "shape": shape,
                     "nonzero": info.nonzero, "encodings": sorted(set(info.encodings.values())),
                     "torch": model})
    return rows


def default_session(path: str, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def load(rows: list[dict], threads: int) -> None:
    for r in rows:
        t = time.perf_counter()
        r["session"] = tonnx.session(r["path"], threads=threads)
        r["load_ms"] = 1e3 * (time.perf_counter() - t)
        r["default"] = default_session(r["path"], threads) if r["variant"] != "float" else r["session"]


def exactness(rows: list[dict]) -> None:
    """Max |onnx − torch| / max |torch| on 100 random inputs, for both session kinds."""
    x = torch.randn(100, *rows[0]["shape"], generator=torch.Generator().manual_seed(2))
    for r in rows:
        with torch.no_grad():
            ref = r.pop("torch")(x).numpy()
        for key in ("session", "default"):
            y = tonnx.run(r[key], x.numpy())
            r[f"err_{key}"] = float(np.abs(y - ref).max() / np.abs(ref).max())


def latency(rows: list[dict], batch: int, runs: int, key: str, block: int = 5) -> None:
    """Median ms per run, and the ratio to the first row as the median over rounds of the paired
    ratio of block medians. Sessions take turns in blocks of ``block`` runs (order reversed every
    round), so load from other processes hits all of them alike; a block starts with an untimed run
    after a short pause that lets the previous session's spinning worker threads go idle."""
    x = np.random.default_rng(3).standard_normal((batch, *rows[0]["shape"])).astype(np.float32)
    block = max(1, min(block, runs))
    blocks = {id(r): [] for r in rows}
    for k in range(-(-runs // block)):
        for r in rows if k % 2 == 0 else rows[::-1]:
            time.sleep(0.01)
            tonnx.run(r[key], x)
            times = []
            for _ in range(block):
                t = time.perf_counter()
                tonnx.run(r[key], x)
                times.append(time.perf_counter() - t)
            blocks[id(r)].append(times)
    base = [statistics.median(b) for b in blocks[id(rows[0])]]
    for r in rows:
        r[f"{key}_b{batch}_ms"] = 1e3 * statistics.median(t for b in blocks[id(r)] for t in b)
        r[f"{key}_b{batch}_min_ms"] = 1e3 * min(t for b in blocks[id(r)] for t in b)
        r[f"{key}_b{batch}_ratio"] = statistics.median(statistics.median(b) / f for b, f in zip(blocks[id(r)], base))


def table(rows: list[dict]) -> str:
    base = rows[0]
    head = (f"{'model':5} {'variant':20} {'encodings':12} {'bytes':>10} {'size':>7} {'load ms':>7} "
            f"{'b1 ms':>7} {'b1 x':>5} {'min x':>5} {'b64 ms':>8} {'b64 x':>5} {'min x':>5} {'dflt b1 x':>9} "
            f"{'max err':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:5} {r['variant']:20} {','.join(r['encodings']) or '-':12} {r['size']:>10} "
            f"{100 * r['size'] / base['size']:>6.2f}% {r['load_ms']:>7.1f} "
            f"{r['session_b1_ms']:>7.3f} {r['session_b1_ratio']:>5.2f} "
            f"{r['session_b1_min_ms'] / base['session_b1_min_ms']:>5.2f} "
            f"{r['session_b64_ms']:>8.2f} {r['session_b64_ratio']:>5.2f} "
            f"{r['session_b64_min_ms'] / base['session_b64_min_ms']:>5.2f} "
            f"{r['default_b1_ratio']:>9.2f} {r['err_session']:>7.0e}")
    return "\n".join(lines)


def bench_model(name: str, width: float, args, folder: Path) -> list[dict]:
    rows = export_variants(name, width, list(VARIANTS), folder)
    load(rows, args.threads)
    exactness(rows)
    latency(rows, 1, args.runs, "session")
    latency(rows, 64, max(4, args.runs // 5), "session", block=2)
    latency(rows, 1, max(4, args.runs // 5), "default")
    for r in rows:
        r.pop("session"), r.pop("default")
        r["size_ratio"] = r["size"] / rows[0]["size"]
    return rows


def main(argv=None) -> None:
    ap = _scripts.parser(__file__, __doc__)
    _scripts.model_options(ap)
    ap.add_argument("--runs", type=_scripts.positive_int, default=200,
                    help="timed runs per session at batch 1 (batch 64: runs/5)")
    ap.add_argument("--threads", type=_scripts.positive_int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    _scripts.check_output(args.json)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            with _scripts.out_of_memory("choose a smaller --width or --vgg-width"):
                rows = bench_model(name, args.width if name == "mlp" else args.vgg_width, args, Path(tmp))
            width = f"width {args.width}" if name == "mlp" else f"width {args.vgg_width}"
            print(f"\n{name} ({width}), onnxruntime {ort.__version__}, {args.threads} threads; "
                  "ratios vs the float export, 'dflt' = default onnxruntime session")
            print(table(rows))
            results += [{k: v for k, v in r.items() if k != "path"} for r in rows]
    if args.json:
        _scripts.write_json(args.json, {"onnxruntime": ort.__version__, "threads": args.threads, "rows": results})


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
