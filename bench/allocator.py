"""Benchmark: what settling glibc's mmap threshold at load does for the runtime (not a test).

``Runtime.load`` allocates and frees one untouched 16 MiB block once per process
(``ternarize.runtime._settle_allocator``), so that a run's temporaries come from the heap instead of
fresh mappings. This script measures that side by side: for each model and batch it starts fresh
Python processes in turns, half of them with the settling skipped, each loading the model with no
other library in the process (as ``ternarize run`` does), running it a few times untimed and then
timing ``--runs`` runs. It prints the median latency and the minor page faults per run of both, and
the ratio unsettled / settled (above 1: the settling helps).

The models are the ones of ``bench/runtime.py``: the paper's MLP and the VGG-style CNN with weights
projected to ternary at 5 % non-zero, held as ``Runtime.load`` holds them by default.

Example::

    python bench/allocator.py                     # MLP and VGG, batch 1 and 64: about two minutes
    python bench/allocator.py --rounds 5 --json out.json

Options and the ``--json`` path are checked before the timing; a problem is one line on stderr and
exit code 2.
"""

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ternarize import _scripts, lower, tern
from ternarize.testing import project, synthetic

CHILD = """
import resource, sys, time
import numpy as np
import ternarize.runtime as runtime
runtime._settled = sys.argv[2] == "unsettled"
rt = runtime.Runtime.load(sys.argv[1])
x = np.random.default_rng(0).standard_normal((int(sys.argv[3]), *rt.input_shape)).astype(np.float32)
for _ in range(3):
    rt.run(x)
times = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[4])):
    t = time.perf_counter()
    rt.run(x)
    times.append(time.perf_counter() - t)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(sorted(times)[len(times) // 2], faults / len(times))
"""


def build(name: str, width: float, folder: Path) -> Path:
    model, shape = synthetic(name, width)
    graph = lower(model, torch.zeros(1, *shape), discrete=project(model, "ternary", 0.05))
    path = folder / f"{name}.tern"
    tern.write(graph, path)
    return path


def child(path: Path, mode: str, batch: int, runs: int) -> tuple[float, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(batch), str(runs)],
                          capture_output=True, text=True, check=True)
    ms, faults = proc.stdout.split()
    return 1e3 * float(ms), float(faults)


def main(argv=None) -> None:
    ap = _scripts.parser(__file__, __doc__)
    _scripts.model_options(ap, with_models=False)
    ap.add_argument("--rounds", type=_scripts.positive_int, default=3, help="fresh processes per side and case")
    ap.add_argument("--runs", type=_scripts.positive_int, default=40,
                    help="timed runs per process at batch 1 (batch 64: runs/10)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    _scripts.check_output(args.json)
    rows = []
    print(f"{'model':6s} {'batch':>5s} {'settled ms':>10s} {'unsettled ms':>12s} {'x':>5s} "
          f"{'faults/run settled':>18s} {'unsettled':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, width in (("mlp", args.width), ("vgg", args.vgg_width)):
            with _scripts.out_of_memory("choose a smaller --width or --vgg-width"):
                path = build(name, width, Path(tmp))
            for batch in (1, 64):
                runs = args.runs if batch == 1 else max(2, args.runs // 10)
                got = {"settled": [], "unsettled": []}
                for _ in range(args.rounds):
                    for mode in got:
                        got[mode].append(child(path, mode, batch, runs))
                ms = {m: statistics.median(t for t, _ in v) for m, v in got.items()}
                faults = {m: statistics.median(f for _, f in v) for m, v in got.items()}
                row = {"model": name, "width": width, "batch": batch, "ms": ms, "faults_per_run": faults,
                       "x": ms["unsettled"] / ms["settled"]}
                rows.append(row)
                print(f"{name:6s} {batch:5d} {ms['settled']:10.2f} {ms['unsettled']:12.2f} {row['x']:5.2f} "
                      f"{faults['settled']:18.0f} {faults['unsettled']:9.0f}", flush=True)
    if args.json:
        _scripts.write_json(args.json, rows)


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
