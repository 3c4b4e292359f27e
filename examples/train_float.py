"""Train a zoo model in float on a named dataset and save it as model.pt.

The saved file is a whole module made of torch.nn and ternarize.zoo classes, so
``ternarize.load_model("model.pt")`` (and ``ternarize compress model.pt``) load it safely,
without --trust. Options, device and output are checked before the dataset is loaded; a problem
is one line on stderr and exit code 2.

Example::

    ternarize data fetch mnist
    python examples/train_float.py --model mlp --data mnist --epochs 1
    ternarize compress model.pt --data mnist
"""

from __future__ import annotations

import os
import sys

import torch

import ternarize
from ternarize import _scripts, zoo
from ternarize.data import load_dataset
from ternarize.errors import ConfigError
from ternarize.train.loop import TrainConfig, evaluate, fit_float


def main(argv=None) -> int:
    p = _scripts.parser(__file__, __doc__)
    p.add_argument("--model", default="mlp", choices=zoo.names())
    p.add_argument("--data", default="digits", help="digits, mnist, fashion-mnist, cifar10, a .npz file, ...")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--width", type=_scripts.positive_float, default=None,
                   help="mlp: units per layer; resnet: base channels; vgg: multiplier of the paper's channels "
                        "(lenet has no width)")
    p.add_argument("--epochs", type=_scripts.positive_int, default=5)
    p.add_argument("--lr", type=_scripts.positive_float, default=1e-3)
    p.add_argument("--batch-size", type=_scripts.integer(2), default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=_scripts.seed, default=0)
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay each step from a CUDA graph (auto: on one GPU)")
    p.add_argument("--out", default="model.pt")
    return run(p.parse_args(argv))


def model_options(name: str, width: float | None) -> dict:
    """The ``width`` keyword of zoo model ``name`` for ``--width`` (ConfigError where it does not fit)."""
    if width is None:
        return {}
    if name == "lenet":
        raise ConfigError("--width does not apply to lenet (its layers are fixed); leave it out")
    if name in ("mlp", "resnet") and width != int(width):
        unit = "units per layer" if name == "mlp" else "base channels"
        raise ConfigError(f"--width for {name} counts {unit} and must be a whole number, got {width:g}; "
                          f"give e.g. {max(1, round(width))}")
    limit = 1024 if name == "vgg" else 2**20
    if width > limit:
        raise ConfigError(f"--width {width:g} is too large for {name} (at most {limit}); choose a smaller width")
    return {"width": width if name == "vgg" else int(width)}


def run(args) -> int:
    """Check the options, device and output, then train, evaluate and save."""
    kwargs = model_options(args.model, args.width)
    _scripts.device(args.device)
    TrainConfig(device=args.device, cuda_graphs=args.cuda_graphs).validate()  # 'on' needs a GPU
    _scripts.check_output(args.out, inputs=[args.data])  # before training; never over the dataset
    data = load_dataset(args.data, data_dir=args.data_dir)
    torch.manual_seed(args.seed)
    with _scripts.out_of_memory("choose a smaller --width or --batch-size"):
        model = zoo.create(args.model, in_shape=data.in_shape, num_classes=data.num_classes, **kwargs)
        print(f"{args.model} on {args.data}: {sum(p.numel() for p in model.parameters()):,} parameters")
        fit_float(model, data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=args.device,
                  seed=args.seed, cuda_graphs=args.cuda_graphs)
    model.cpu().eval()
    _, acc = evaluate(model, torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    print(f"test accuracy {100 * acc:.2f}%")
    replaced = os.path.lexists(args.out)
    ternarize.save_model(model, args.out)  # atomic: never a half-written model.pt
    print(f"saved {args.out}" + (" (it replaced the file of that name)" if replaced else ""))
    return 0


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
