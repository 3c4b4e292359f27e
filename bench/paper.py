"""The paper on one GPU, in one run that fits in 8 minutes (a benchmark, not a test).

(a) step-time ratios float Adam / E-MSA ternary / binary / STE on the paper MLP and the VGG-style
    CNN (bench/train_step.py), in fp32 and, on CUDA, TF32;
(b) the paper's MNIST MLP schedule (784-2048x3-10, batch 100, 250 epochs), ternary then binary,
    each within a time budget: seconds per epoch, time to 98.5 % and 98.8 % test accuracy, final
    accuracy and non-zero fraction;
(c) the VGG-style CNN on Fashion-MNIST, ternary, for a fixed time budget: accuracy and non-zero.

Data comes from a data root holding mnist/ and fashion-mnist/ IDX files (raw or .gz), as
`ternarize data fetch` lays them out; nothing is downloaded. Writes OUT/paper.json and
OUT/paper.md. ``--tiny`` shrinks everything so the whole script runs on a CPU in a few minutes.
Device, precision, both datasets and OUT are checked before (a); a problem is one line on stderr
and exit code 2, and a run that fails before writing removes the OUT folder it made.

    python bench/paper.py --data-dir ~/.cache/ternarize/data --out bench-out            # GPU
    python bench/paper.py --data-dir ~/.cache/ternarize/data --out bench-out --tiny     # CPU check
"""

from __future__ import annotations

import os
import platform
import sys
import time
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE, os.path.join(os.path.dirname(HERE), "examples")]

import paper_mnist  # noqa: E402  (examples/paper_mnist.py)
import train_step  # noqa: E402  (bench/train_step.py)

from ternarize import _io, _scripts, zoo  # noqa: E402
from ternarize.data import load_dataset  # noqa: E402
from ternarize.train.loop import TrainConfig, fit  # noqa: E402

PAPER = {"ternary": {"acc": 0.9883, "nonzero": 0.018}, "binary": {"acc": 0.9879, "nonzero": None}}
FULL = dict(mlp_width=2048, vgg_width=1.0, steps=30, mlp_budget=150.0, vgg_budget=90.0, train_limit=None,
            epochs=250, vgg_epochs=100)
TINY = dict(mlp_width=128, vgg_width=0.125, steps=4, mlp_budget=20.0, vgg_budget=15.0, train_limit=3000,
            epochs=2, vgg_epochs=1)


def step_ratios(cfg, device, precisions, log):
    rows = []
    for precision in precisions:
        args = SimpleNamespace(mlp_width=cfg["mlp_width"], vgg_width=cfg["vgg_width"], batch=100, steps=cfg["steps"],
                               warmup=3, no_compile=False)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        for name in ("mlp", "vgg"):
            for r in train_step.measure(name, args, device):
                rows.append({**r, "precision": precision})
                log(f"  {precision} {name:<4} {r['variant']:<20} {r['median_ms']:8.2f} ms  x{r['ratio']:.3f}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return rows


def mnist_schedule(cfg, args, log, data):
    out = {}
    for mode in ("ternary", "binary"):
        log(f"(b) MNIST MLP {cfg['mlp_width']} {mode}, budget {cfg['mlp_budget']:g}s")
        out[mode] = paper_mnist.run(width=cfg["mlp_width"], epochs=cfg["epochs"], mode=mode, device=args.device,
                                    precision=args.precision, data_dir=args.data_dir, time_budget=cfg["mlp_budget"],
                                    train_limit=cfg["train_limit"], progress=False, log=log, data=data)
    return out


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
            "nonzero": last["nonzero"], "history": result.history}


def markdown(report) -> str:
    env = report["env"]
    lines = [f"# ternarize on {env['device']} (torch {env['torch']}, {env['date']})", "",
             "## (a) step time vs float Adam", "", "| precision | model | variant | median ms | ratio |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['model']} | {r['variant']} | {r['median_ms']:.2f} | {r['ratio']:.3f} |"
              for r in report["steps"]]
    lines += ["", "## (b) MNIST MLP, the paper's schedule (within the time budget)", "",
              "| mode | width | epochs run | s/epoch | time to 98.5% | time to 98.8% | final acc | non-zero | paper |",
              "|---|---|---|---|---|---|---|---|---|"]
    for mode, s in report["mnist"].items():
        t = s["time_to"]
        when = [f"{t[k]['seconds']:.1f}s (epoch {t[k]['epoch']})" if k in t else "not reached"
                for k in ("0.985", "0.988")]
        paper = PAPER[mode]
        lines.append(f"| {mode} | {s['width']} | {s['epochs_run']} | {s['seconds_per_epoch']:.2f} | {when[0]} | "
                     f"{when[1]} | {100 * s['final_test_acc']:.2f}% | {100 * s['final_nonzero']:.2f}% | "
                     f"{100 * paper['acc']:.2f}%" + (f" / {100 * paper['nonzero']:.1f}%" if paper["nonzero"] else "")
                     + " |")
    f = report["fashion"]
    lines += ["", "## (c) VGG on Fashion-MNIST, ternary, fixed budget", "",
              "| width | epochs | train s | test acc | non-zero |", "|---|---|---|---|---|",
              f"| {f['width']} | {f['epochs_run']} | {f['train_seconds']:.1f} | {100 * f['test_acc']:.2f}% | "
              f"{100 * f['nonzero']:.2f}% |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = _scripts.parser(__file__, __doc__)
    p.add_argument("--data-dir", required=True, help="data root with mnist/ and fashion-mnist/ IDX files")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="for (b) and (c); default tf32 on CUDA, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="a few-minute CPU configuration")
    args = p.parse_args(argv)
    device = _scripts.device(args.device, args.precision or "fp32")
    args.device = str(device)
    args.precision = args.precision or ("tf32" if device.type == "cuda" else "fp32")
    cfg = TINY if args.tiny else FULL
    mnist = load_dataset("mnist", data_dir=args.data_dir)  # both now, not minutes into the run
    fashion = load_dataset("fashion-mnist", data_dir=args.data_dir)
    with _scripts.output_folder(args.out, ["paper.json", "paper.md"]):
        text = run(cfg, args, device, mnist, fashion)
    print(text)
    return 0


def run(cfg, args, device, mnist, fashion) -> str:
    """Steps (a) to (c); writes OUT/paper.json and OUT/paper.md and returns the markdown."""
    log = lambda s: print(s, flush=True)  # noqa: E731
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
           "precision": args.precision}
    log(f"(a) step time on {env['device']}")
    report = {"env": env, "config": cfg,
              "steps": step_ratios(cfg, device, ["fp32", "tf32"] if device.type == "cuda" else ["fp32"], log)}
    report["mnist"] = mnist_schedule(cfg, args, log, mnist)
    report["fashion"] = fashion_vgg(cfg, args, log, fashion)
    _scripts.write_json(os.path.join(args.out, "paper.json"), report)
    text = markdown(report)
    _io.atomic_write(os.path.join(args.out, "paper.md"), text)
    return text


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
