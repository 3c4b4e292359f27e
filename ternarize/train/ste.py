"""Straight-through baselines with the same interface as :class:`ternarize.MSA`.

* ``mode="binary"``: BinaryConnect (Courbariaux, Bengio, David, NeurIPS 2015). Float latent
  weights L, clipped to [−1, 1]; the model sees W = s_c·sign(L) (sign(0) := +1).
* ``mode="ternary"``: Ternary Weight Networks (Li & Liu, 2016). The model sees W = α_c·t(L) with
  t(L) = +1 where L > Δ_c, −1 where L < −Δ_c, else 0; Δ_c = 0.7·mean|L_c| and
  α_c = mean{|L_cj| : |L_cj| > Δ_c}, per output channel.

The gradient of the loss with respect to the quantized W is used as the gradient of L (the
straight-through estimator) and L is trained with Adam. As with MSA the discrete weights stay
ordinary parameters, so no layer is swapped. BinaryConnect's scale is 1 with ``scale="fixed"``
(BatchNorm follows) and mean|L_c| with ``scale="learned"``; TWN's α_c is part of the method.

Example::

    opt = STE(discrete_weights, mode="ternary", lr=1e-3)   # TWN
    loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

TWN_DELTA = 0.7


def binary_connect(latent: torch.Tensor, scaled: bool) -> torch.Tensor:
    """W = s_c·sign(L) on a (rows, cols) view; s_c = 1, or mean|L_c| when ``scaled``."""
    theta = torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)
    if not scaled:
        return theta
    return theta * latent.abs().mean(dim=1, keepdim=True).clamp(min=1e-8)


def twn(latent: torch.Tensor) -> torch.Tensor:
    """W = α_c·t(L) on a (rows, cols) view with Δ_c = 0.7·mean|L_c| (Li & Liu, 2016)."""
    a = latent.abs()
    delta = TWN_DELTA * a.mean(dim=1, keepdim=True)
    big = a > delta
    alpha = (a * big).sum(dim=1, keepdim=True) / big.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.sign(latent) * big * alpha


class STE(torch.optim.Optimizer):
    """Straight-through training of discrete weights: BinaryConnect (binary) or TWN (ternary).

    Args:
        params: the discrete weight tensors. Their current values become the latent weights.
        mode: ``"binary"`` (BinaryConnect) or ``"ternary"`` (TWN).
        lr, betas, eps: Adam on the latent weights.
        scale: ``"fixed"`` or ``"learned"`` (BinaryConnect only; see the module docstring).
    """

    def __init__(self, params, mode="ternary", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, scale="fixed"):
        if mode not in ("ternary", "binary"):
            raise ConfigError(f"STE mode {mode!r} is unknown; use 'ternary' or 'binary'")
        if not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        super().__init__(params, dict(mode=mode, lr=lr, betas=betas, eps=eps, scale=scale))
        for group in self.param_groups:
            for p in group["params"]:
                latent = p.detach().clone()
                if group["mode"] == "binary":
                    latent.clamp_(-1, 1)
                state = self.state[p]
                state["latent"] = latent
                state["step"] = torch.zeros((), device=p.device)
                state["exp_avg"] = torch.zeros_like(latent)
                state["exp_avg_sq"] = torch.zeros_like(latent)
                self._project(p, group)

    @torch.no_grad()
    def _project(self, p: torch.Tensor, group: dict) -> None:
        latent = self.state[p]["latent"].reshape(p.shape[0], -1)
        if group["mode"] == "binary":
            w = binary_connect(latent, scaled=group["scale"] == "learned")
        else:
            w = twn(latent)
        p.copy_(w.reshape(p.shape))

    def load_state_dict(self, state_dict) -> None:
        """As torch's, but the step counts go to their parameters' devices, where ``step`` counts
        them (torch leaves a ``step`` where the checkpoint had it: a CPU count would not advance in a
        CUDA graph)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    def end_epoch(self) -> None:
        """Nothing to anneal (Adam's learning rate is constant); kept for interface parity with MSA."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                latent, m, v = state["latent"], state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = state["step"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                latent.sub_(group["lr"] * (m / (1 - beta1 ** step)) / denom)
                if group["mode"] == "binary":
                    latent.clamp_(-1, 1)
                self._project(p, group)
        return loss

    def nonzero_fraction(self) -> torch.Tensor:
        nz = sum((p.detach() != 0).sum() for g in self.param_groups for p in g["params"])
        return nz / sum(p.numel() for g in self.param_groups for p in g["params"])
