"""ternarize: compress float PyTorch models into ternary {-1, 0, +1} or binary {-1, +1} models.

The public API. Names are resolved lazily, so ``import ternarize`` (and the numpy-only modules
``ternarize.graph``, ``ternarize.pack``, ``ternarize.tern`` and ``ternarize.runtime``) never import
torch; only touching a torch-backed name such as :class:`ternarize.MSA` does.

Example::

    import ternarize
    model = ternarize.load_model("model.pt")
    result = ternarize.compress(model, "digits", out="out", epochs=3)
    print(result.report.summary())
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import (
    ConfigError,
    DataError,
    Error,
    ExportError,
    GraphError,
    LoweringError,
    ModelLoadError,
    OutputError,
    TernFormatError,
    TrainingError,
    UnsafeModelError,
    VerificationError,
)

# public name -> (module, attribute); attribute None means the module itself
_LAZY = {
    "zoo": ("ternarize.zoo", None),
    "data": ("ternarize.data", None),
    "load_dataset": ("ternarize.data", "load_dataset"),
    "load_model": ("ternarize.load", "load_model"),
    "save_model": ("ternarize.load", "save_model"),
    "MSA": ("ternarize.train.msa", "MSA"),
    "STE": ("ternarize.train.ste", "STE"),
    "TrainConfig": ("ternarize.train.loop", "TrainConfig"),
    "fit": ("ternarize.train.loop", "fit"),
    "Graph": ("ternarize.graph", "Graph"),
    "lower": ("ternarize.lowering", "lower"),
    "Runtime": ("ternarize.runtime", "Runtime"),
    "compress": ("ternarize.pipeline", "compress"),
    "onnx": ("ternarize.onnx", None),
    "demo": ("ternarize.demo", None),
}

__all__ = [
    "__version__",
    "ConfigError",
    "DataError",
    "Error",
    "ExportError",
    "GraphError",
    "LoweringError",
    "ModelLoadError",
    "OutputError",
    "TernFormatError",
    "TrainingError",
    "UnsafeModelError",
    "VerificationError",
    *_LAZY,
]


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'ternarize' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
