"""What the fused E-MSA update costs the first time it runs: torch.compile's work, in a fresh
process with empty compile caches, as a training run on a fresh machine pays it (a benchmark, not
a test).

Each setting runs in its own process (``--repeat`` times): import torch and ternarize, make an
E-MSA optimizer over the paper MLP's four weight tensors (784-W-W-W-10), then time its first step
(the compile) and the median of the next steps. Settings: Inductor's defaults (the step updates
the largest tensor first), one compile thread (no pool of compile workers to start), and the first
call made on the W × 784 tensor alone (the order before the largest went first). The caches go to
a temporary folder that is removed afterwards. A compiled reduction picks its kernel configuration
once, by timing the candidates on its first call; the spread of the step time over fresh processes
shows how much that choice varies, and the last setting whether the first call's shape matters.

    python bench/compile_time.py                          # CPU (Inductor's C++ code)
    python bench/compile_time.py --device cuda --json compile.json

Options, device and the ``--json`` path are checked first; a problem is one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the checkout's package: the child processes are given it too

from ternarize import _scripts  # noqa: E402

# name: (environment, which tensors the first call updates)
SETTINGS = {"defaults": ({}, "all"), "one compile thread": ({"TORCHINDUCTOR_COMPILE_THREADS": "1"}, "all"),
            "first call on W x 784": ({}, "input")}


def child(device: str, mode: str, width: int, steps: int, first_call: str = "all") -> dict:
    """In the fresh process: the times of the first step and of the following steps. ``first_call``
    "input": the first step updates the W × 784 tensor alone (its gradient only), so that the
    compiled kernels are tuned on that shape."""
    import torch

    from ternarize.train.msa import MSA

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    shapes = [(width, 784), (width, width), (width, width), (10, width)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dev)) for s in shapes]
    opt = MSA(params, mode=mode, fused=True)
    grads = [torch.randn(p.shape, generator=gen).to(dev) for p in params]
    params[0].grad = grads[0]
    if first_call == "all":
        for p, g in zip(params[1:], grads[1:]):
            p.grad = g
    sync()
    t = time.perf_counter()
    opt.step()
    sync()
    first = time.perf_counter() - t
    for p, g in zip(params, grads):
        p.grad = g
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t)
    return {"first_step_s": first, "step_ms": 1e3 * statistics.median(times),
            "compiled": opt._fused_setting is not False}


def fresh_process(name: str, setting: tuple, device: str, args) -> dict:
    """One setting's row, measured by :func:`child` in a new process with empty compile caches."""
    extra, first_call = setting
    with tempfile.TemporaryDirectory(prefix="ternarize-compile-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(cache, "triton"), "PYTHONPATH": ROOT, **extra}
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--device", device, "--mode", args.mode,
               "--width", str(args.width), "--steps", str(args.steps), "--first-call", first_call]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{name}: failed ({last[:300]})", file=sys.stderr)
        return {"setting": name, "error": last[:300]}
    return {"setting": name, "process_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    p = _scripts.parser(__file__, __doc__)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--mode", choices=["ternary", "binary"], default="ternary")
    p.add_argument("--width", type=_scripts.units, default=2048)
    p.add_argument("--steps", type=_scripts.positive_int, default=20)
    p.add_argument("--repeat", type=_scripts.positive_int, default=1, help="fresh processes per setting")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--first-call", choices=["all", "input"], default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = _scripts.device(args.device, "fp32", precisions=("fp32",))
    if args.child:
        print(json.dumps(child(str(device), args.mode, args.width, args.steps, args.first_call)))
        return 0
    _scripts.check_output(args.json)
    rows = [fresh_process(name, setting, str(device), args)
            for name, setting in [item for item in SETTINGS.items() for _ in range(args.repeat)]]
    print(f"# the first fused E-MSA step in a fresh process ({device}, {args.mode}, MLP width {args.width}, "
          f"{args.repeat} process(es) a setting)")
    print(f"{'setting':<22} {'process s':>10} {'first step s':>13} {'step ms':>8}")
    for r in rows:
        if "error" not in r:
            print(f"{r['setting']:<22} {r['process_s']:>10.2f} {r['first_step_s']:>13.2f} "
                  f"{r['step_ms']:>8.3f}" + ("" if r["compiled"] else "  (compile failed: eager)"))
    for name in SETTINGS:
        steps = [r["step_ms"] for r in rows if r["setting"] == name and "error" not in r]
        if len(steps) > 1:
            print(f"{name}: step ms over {len(steps)} processes: min {min(steps):.3f}, median "
                  f"{statistics.median(steps):.3f}, max {max(steps):.3f} (max/min {max(steps) / min(steps):.2f})")
    if args.json:
        _scripts.write_json(args.json, {"device": str(device), "mode": args.mode, "width": args.width, "rows": rows})
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
