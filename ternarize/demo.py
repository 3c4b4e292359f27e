"""The embedded default: compress a small MLP trained in float on scikit-learn's 8x8 digits.

Nothing is downloaded. The float model is trained for a few seconds and saved as
``OUT/float_model.pt``; then it goes through exactly what ``ternarize compress`` does. The
schedule is faster than the paper's (batch 50, α = 0.995, λ = 1e-5, 60 epochs of 29 steps) so that
sparsity emerges in under two thousand steps instead of tens of thousands; the paper's defaults
stay the defaults of ``compress``.

Example::

    result = ternarize.demo.run(out="demo")
    print(result.report.summary())
"""

from __future__ import annotations

import os

import torch

from . import zoo
from ._text import printable
from .data import load_dataset
from .load import save_model
from .pipeline import FLOAT_MODEL, CompressResult, OutputFolder, check_out, compress
from .train.loop import fit_float

DEMO_SETTINGS = dict(epochs=60, batch_size=50, ema_decay=0.995, lam=1e-5)


def run(out: str = "demo", force: bool = False, epochs: int | None = None, progress: bool = True,
        log=print) -> CompressResult:
    """Train the float MLP on digits, save it, compress it into ``out``; return the result."""
    check_out(out, force=force, resume=False, resumable=False)
    data = load_dataset("digits")
    # a failure removes what this run wrote, the checkpoint too: the demo has no --resume
    with OutputFolder(out, force=force, resume=False, resumable=False, also=(FLOAT_MODEL,)) as folder:
        torch.manual_seed(0)
        model = zoo.create("mlp", in_shape=data.in_shape, num_classes=data.num_classes, width=256, depth=2)
        log("training the float model: MLP 64-256-256-10 on the 8x8 digits")
        fit_float(model, data, epochs=10, progress=progress, log=log)
        path = os.path.join(out, FLOAT_MODEL)
        folder.add(path)
        save_model(model.cpu(), path)
        settings = dict(DEMO_SETTINGS, progress=progress)
        if epochs is not None:
            settings["epochs"] = epochs
        log(f"compressing {printable(path)} (ternary E-MSA, {settings['epochs']} epochs)")
        return compress(path, data, out=out, force=True, log=log, resumable=False, **settings)
