"""Synthetic discrete models for tests and benchmarks: zoo models with random BatchNorm statistics
whose weights are projected onto s_c·θ with θ drawn at a chosen non-zero fraction.

Example::

    model, shape = synthetic("mlp", width=256)
    discrete = project(model, "ternary", density=0.05)
    graph = ternarize.lower(model, torch.zeros(1, *shape), discrete)
"""

from __future__ import annotations

import torch
from torch import nn

from . import zoo


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (negative γ included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                mean, var = torch.randn(n, generator=g), torch.rand(n, generator=g) * 1.5 + 0.5
                if m.track_running_stats:
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
    return model


def project(model: nn.Module, kind: str, density: float = 1.0, seed: int = 1) -> dict:
    """Set every Linear/Conv2d weight to s_c·θ (θ non-zero with probability ``density`` for
    ternary, ±1 for binary; s_c in [0.01, 0.11)); return the ``discrete`` map for lower()."""
    g = torch.Generator().manual_seed(seed)
    discrete = {}
    with torch.no_grad():
        for path, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight
                sign = torch.randint(0, 2, w.shape, generator=g).float() * 2 - 1
                keep = (torch.rand(w.shape, generator=g) < density).float() if kind == "ternary" else 1.0
                scale = torch.rand(w.shape[0], generator=g) * 0.1 + 0.01
                w.copy_(sign * keep * scale.reshape(-1, *[1] * (w.dim() - 1)))
                discrete[f"{path}.weight" if path else "weight"] = kind
    return discrete


def synthetic(name: str, width: float | None = None, in_shape=(1, 28, 28), seed: int = 0) -> tuple[nn.Module, tuple]:
    """Zoo model ``name`` ("mlp": ``width`` units; others: width multiplier; None: the zoo's default)
    with random BatchNorm statistics, in eval mode; returns (model, input shape)."""
    torch.manual_seed(seed)
    kwargs = {} if width is None else {"width": int(width) if name == "mlp" else width}
    model = zoo.create(name, in_shape=in_shape, **kwargs)
    return randomize_batchnorm(model, seed).eval(), tuple(in_shape)
