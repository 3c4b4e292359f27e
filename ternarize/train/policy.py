"""Which weights become discrete, and which of them keep a fixed scale.

Default: the weight of every Linear and Conv (1d/2d/3d, any groups) becomes discrete, as in the
paper. ``keep_float`` globs (fnmatch) exclude layers by module path (``features.0``) or parameter
name (``features.0.weight``); the words ``first`` and ``last`` name the first and last such layer
in registration order — the input and classifier layers that XNOR-Net and Larq users keep float.

A discrete layer whose output feeds a BatchNorm (directly, or through max-pool / dropout /
identity) keeps a fixed scale: the BatchNorm supplies it, as in the paper. Every other discrete
layer learns a per-output-channel scale. When the model cannot be traced with torch.fx, every
layer learns its scale (always correct, only slightly more work).

A weight shared by several layers (tied) is one discrete tensor, named as ``named_parameters()``
names it; it stays float if any of its layers is kept float, and learns its scale unless every
one of its layers is followed by a BatchNorm. A frozen weight (``requires_grad=False``) or one that
is not a parameter (a parametrization such as weight_norm) is refused unless its layer is kept
float: nothing would train it, so it would keep its initial discrete values.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import ConfigError

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED_NAMES = {"Linear", "Conv1d", "Conv2d", "Conv3d"}  # TorchScript modules keep their original_name
_PASS_THROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class DiscreteLayer:
    module: str      # module path, e.g. "features.0"
    param: str       # parameter name, e.g. "features.0.weight"
    scale: str       # "fixed" (BatchNorm follows) or "learned"


def candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (path, module) whose weight could become discrete, in registration order."""
    out = []
    for path, m in model.named_modules():
        kind = type(m) if not isinstance(m, torch.jit.ScriptModule) else None
        is_weighted = isinstance(m, _WEIGHTED) or (kind is None and getattr(m, "original_name", "") in _WEIGHTED_NAMES)
        if is_weighted and isinstance(getattr(m, "weight", None), torch.Tensor):
            out.append((path, m))
    return out


def discrete_layers(model: nn.Module, keep_float=(), scale: str = "auto") -> list[DiscreteLayer]:
    """The layers to make discrete, after ``keep_float``; ``scale`` is auto, fixed or learned."""
    if scale not in ("auto", "fixed", "learned"):
        raise ConfigError(f"scale must be auto, fixed or learned, got {scale!r}")
    layers = candidates(model)
    if not layers:
        raise ConfigError("the model has no Linear or Conv layer to make discrete")
    keep = _kept(layers, keep_float)
    followed = _followed_by_batchnorm(model) if scale == "auto" else set()
    names = {}  # each parameter's name in named_parameters(), which lists a shared (tied) one once
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    # a weight tied to a kept layer stays float (ids of real parameters only: a parametrization makes
    # a new tensor on every access)
    kept = {i for path, m in layers if path in keep for i in [id(m.weight)] if i in names}
    out, index = [], {}
    for path, m in layers:
        if path in keep:
            continue
        w = m.weight
        if id(w) in kept:
            continue
        name = names.get(id(w))
        if name is None:
            raise ConfigError(f"the weight of layer {path!r} is not a parameter of the model (a parametrization "
                              "such as weight_norm, or a plain tensor); remove the parametrization, or keep the "
                              f"layer float with --keep-float {path}")
        if not w.requires_grad:
            raise ConfigError(f"the weight of layer {path!r} is frozen (requires_grad=False) and would stay at its "
                              f"initial discrete values; unfreeze it, or keep the layer float with --keep-float {path}")
        s = scale if scale != "auto" else ("fixed" if path in followed else "learned")
        if id(w) in index:  # the same tensor in several layers: one discrete weight, learned scale unless all fixed
            first = out[index[id(w)]]
            if s == "learned" and first.scale != "learned":
                out[index[id(w)]] = DiscreteLayer(first.module, first.param, "learned")
            continue
        index[id(w)] = len(out)
        out.append(DiscreteLayer(path, name, s))
    if not out:
        raise ConfigError(f"--keep-float {' '.join(keep_float)} keeps every layer float; nothing would be compressed")
    return out


def _kept(layers, keep_float) -> set[str]:
    keep = set()
    for pattern in keep_float:
        hits = {layers[0][0]} if pattern == "first" else {layers[-1][0]} if pattern == "last" else {
            path for path, _ in layers
            if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(f"{path}.weight", pattern)}
        if not hits:
            names = ", ".join(p for p, _ in layers[:8]) + (", ..." if len(layers) > 8 else "")
            raise ConfigError(f"--keep-float {pattern!r} matches no Linear/Conv layer (layers: {names})")
        keep |= hits
    return keep


def _followed_by_batchnorm(model: nn.Module) -> set[str]:
    """Module paths of weighted layers whose only consumer chain reaches a BatchNorm."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # untraceable models learn every scale (see module docstring)
        return set()
    modules = dict(gm.named_modules())
    found = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), _WEIGHTED):
            if _reaches_batchnorm(node, modules):
                found.add(node.target)
    return found


def _reaches_batchnorm(node: fx.Node, modules) -> bool:
    for _ in range(8):  # a short chain of pass-through ops at most
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return False
        node = users[0]
        m = modules.get(node.target)
        if isinstance(m, _BATCHNORMS):
            return True
        if not isinstance(m, _PASS_THROUGH):
            return False
    return False
