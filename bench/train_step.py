"""Training step time of E-MSA and the baselines, as ratios to float Adam (a benchmark, not a test).

Variants, each a full step (forward, loss, backward, optimizer) on the same model and batch:
float Adam; E-MSA ternary and binary, eager and fused (torch.compile); STE-TWN. Steps run
round-robin (one step of each variant in turn) so that load on a shared machine hits every
variant alike; the table reports median step times and their ratio to float Adam.

    python bench/train_step.py                      # CPU: paper MLP 784-2048x3-10, VGG at width 0.25
    python bench/train_step.py --device cuda --vgg-width 1 --json step.json
    python bench/train_step.py --device cuda --graphs        # every step replayed from a CUDA graph

Targets: E-MSA / float ≤ 1.10 on CPU and ≤ 1.05 on GPU. Options, device and the
``--json`` path are checked before the timing; a problem is one line on stderr and exit code 2.
"""

from __future__ import annotations

import copy
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ternarize import _scripts, zoo
from ternarize.train import loop, policy
from ternarize.train.graphs import WARMUP, GraphedStep
from ternarize.train.msa import MSA
from ternarize.train.ste import STE


def build(name: str, args, device):
    if name == "mlp":
        model = zoo.create("mlp", in_shape=(1, 28, 28), width=args.mlp_width)
        shape = (1, 28, 28)
    else:
        model = zoo.create("vgg", in_shape=(3, 32, 32), width=args.vgg_width)
        shape = (3, 32, 32)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    return model.to(device), x, y


class Variant:
    """One way of training the model; ``graphed`` replays its step from a CUDA graph."""

    def __init__(self, label, model, make_opt, x, y, graphed=False):
        self.label, self.model, self.x, self.y = label, model, x, y
        names = {lay.param for lay in policy.discrete_layers(model)}
        params = dict(model.named_parameters())
        self.discrete = [params[n] for n in names]
        rest = [p for n, p in params.items() if n not in names]
        self.opts = make_opt(self.discrete, rest)
        self.run = GraphedStep(self.body, x.device) if graphed else self.body
        self.times = []

    def body(self):
        loss = F.cross_entropy(self.model(self.x), self.y)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.opts:
            o.step()

    def step(self, sync):
        t0 = time.perf_counter()
        self.run()
        sync()
        self.times.append(time.perf_counter() - t0)


def variants(model, x, y, fused_ok: bool, graphed: bool = False):
    def adam(params):  # capturable: its step count lives on the device, as a CUDA graph needs
        return torch.optim.Adam(params, lr=1e-3, capturable=graphed)

    def continuous(params):  # what training uses for the BatchNorm parameters (fused on a GPU)
        return loop._adam(params, 1e-3, capturable=graphed)

    def variant(label, make_opt):
        return Variant(label, copy.deepcopy(model), make_opt, x, y, graphed)

    out = [variant("float Adam", lambda d, r: [adam(d + r)])]
    if x.is_cuda:  # torch's fused Adam: one kernel over every weight instead of a dozen
        out.append(variant("float Adam fused", lambda d, r: [continuous(d + r)]))
    for mode in ("ternary", "binary"):
        out.append(variant(f"MSA {mode} eager", lambda d, r, m=mode: [MSA(d, mode=m, fused=False), continuous(r)]))
        if fused_ok:
            out.append(variant(f"MSA {mode} fused", lambda d, r, m=mode: [MSA(d, mode=m, fused=True), continuous(r)]))
    out.append(variant("STE TWN", lambda d, r: [STE(d, mode="ternary"), continuous(r)]))
    return out


def measure(name, args, device, graphed=False, profile=False):
    """Median step times of every variant on model ``name`` (``graphed``: CUDA graph replays);
    ``profile`` adds each variant's :func:`kernel_profile` to its row."""
    model, x, y = build(name, args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    vs = variants(model, x, y, fused_ok=not args.no_compile, graphed=graphed)
    warmup = max(args.warmup, WARMUP + 1) if graphed else args.warmup  # the timed steps are all replays
    for v in vs:  # warm-up (and compilation, and the capture) outside the timed rounds
        for _ in range(warmup):
            v.step(sync)
        v.times.clear()
    for _ in range(args.steps):
        for v in vs:
            v.step(sync)
    base = statistics.median(vs[0].times)
    fused = [statistics.median(v.times) for v in vs if v.label == "float Adam fused"]
    rows = []
    for v in vs:
        med = statistics.median(v.times)
        row = {"model": name, "variant": v.label, "graphs": graphed and v.run.state == "graphed",
               "median_ms": 1e3 * med, "ratio": med / base, "min_ms": 1e3 * min(v.times),
               "discrete_weights": sum(p.numel() for p in v.discrete)}
        if fused:
            row["ratio_fused"] = med / fused[0]
        if profile:
            row["profile"] = kernel_profile(v, sync)
        rows.append(row)
    return rows


def kernel_profile(v: Variant, sync, steps: int = 5, top: int = 8) -> dict:
    """What one step of ``v`` runs, from torch's profiler over ``steps`` steps: on a GPU its kernels
    (and copies), on a CPU its top-level aten operations; per step, their count and time, and the
    ``top`` largest by time. On a GPU the step time minus the kernel time is what launches and gaps
    cost."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = v.x.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            v.run()
        sync()
    if cuda:
        events = [e for e in prof.events()  # kernels and copies, not the ranges of user annotations
                  if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    else:
        events = [e for e in prof.events() if e.name.startswith("aten::")
                  and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"what": "kernels" if cuda else "aten ops", "per_step": len(events) / steps,
            "ms_per_step": sum(e.time_range.elapsed_us() for e in events) / steps / 1e3,
            "top": [{"name": name[:120], "per_step": len(t) / steps, "ms_per_step": sum(t) / steps / 1e3}
                    for name, t in ranked]}


def main(argv=None):
    p = _scripts.parser(__file__, __doc__)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--models", type=_scripts.models(["mlp", "vgg"]), default="mlp,vgg",
                   help="comma-separated: mlp, vgg")
    p.add_argument("--mlp-width", type=_scripts.units, default=2048)
    p.add_argument("--vgg-width", type=_scripts.width, default=None, help="default: 1.0 on cuda, 0.25 on cpu")
    p.add_argument("--batch", type=_scripts.integer(2), default=100, help="at least 2 (BatchNorm)")
    p.add_argument("--steps", type=_scripts.positive_int, default=20)
    p.add_argument("--warmup", type=_scripts.non_negative_int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the fused (torch.compile) variants")
    p.add_argument("--graphs", action="store_true", help="replay every step from a CUDA graph (CUDA only)")
    p.add_argument("--precision", choices=["fp32", "tf32"], default="fp32",
                   help="tf32: CUDA matmuls and convolutions in TF32")
    p.add_argument("--profile", action="store_true",
                   help="also profile each variant's step: its kernels (CPU: aten operations), count and time")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = _scripts.device(args.device, args.precision, precisions=("fp32", "tf32"))
    if args.graphs and device.type != "cuda":
        p.error(f"--graphs needs a CUDA device, not {device.type}")
    _scripts.check_output(args.json)
    if args.vgg_width is None:
        args.vgg_width = 1.0 if device.type == "cuda" else 0.25
    rows = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    try:
        with _scripts.out_of_memory("choose a smaller --mlp-width, --vgg-width or --batch"):
            for name in args.models:
                rows += measure(name, args, device, graphed=args.graphs, profile=args.profile)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
           "steps": args.steps, "mlp_width": args.mlp_width, "vgg_width": args.vgg_width, "graphs": args.graphs,
           "precision": args.precision}
    graphs = ", CUDA graphs" if args.graphs else ""
    print(f"# step time vs float Adam ({env['device']}, torch {env['torch']}, {env['threads']} threads, "
          f"batch {args.batch}, {args.steps} round-robin steps, {args.precision}{graphs})")
    fused = any("ratio_fused" in r for r in rows)
    print(f"{'model':<5} {'variant':<20} {'median ms':>10} {'min ms':>9} {'ratio':>7}"
          + (f" {'vs fused':>9}" if fused else ""))
    for r in rows:
        eager = "  (capture failed: eager)" if args.graphs and not r["graphs"] else ""
        vs_fused = f" {r['ratio_fused']:>9.3f}" if "ratio_fused" in r else ""
        print(f"{r['model']:<5} {r['variant']:<20} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['ratio']:>7.3f}"
              f"{vs_fused}{eager}")
    for r in rows:
        if "profile" in r:
            prof = r["profile"]
            print(f"\n{r['model']} {r['variant']}: {prof['per_step']:.0f} {prof['what']} per step, "
                  f"{prof['ms_per_step']:.3f} ms of them per step")
            for t in prof["top"]:
                print(f"  {t['ms_per_step']:8.3f} ms  x{t['per_step']:<5g} {t['name']}")
    if args.json:
        _scripts.write_json(args.json, {"env": env, "rows": rows})


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
