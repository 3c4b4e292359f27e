"""Reproduce the paper's MNIST experiment: the MLP 784-W-W-W-10 (BatchNorm after every layer)
trained from scratch with ternary or binary E-MSA (Li & Hao, ICML 2018, Table 1).

The paper's settings: W = 2048, batch 100, 55k/5k/10k split, random initial codes, α = 0.999
annealed by η = 0.95 per epoch, ρ = 0.25 / λ = 1e-7 (ternary, cross-entropy) or ρ = 0.5 (binary,
squared hinge), 250 epochs; reported 98.83 % ternary (1.8 % non-zero) and 98.79 % binary.
Prints test accuracy and the non-zero fraction after every epoch, and the training time until
98.5 % and 98.8 % test accuracy.

    ternarize data fetch mnist
    python examples/paper_mnist.py --width 512 --epochs 6          # what a laptop affords
    python examples/paper_mnist.py --device cuda --epochs 250       # the paper's schedule

Options, device, precision and the ``--json`` path are checked before the data is loaded; a
problem is one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import torch

from ternarize import _scripts, zoo
from ternarize.data import load_dataset
from ternarize.train.loop import TrainConfig, fit

TARGETS = (0.985, 0.988)


def run(width=2048, epochs=250, mode="ternary", method="msa", device="auto", precision="fp32", data_dir=None,
        seed=0, time_budget=None, train_limit=None, progress=True, log=print, data=None, compile="auto") -> dict:
    """Train and return {"history": [...], "time_to": {target: seconds}, ...}. ``data`` is MNIST
    already loaded (left unchanged); None loads it from ``data_dir``."""
    data = (data or load_dataset("mnist", data_dir=data_dir)).split_validation(5000 / 60000, seed=seed)
    if train_limit:
        data.x_train, data.y_train = data.x_train[:train_limit], data.y_train[:train_limit]
    torch.manual_seed(seed)
    model = zoo.create("mlp", in_shape=data.in_shape, width=width)
    loss = "cross_entropy" if mode == "ternary" else "squared_hinge"
    config = TrainConfig(method=method, mode=mode, epochs=epochs, batch_size=100, loss=loss, device=device,
                         precision=precision, seed=seed, progress=progress, time_budget=time_budget, compile=compile)
    result = fit(model, data, config, log=log)
    return summarize(result.history, width=width, mode=mode, method=method, epochs_asked=epochs,
                     precision=precision, compile=compile, cuda_graphs=result.cuda_graphs,
                     train_examples=len(data.x_train))


def summarize(history, **info) -> dict:
    elapsed, time_to = 0.0, {}
    for h in history:
        elapsed += h["seconds"]
        for t in TARGETS:
            if h["test_acc"] >= t and str(t) not in time_to:
                time_to[str(t)] = {"seconds": round(elapsed, 2), "epoch": h["epoch"]}
    last = history[-1] if history else {}
    return {**info, "epochs_run": len(history), "train_seconds": round(elapsed, 2),
            "seconds_per_epoch": round(elapsed / max(1, len(history)), 3), "time_to": time_to,
            "final_test_acc": last.get("test_acc"), "final_nonzero": last.get("nonzero"),
            "best_test_acc": max((h["test_acc"] for h in history), default=None), "history": history}


def _reached(summary: dict, target: str) -> str:
    hit = summary["time_to"].get(target)
    return f"{hit['seconds']:.1f} s (epoch {hit['epoch']})" if hit else "not reached"


def main(argv=None) -> int:
    p = _scripts.parser(__file__, __doc__)
    p.add_argument("--width", type=_scripts.units, default=2048)
    p.add_argument("--epochs", type=_scripts.positive_int, default=250)
    p.add_argument("--mode", choices=["ternary", "binary"], default="ternary")
    p.add_argument("--method", choices=["msa", "ste"], default="msa")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="fuse the E-MSA update with torch.compile (auto: on CUDA, and on CPU for large models)")
    p.add_argument("--time-budget", type=_scripts.positive_float, default=None,
                   help="seconds of training; stops after the epoch that exceeds it")
    p.add_argument("--seed", type=_scripts.seed, default=0)
    p.add_argument("--json", default=None, help="write the summary and per-epoch history here")
    args = p.parse_args(argv)
    _scripts.device(args.device, args.precision)
    _scripts.check_output(args.json)  # before training: the history is written only at the end
    with _scripts.out_of_memory("choose a smaller --width"):
        summary = run(args.width, args.epochs, args.mode, args.method, args.device, args.precision,
                      args.data_dir, args.seed, time_budget=args.time_budget, compile=args.compile)
    print(f"{args.mode} {args.method}, width {args.width}: final test accuracy {100 * summary['final_test_acc']:.2f}%, "
          f"non-zero {100 * summary['final_nonzero']:.2f}%, {summary['seconds_per_epoch']:.2f} s/epoch, "
          f"time to 98.5%/98.8%: {_reached(summary, '0.985')} / {_reached(summary, '0.988')}")
    if args.json:
        _scripts.write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
