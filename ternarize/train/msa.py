"""E-MSA: the extended method of successive approximations for discrete weights.

Q. Li, S. Hao, "An Optimal Control Approach to Deep Learning and Applications to Discrete-Weight
Neural Networks", ICML 2018 (arXiv:1803.01299).

For a linear or convolutional layer the Hamiltonian summed over the batch is Σ_ij θ_ij M_ij with
M = −∂L/∂θ, the ordinary weight gradient at the current discrete weights. Each step, for every
discrete tensor (all layers in parallel):

    M   ← α·M + (1 − α)·(−∂L/∂θ)                            moving average; α anneals per epoch
    ρ_k = ρ · max{|M_ij| : sign(M_ij) ≠ θ_ij}               layer-adaptive (zeros count as wrong)

    ternary  θ ← +1 if M > ρ_k(1 − 2θ) + λ;  −1 if M < −ρ_k(1 + 2θ) − λ;  0 otherwise
             = argmax_{t ∈ {−1,0,1}}  M·t − ρ_k(t − θ)² − λ|t|          (element-wise)
    binary   θ ← sign(M) where |M| > ρ_k, else θ            (sign(0) := +1)
             = argmax_{t ∈ {−1,1}}  M·t − (ρ_k/2)(t − θ)²

The binary penalty is half the ternary one because a binary flip moves θ by 2: with the full
ρ_k(t − θ)² a flip would need |M| > 2ρ_k, and the paper's ρ = 0.5 would then never flip anything.

After ``end_epoch()``: (1 − α) ← η·(1 − α) — the method's learning-rate schedule.

The parameters hold W = s_c·θ, with a per-output-channel scale s_c > 0 (row c of the tensor
viewed as (out_channels, −1)), so the model runs unchanged and ∂L/∂θ = s_c·∂L/∂W:

* ``scale="fixed"``: s stays at its initial value. This is the paper's setting, right for a layer
  followed by BatchNorm, which supplies scale and shift (any constant s is absorbed by it).
* ``scale="learned"``: s is trained with Adam on ∂L/∂s_c = Σ_j θ_cj ∂L/∂W_cj and kept positive. A
  layer with no BatchNorm after it needs this, or its output would be off by a constant factor.

Initialisation (``init``): a tensor already in {−1, 0, +1} (or {−1, +1}) is used as θ with s = 1,
and one already of the form s_c·θ keeps θ and s. Otherwise ``"random"`` draws θ uniformly from the
allowed set (the paper) with s = 1 when the scale is fixed (as in the paper, so M and λ keep the
paper's magnitudes) and s_c = mean|W_c| when it is learned, and ``"twn"`` thresholds the float weights at
Δ_c = 0.7·mean|W_c| with s_c the mean of |W_cj| above Δ_c (Li & Liu, 2016). M starts uniform in
(−1e−6, 1e−6). Random draws come from a generator seeded with ``seed``, so data-parallel ranks agree.

The moving average is summed with compensation (a second float tensor carries each addition's
rounding error), so the small increments of a long schedule are not lost.

The update is fused by ``torch.compile`` where it works (per tensor: a reduction for ρ_k, row by row
and then over the rows, then one element-wise pass writing M, its carry and W; the default on CUDA,
and on CPU for models large enough to repay the compile time), else a few in-place eager passes.
Each mode is compiled as its own function. It never synchronises with the host, and keeps every
changing value in a tensor, so a step that calls it can be captured in a CUDA graph
(:mod:`ternarize.train.graphs`).

Example::

    opt = MSA(discrete_weights, mode="ternary")          # paper defaults: ρ=0.25, λ=1e-7
    for epoch in range(epochs):
        for x, y in loader:
            loss_fn(model(x), y).backward()
            opt.step(); opt.zero_grad()
        opt.end_epoch()
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import ConfigError
from ..lowering import detect_kind
from .ste import TWN_DELTA

MODES = ("ternary", "binary")
DEFAULT_RHO = {"ternary": 0.25, "binary": 0.5}
_COMPILE_MIN_NUMEL = 1 << 20  # on CPU, compile only when the tensors are big enough to repay it


# ---------------------------------------------------------------------- the rules, as pure functions


def threshold(M: torch.Tensor, theta: torch.Tensor, rho, mode: str) -> torch.Tensor:
    """ρ_k = ρ · max |M| over wrong-signed entries (0 when none). Returns a 0-dim tensor."""
    if mode == "ternary":
        wrong = theta * M <= 0  # θ = 0 is always wrong; so is M = 0
    else:
        # sign(M) ≠ θ with sign(0) := +1; an M = 0 adds nothing to the max, so θM < 0 is the same set
        # in effect, and a NaN in M (a NaN gradient) counts as wrong in neither mode: it would make
        # ρ_k NaN and freeze every weight of the tensor, for good
        wrong = theta * M < 0
    masked = torch.where(wrong, M.abs(), torch.zeros((), dtype=M.dtype, device=M.device))
    if masked.dim() >= 2:  # row by row first: compiled for a GPU, one reduction over the whole tensor
        masked = masked.flatten(1).amax(dim=1)  # made the fused step slower than eager; rows run in parallel
    return rho * masked.amax()


def ternary_rule(M: torch.Tensor, theta: torch.Tensor, rho_k, lam) -> torch.Tensor:
    """The closed-form argmax of M·t − ρ_k(t − θ)² − λ|t| over t ∈ {−1, 0, +1}."""
    up = M > rho_k * (1 - 2 * theta) + lam
    down = M < -rho_k * (1 + 2 * theta) - lam
    return torch.where(up, 1.0, torch.where(down, -1.0, 0.0)).to(M.dtype)


def binary_rule(M: torch.Tensor, theta: torch.Tensor, rho_k) -> torch.Tensor:
    """Flip to sign(M) where |M| > ρ_k (sign(0) := +1): the argmax of M·t − (ρ_k/2)(t − θ)²."""
    return torch.where(M.abs() > rho_k, torch.where(M >= 0, 1.0, -1.0).to(M.dtype), theta)


def _msa_update(w, grad, M, M_err, scale, new_scale, one_minus_alpha, rho, lam, mode: str):
    """One E-MSA step on (rows, cols) views, in place.

    ``scale`` is s during the forward pass (∂L/∂θ = s·∂L/∂W); ``new_scale`` is s for the new W.
    ``one_minus_alpha`` is 1 − α itself, not α: α anneals towards 1, where float32 cannot tell it
    from 1 (1 − α below 3e-8, after ~200 epochs at η = 0.95), while 1 − α keeps full precision.
    The moving average is a compensated sum: late in the schedule an increment (1 − α)(g − M) falls
    below half a unit in the last place of M and a plain float32 update would drop it (at η = 0.95
    most entries of M stop moving after ~210 epochs); ``M_err`` carries what each addition lost
    into the next one (Kahan), so M follows the exact average to within one rounding.
    """
    theta = torch.sign(w)  # s > 0, so sign(W) = θ
    target = grad * scale.unsqueeze(1)
    target.neg_()  # −∂L/∂θ
    if M.dtype in (torch.float16, torch.bfloat16):
        _average_wide(M, M_err, target, one_minus_alpha)
    else:
        _average(M, M_err, target, one_minus_alpha)
    rho_k = threshold(M, theta, rho, mode)
    new = ternary_rule(M, theta, rho_k, lam) if mode == "ternary" else binary_rule(M, theta, rho_k)
    w.copy_(new * new_scale.unsqueeze(1))


def _msa_update_ternary(w, grad, M, M_err, scale, new_scale, one_minus_alpha, rho, lam, mode="ternary"):
    """:func:`_msa_update` in ternary mode: compiled on its own, so that each mode has its own
    cache of compiled variants (torch.compile keeps a few per function)."""
    _msa_update(w, grad, M, M_err, scale, new_scale, one_minus_alpha, rho, lam, "ternary")


def _msa_update_binary(w, grad, M, M_err, scale, new_scale, one_minus_alpha, rho, lam, mode="binary"):
    """:func:`_msa_update` in binary mode (see :func:`_msa_update_ternary`)."""
    _msa_update(w, grad, M, M_err, scale, new_scale, one_minus_alpha, rho, lam, "binary")


_BY_MODE = {"ternary": _msa_update_ternary, "binary": _msa_update_binary}


def _average(M, M_err, target, one_minus_alpha) -> None:
    """M ← αM + (1 − α)·target on the exact average M + M_err, in place, compensated (see
    :func:`_msa_update`); three temporaries (the eager fallback's cost is its passes over memory).
    ``target`` is overwritten."""
    moved = torch.lerp(M, target, one_minus_alpha)  # exact at α = 0
    target.sub_(M).mul_(one_minus_alpha)  # the increment
    step = moved - M
    target.sub_(step)  # what rounding dropped of the increment
    M_err.mul_(1 - one_minus_alpha).add_(target)  # the carry: the average's part that M does not hold yet
    torch.add(moved, M_err, out=step)  # the new M
    moved.sub_(step)  # −(new M − moved), exactly
    M_err.add_(moved)  # what M could not take in (Kahan)
    M.copy_(step)


def _average_wide(M, M_err, target, one_minus_alpha) -> None:
    """:func:`_average` for 16-bit M: the average M + M_err is formed and moved in float32, then
    split into the nearest 16-bit M and the rest as the carry. Never compiled (``_use_compile``):
    a kernel computes 16-bit chains in float32 and drops the round trip through 16 bits, so the
    carry would come out 0."""
    exact = M.float() + M_err.float()
    exact = torch.lerp(exact, target.float(), one_minus_alpha.float())
    M.copy_(exact)
    M_err.copy_(exact - M.float())


def _scale_grad(w, grad):
    """∂L/∂s_c = Σ_j θ_cj ∂L/∂W_cj on a (rows, cols) view."""
    return (torch.sign(w) * grad).sum(dim=1)


# ---------------------------------------------------------------------- the optimizer


class MSA(torch.optim.Optimizer):
    """E-MSA over discrete weight tensors; see the module docstring for the rules.

    Args:
        params: the discrete weight tensors (or parameter groups with their own settings).
        mode: ``"ternary"`` or ``"binary"``.
        rho: ρ, the fraction of the largest wrong-signed |M| an entry must exceed to move
            (default 0.25 ternary, 0.5 binary).
        lam: λ, the L1 price of a non-zero ternary weight (default 1e-7).
        ema_decay: α, the initial moving-average decay of M (0.999).
        ema_anneal: η, per-epoch factor on 1 − α (0.95 for MNIST/SVHN, 0.98 for CIFAR-10).
        scale: ``"fixed"`` (BatchNorm follows) or ``"learned"`` (per-channel, Adam).
        scale_lr: Adam learning rate for learned scales.
        init: ``"random"`` (paper) or ``"twn"``; tensors already discrete are kept either way.
        seed: seeds the random initial θ and M.
        fused: ``"auto"``, True or False: fuse the update with torch.compile (16-bit parameters always
            run eager: see ``_average_wide``).
    """

    def __init__(self, params, mode="ternary", rho=None, lam=1e-7, ema_decay=0.999, ema_anneal=0.95,
                 scale="fixed", scale_lr=1e-3, init="random", seed=0, fused="auto"):
        if mode not in MODES:
            raise ConfigError(f"MSA mode {mode!r} is unknown; use 'ternary' or 'binary'")
        rho = DEFAULT_RHO[mode] if rho is None else rho
        _check(0 < rho, f"rho must be positive, got {rho}")
        _check(lam >= 0, f"lam must be >= 0, got {lam}")
        _check(0 <= ema_decay < 1, f"ema_decay must be in [0, 1), got {ema_decay}")
        _check(0 < ema_anneal <= 1, f"ema_anneal must be in (0, 1], got {ema_anneal}")
        _check(scale in ("fixed", "learned"), f"scale must be 'fixed' or 'learned', got {scale!r}")
        _check(init in ("random", "twn"), f"init must be 'random' or 'twn', got {init!r}")
        defaults = dict(mode=mode, rho=rho, lam=lam, ema_decay=ema_decay, ema_anneal=ema_anneal,
                        scale=scale, scale_lr=scale_lr, init=init)
        super().__init__(params, defaults)
        self._fused_setting = fused
        self._compiled = {}
        self._alphas = {}
        generator = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            _check(group["mode"] in MODES, f"MSA mode {group['mode']!r} is unknown")
            for p in group["params"]:
                _check(p.dim() >= 1 and p.numel() > 0, "MSA needs non-empty weight tensors")
                self._initialise(p, group, generator)

    # -- initial state
    @torch.no_grad()
    def _initialise(self, p: torch.Tensor, group: dict, generator: torch.Generator) -> None:
        rows = p.detach().reshape(p.shape[0], -1).float().cpu()
        theta, scale = _as_discrete(rows, group["mode"])
        if theta is None:
            theta, scale = _initial_codes(rows, group["mode"], group["init"], generator)
            if group["init"] == "random" and group["scale"] == "fixed":
                scale = torch.ones_like(scale)  # the paper: θ itself, BatchNorm supplies the scale
        M = (torch.rand(rows.shape, generator=generator) * 2e-6 - 1e-6)
        state = self.state[p]
        state["M"] = M.to(device=p.device, dtype=p.dtype).reshape(p.shape)
        state["M_err"] = torch.zeros_like(state["M"])  # the compensated sum's carry (see _msa_update)
        state["scale"] = scale.to(device=p.device, dtype=p.dtype)
        if group["scale"] == "learned":
            state["scale_step"] = torch.zeros((), device=p.device)
            state["scale_m"] = torch.zeros_like(state["scale"], dtype=torch.float32)  # see _adam_positive
            state["scale_v"] = torch.zeros_like(state["scale"], dtype=torch.float32)
        p.copy_((scale.unsqueeze(1) * theta).reshape(p.shape).to(p.dtype))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's restore, but the learned scales' Adam moments and step count stay float32 (torch
        casts every state tensor but ``step`` to its parameter's dtype: float16 would flush a small
        second moment to 0, and a bfloat16 count stops at 256). They are taken from ``state_dict``
        as given, so a load_state_dict pre-hook's changes to these three are not seen."""
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            saved = state_dict["state"].get(i, {})
            for key in ("scale_m", "scale_v", "scale_step"):
                if isinstance(saved.get(key), torch.Tensor):
                    self.state[p][key] = saved[key].detach().to(device=p.device, dtype=torch.float32, copy=True)

    # -- schedule
    def end_epoch(self) -> None:
        """Anneal the moving average: (1 − α) ← η·(1 − α)."""
        for group in self.param_groups:
            group["ema_decay"] = 1.0 - group["ema_anneal"] * (1.0 - group["ema_decay"])
            for p in group["params"]:  # now, in place: a step replayed from a CUDA graph reads them there
                self._one_minus_alpha(group, p)

    # -- the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # largest first: each tensor's update is its own, so the order changes no result, but a
        # compiled update times its candidate kernel configurations on its first call only and
        # keeps the fastest for every shape after, so that call is best made on the tensor that
        # dominates the step
        todo = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p, group in sorted(todo, key=lambda pg: -pg[0].numel()):
            self._step_param(p, group)
        return loss

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "M_err" not in state:  # a checkpoint from before the compensated sum
            state["M_err"] = torch.zeros_like(state["M"])
        w, grad, M, M_err = _rows(p), _rows(p.grad), _rows(state["M"]), _rows(state["M_err"])
        scale = new_scale = state["scale"]
        if group["scale"] == "learned":
            new_scale = scale.clone()
            _adam_positive(new_scale, _scale_grad(w, grad), state, group["scale_lr"])
        update = self._update_fn(p, group["mode"])
        one_minus_alpha = self._one_minus_alpha(group, p)
        update(w, grad, M, M_err, scale, new_scale, one_minus_alpha, group["rho"], group["lam"], group["mode"])
        if new_scale is not scale:
            scale.copy_(new_scale)
        if w.data_ptr() != p.data_ptr():  # _rows had to copy (non-contiguous parameter)
            p.copy_(w.reshape(p.shape))
            state["M"].copy_(M.reshape(p.shape))
            state["M_err"].copy_(M_err.reshape(p.shape))

    def _one_minus_alpha(self, group: dict, p: torch.Tensor) -> torch.Tensor:
        """1 − α as a tensor on the parameter's device, refilled in place when α changes (once an
        epoch). One tensor for good: copying a Python float to a GPU every step would make the host
        wait for the device, and a step captured in a CUDA graph keeps reading the tensor it saw.
        The subtraction is done in Python (float64), before the cast to the parameter's dtype, or
        float32 for 16-bit parameters: they average in float32 (_average_wide), and a 16-bit 1 − α
        would be off by up to 0.4 % (bf16) or, late in an anneal, subnormal (fp16)."""
        dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        key = (id(group), p.device, dtype)
        cached = self._alphas.get(key)
        if cached is None:
            cached = [group["ema_decay"], torch.tensor(1.0 - group["ema_decay"], dtype=dtype, device=p.device)]
            self._alphas[key] = cached
        elif cached[0] != group["ema_decay"]:
            cached[1].fill_(1.0 - group["ema_decay"])
            cached[0] = group["ema_decay"]
        return cached[1]

    def _update_fn(self, p: torch.Tensor, mode: str):
        if not self._use_compile(p):
            return _msa_update
        key = (p.device.type, mode)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(_BY_MODE[mode], dynamic=True, fullgraph=True)
        fn = self._compiled[key]
        return _guarded(fn, self, key)

    def _use_compile(self, p: torch.Tensor) -> bool:
        setting = self._fused_setting
        if setting is False or not hasattr(torch, "compile"):
            return False
        if p.dtype in (torch.float16, torch.bfloat16):  # see _average_wide: a kernel would skip its rounding
            return False
        if setting is True:
            return True
        if p.device.type == "cuda":
            return True
        total = sum(q.numel() for g in self.param_groups for q in g["params"])
        return total >= _COMPILE_MIN_NUMEL

    # -- inspection
    def codes(self, p: torch.Tensor) -> torch.Tensor:
        """θ of parameter ``p`` as int8 (W / s)."""
        return torch.sign(p.detach()).to(torch.int8)

    def nonzero_fraction(self) -> torch.Tensor:
        """Fraction of non-zero discrete weights over all tensors, as a 0-dim tensor (no sync)."""
        nz = sum((p.detach() != 0).sum() for g in self.param_groups for p in g["params"])
        total = sum(p.numel() for g in self.param_groups for p in g["params"])
        return nz / total


def _guarded(fn, opt: MSA, key: tuple):
    """Call the compiled update; if compilation fails, warn once and fall back to eager."""

    def call(*args):
        try:
            return fn(*args)
        except Exception as e:  # inductor needs a C++ compiler on CPU; some platforms lack one
            warnings.warn(f"torch.compile of the E-MSA update failed ({type(e).__name__}); using eager", stacklevel=3)
            opt._compiled[key] = _msa_update
            opt._fused_setting = False
            return _msa_update(*args)

    return call


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], -1) if t.is_contiguous() else t.reshape(t.shape[0], -1).clone()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _as_discrete(rows: torch.Tensor, mode: str):
    """(θ, s) if every row already holds only 0 and ±s_c (no zeros for binary), else (None, None):
    the rule by which lowering takes a weight for discrete (``ternarize.lowering.detect_kind``)."""
    kind = detect_kind(rows.detach().float().cpu().numpy())
    if kind == "float32" or (mode == "binary" and kind != "binary"):
        return None, None
    s = rows.abs().amax(dim=1)
    return torch.sign(rows), torch.where(s > 0, s, torch.ones_like(s))


def _initial_codes(rows: torch.Tensor, mode: str, init: str, generator: torch.Generator):
    mean_abs = rows.abs().mean(dim=1)
    fallback = torch.where(mean_abs > 0, mean_abs, torch.full_like(mean_abs, 1.0 / math.sqrt(rows.shape[1])))
    if init == "random":
        if mode == "ternary":
            theta = torch.randint(-1, 2, rows.shape, generator=generator).float()
        else:
            theta = torch.randint(0, 2, rows.shape, generator=generator).float() * 2 - 1
        return theta, fallback
    if mode == "binary":
        return torch.where(rows >= 0, 1.0, -1.0), fallback
    delta = TWN_DELTA * mean_abs.unsqueeze(1)
    theta = torch.where(rows > delta, 1.0, torch.where(rows < -delta, -1.0, 0.0))
    big = theta != 0
    count = big.sum(dim=1)
    alpha = torch.where(count > 0, (rows.abs() * big).sum(dim=1) / count.clamp(min=1), fallback)
    return theta, alpha


def _adam_positive(scale, grad, state, lr, betas=(0.9, 0.999), eps=1e-8) -> None:
    """An Adam step on the scales, kept above a tiny positive floor (s_c > 0 always).

    The moments and the step are float32 whatever the scale's dtype (``_initialise`` makes them so
    and ``MSA.load_state_dict`` restores them so): in float16, g² underflows to 0 below
    |g| ≈ 2.4e-4 and eps rounds to 0, which would divide by zero.
    """
    state["scale_step"] += 1
    step = state["scale_step"]
    m, v, g = state["scale_m"], state["scale_v"], grad.float()
    m.lerp_(g, 1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    m_hat = m / (1 - betas[0] ** step)
    v_hat = v / (1 - betas[1] ** step)
    new = scale.float() - lr * m_hat / (v_hat.sqrt() + eps)
    scale.copy_(new.clamp_(min=max(1e-8, torch.finfo(scale.dtype).tiny)))
