"""Train a zoo model in float on a named dataset and save it as model.pt.

The saved file is a whole module made of torch.nn and ternarize.zoo classes, so
``ternarize.load_model("model.pt")`` (and ``ternarize compress model.pt``) load it safely,
without --trust.

Example::

    ternarize data fetch mnist
    python examples/train_float.py --model mlp --data mnist --epochs 1
    ternarize compress model.pt --data mnist
"""

from __future__ import annotations

import argparse
import sys

import torch

import ternarize
from ternarize import zoo
from ternarize.data import load_dataset
from ternarize.train.loop import evaluate, fit_float


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=zoo.names())
    p.add_argument("--data", default="digits", help="digits, mnist, fashion-mnist, cifar10, a .npz file, ...")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--width", type=float, default=None, help="model width (mlp: units; vgg/resnet: multiplier)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="model.pt")
    args = p.parse_args(argv)
    try:
        return run(args)
    except ternarize.Error as e:
        print(f"train_float: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    data = load_dataset(args.data, data_dir=args.data_dir)
    kwargs = {"in_shape": data.in_shape, "num_classes": data.num_classes}
    if args.width is not None:
        kwargs["width"] = int(args.width) if args.model == "mlp" else args.width
    torch.manual_seed(args.seed)
    model = zoo.create(args.model, **kwargs)
    print(f"{args.model} on {args.data}: {sum(p.numel() for p in model.parameters()):,} parameters")
    fit_float(model, data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=args.device,
              seed=args.seed)
    model.cpu().eval()
    _, acc = evaluate(model, torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    print(f"test accuracy {100 * acc:.2f}%")
    ternarize.save_model(model, args.out)  # atomic: never a half-written model.pt
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
