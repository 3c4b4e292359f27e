"""The paper on one GPU, in one run that fits in 8 minutes (a benchmark, not a test).

(a) step-time ratios float Adam (torch's default and, on CUDA, fused) / E-MSA ternary / binary / STE
    on the paper MLP and the VGG-style CNN (bench/train_step.py), in fp32 and, on CUDA, TF32, each
    eager and replayed from a CUDA graph;
(b) the paper's MNIST MLP schedule (784-2048x3-10, batch 100, 250 epochs), ternary then binary,
    each within a time budget: seconds per epoch, time to 98.5 % and 98.8 % test accuracy, final
    accuracy and non-zero fraction;
(c) the VGG-style CNN on Fashion-MNIST, ternary, for a fixed time budget: accuracy and non-zero.

Data comes from a data root holding mnist/ and fashion-mnist/ IDX files (raw or .gz), as
`ternarize data fetch` lays them out; nothing is downloaded. Writes OUT/paper.json and
OUT/paper.md. ``--tiny`` shrinks everything so the whole script runs on a CPU in about a minute.
(b) and (c) train with ternarize's loop as it is: on CUDA every step replayed from a CUDA graph.
Device, precision, both datasets and OUT are checked before (a); a problem is one line on stderr
and exit code 2, and a run that fails before writing removes the OUT folder it made. The results
are written again after each step; a step that fails is recorded with its error, the others still
run, and the exit code is 1.

    python bench/paper.py --data-dir ~/.cache/ternarize/data --out bench-out            # GPU
    python bench/paper.py --data-dir ~/.cache/ternarize/data --out bench-out --tiny     # CPU check
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), "examples")]

import paper_mnist  # noqa: E402  (examples/paper_mnist.py)
import train_step  # noqa: E402  (bench/train_step.py)

from ternarize import _io, _scripts, zoo  # noqa: E402
from ternarize._text import error_line  # noqa: E402
from ternarize.data import load_dataset  # noqa: E402
from ternarize.train.graphs import StuckCapture  # noqa: E402
from ternarize.train.loop import TrainConfig, fit  # noqa: E402

PAPER = {"ternary": {"acc": 0.9883, "nonzero": 0.018}, "binary": {"acc": 0.9879, "nonzero": None}}
FULL = dict(mlp_width=2048, vgg_width=1.0, steps=30, mlp_budget=130.0, vgg_budget=75.0, train_limit=None,
            epochs=250, vgg_epochs=100)
TINY = dict(mlp_width=128, vgg_width=0.125, steps=4, mlp_budget=20.0, vgg_budget=15.0, train_limit=3000,
            epochs=2, vgg_epochs=1)


def step_ratios(cfg, device, log):
    """(a): every variant of bench/train_step.py, in fp32 and TF32, eager and (on CUDA) replayed
    from a CUDA graph."""
    cuda = device.type == "cuda"
    precisions = ("fp32", "tf32") if cuda else ("fp32",)
    settings = [(p, g) for g in ((False, True) if cuda else (False,)) for p in precisions]
    rows = []
    args = SimpleNamespace(mlp_width=cfg["mlp_width"], vgg_width=cfg["vgg_width"], batch=100, steps=cfg["steps"],
                           warmup=3, no_compile=False)
    failed = []
    try:
        for precision, graphed in settings:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
            for name in ("mlp", "vgg"):
                try:  # one setting's failure leaves the others' rows
                    measured = train_step.measure(name, args, device, graphed=graphed)
                except StuckCapture:  # a failed capture this process cannot recover from: stop the run
                    raise
                except Exception as e:  # noqa: BLE001 - recorded; re-raised after the other settings
                    traceback.print_exc()
                    failed.append(f"{precision} {'graphed' if graphed else 'eager'} {name}: {_one_line(e)}")
                    continue
                for r in measured:
                    rows.append({**r, "precision": precision})
                    how = "graph" if r["graphs"] else "eager"
                    log(f"  {precision} {how} {name:<4} {r['variant']:<20} {r['median_ms']:8.2f} ms  "
                        f"x{r['ratio']:.3f}" + (f"  x{r['ratio_fused']:.3f} of fused" if "ratio_fused" in r else ""))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if failed:
        raise StepFailed(rows, "; ".join(failed))
    return rows


class StepFailed(RuntimeError):
    """Some settings of (a) failed; ``rows`` holds what the others measured."""

    def __init__(self, rows, message):
        super().__init__(message)
        self.rows = rows


def mnist_schedule(cfg, args, log, data, mode):
    log(f"(b) MNIST MLP {cfg['mlp_width']} {mode}, budget {cfg['mlp_budget']:g}s")
    return paper_mnist.run(width=cfg["mlp_width"], epochs=cfg["epochs"], mode=mode, device=args.device,
                           precision=args.precision, data_dir=args.data_dir, time_budget=cfg["mlp_budget"],
                           train_limit=cfg["train_limit"], progress=False, log=log, data=data)


def fashion_vgg(cfg, args, log, data):
    log(f"(c) VGG width {cfg['vgg_width']} on Fashion-MNIST, ternary, budget {cfg['vgg_budget']:g}s")
    if cfg["train_limit"]:
        data.x_train, data.y_train = data.x_train[:cfg["train_limit"]], data.y_train[:cfg["train_limit"]]
    torch.manual_seed(0)
    model = zoo.create("vgg", in_shape=data.in_shape, width=cfg["vgg_width"])
    config = TrainConfig(mode="ternary", epochs=cfg["vgg_epochs"], ema_anneal=0.98, device=args.device,
                         precision=args.precision, progress=False, time_budget=cfg["vgg_budget"])
    t0 = time.perf_counter()
    result = fit(model, data, config, log=log)
    last = result.history[-1]
    return {"width": cfg["vgg_width"], "epochs_run": len(result.history), "wall_seconds": time.perf_counter() - t0,
            "train_seconds": sum(h["seconds"] for h in result.history), "test_acc": last["test_acc"],
            "nonzero": last["nonzero"], "cuda_graphs": result.cuda_graphs, "history": result.history}


def markdown(report) -> str:
    env = report["env"]
    lines = [f"# ternarize on {env['device']} (torch {env['torch']}, {env['date']})", ""]
    lines += ["## (a) step time vs float Adam (batch 100)", ""]
    steps = report.get("steps")
    rows = steps.get("rows", []) if isinstance(steps, dict) else steps or []
    if rows:
        lines += ["| precision | CUDA graph | model | variant | median ms | vs float Adam | vs fused Adam |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['precision']} | {'yes' if r['graphs'] else 'no'} | {r['model']} | {r['variant']} | "
                  f"{r['median_ms']:.2f} | {r['ratio']:.3f} | "
                  + (f"{r['ratio_fused']:.3f} |" if "ratio_fused" in r else "|") for r in rows]
    if isinstance(steps, dict):
        lines += ([""] if rows else []) + [f"failed: {steps['error']}"]
    lines += ["", "## (b) MNIST MLP, the paper's schedule (within the time budget)", ""]
    mnist = report.get("mnist") or {}
    if mnist:
        lines += ["| mode | width | precision | CUDA graph | epochs run | s/epoch | time to 98.5% | time to 98.8% | "
                  "final acc | non-zero | paper |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, s in mnist.items():
        if "error" in s:
            lines.append(f"| {mode} | failed: {s['error']} |")
            continue
        t = s["time_to"]
        when = [f"{t[k]['seconds']:.1f}s (epoch {t[k]['epoch']})" if k in t else "not reached"
                for k in ("0.985", "0.988")]
        paper = PAPER[mode]
        lines.append(f"| {mode} | {s['width']} | {s['precision']} | {s['cuda_graphs']} | {s['epochs_run']} | "
                     f"{s['seconds_per_epoch']:.2f} | {when[0]} | {when[1]} | {100 * s['final_test_acc']:.2f}% | "
                     f"{100 * s['final_nonzero']:.2f}% | {100 * paper['acc']:.2f}%"
                     + (f" / {100 * paper['nonzero']:.1f}%" if paper["nonzero"] else "") + " |")
    lines += ["", "## (c) VGG on Fashion-MNIST, ternary, fixed budget", ""]
    f = report.get("fashion")
    if f and "error" in f:
        lines.append(f"failed: {f['error']}")
    elif f:
        lines += ["| width | CUDA graph | epochs | train s | test acc | non-zero |", "|---|---|---|---|---|---|",
                  f"| {f['width']} | {f['cuda_graphs']} | {f['epochs_run']} | {f['train_seconds']:.1f} | "
                  f"{100 * f['test_acc']:.2f}% | {100 * f['nonzero']:.2f}% |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = _scripts.parser(__file__, __doc__)
    p.add_argument("--data-dir", required=True, help="data root with mnist/ and fashion-mnist/ IDX files")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="for (b) and (c); default tf32 on CUDA, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="a CPU check: everything shrunk, about a minute")
    args = p.parse_args(argv)
    device = _scripts.device(args.device, args.precision or "fp32")
    if device.type != "cuda" and not args.tiny and args.device == "auto":
        p.error("there is no CUDA GPU, and the full run takes hours on a CPU: pass --tiny for the CPU check, "
                "or --device cpu to run it all the same")
    args.device = str(device)
    args.precision = args.precision or ("tf32" if device.type == "cuda" else "fp32")
    cfg = TINY if args.tiny else FULL
    mnist = load_dataset("mnist", data_dir=args.data_dir)  # both now, not minutes into the run
    fashion = load_dataset("fashion-mnist", data_dir=args.data_dir)
    with _scripts.output_folder(args.out, ["paper.json", "paper.md"]):
        text, ok = run(cfg, args, device, mnist, fashion)
    print(text)
    if not ok:
        print("paper.py: a step failed (its traceback is above, its row says 'failed'); the others ran",
              file=sys.stderr)
    return 0 if ok else 1


def run(cfg, args, device, mnist, fashion) -> tuple[str, bool]:
    """Steps (a) to (c); returns the markdown and whether every step ran. OUT/paper.json and
    OUT/paper.md are written again after each step, so a run cut short keeps what it measured. A
    step that fails is recorded as {"error": ...} (its traceback on stderr) and the next one still
    runs: GPU time is too scarce to lose (b) and (c) to a fault in (a)."""
    log = lambda s: print(s, flush=True)  # noqa: E731
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
           "precision": args.precision}
    report = {"env": env, "config": cfg, "seconds": {}}
    failures = []
    attempt = lambda fn: _attempt(fn, failures)  # noqa: E731

    def save():
        text = markdown(report)
        _scripts.write_json(os.path.join(args.out, "paper.json"), report)
        _io.atomic_write(os.path.join(args.out, "paper.md"), text)
        return text

    log(f"(a) step time on {env['device']}")
    t0 = time.perf_counter()
    report["steps"] = attempt(lambda: step_ratios(cfg, device, log))
    report["seconds"]["steps"] = round(time.perf_counter() - t0, 1)
    save()
    report["mnist"] = {}
    for mode in ("ternary", "binary"):
        t0 = time.perf_counter()
        report["mnist"][mode] = attempt(lambda m=mode: mnist_schedule(cfg, args, log, mnist, m))
        report["seconds"][f"mnist_{mode}"] = round(time.perf_counter() - t0, 1)
        save()
    t0 = time.perf_counter()
    report["fashion"] = attempt(lambda: fashion_vgg(cfg, args, log, fashion))
    report["seconds"]["fashion"] = round(time.perf_counter() - t0, 1)
    return save(), not failures


def _attempt(fn, failures: list):
    """fn(), or {"error": "Type: first line"} with the traceback on stderr when it raises; for (a),
    the rows of the settings that ran and the error of those that did not."""
    try:
        return fn()
    except StuckCapture:  # nothing more can run on the GPU in this process
        raise
    except StepFailed as e:
        failures.append("steps")
        return {"rows": e.rows, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded; the run goes on with the next step
        traceback.print_exc()
        failures.append(type(e).__name__)
        return {"error": _one_line(e)}


def _one_line(e: BaseException) -> str:
    """'Type: first line' of an exception, without '|' (it goes into a Markdown table)."""
    return error_line(e, 300).replace("|", "/")


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
