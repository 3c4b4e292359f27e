"""MSA.step() against msa.md's rules written out element by element in plain Python."""

import random

import numpy as np
import pytest
import torch

from ternarize import MSA


def _sign(m):  # the mathematical sign; sign(0) = 0
    return (m > 0) - (m < 0)


def _oracle_M(M, g, s, alpha):
    """M ← α·M + (1 − α)·(−∂L/∂θ), with ∂L/∂θ_cj = s_c·∂L/∂W_cj; lists of rows."""
    return [[alpha * m + (1 - alpha) * (-gi * sc) for m, gi in zip(rm, rg)] for rm, rg, sc in zip(M, g, s)]


def _oracle_rule(M, W, rho, lam, mode):
    """msa.md's threshold and rules, literally: ρ_k = ρ·max{|M| : sign(M) ≠ W} (zeros wrong-signed)."""
    pairs = [(m, w) for rm, rw in zip(M, W) for m, w in zip(rm, rw)]
    if mode == "ternary":
        wrong = [abs(m) for m, w in pairs if w == 0 or m == 0 or _sign(m) != w]
    else:
        wrong = [abs(m) for m, w in pairs if m == 0 or (1 if m >= 0 else -1) != w]
    rk = rho * max(wrong, default=0.0)
    out = []
    for rm, rw in zip(M, W):
        row = []
        for m, w in zip(rm, rw):
            if mode == "ternary":
                new = 1.0 if m > rk * (1 - 2 * w) + lam else -1.0 if m < -rk * (1 + 2 * w) - lam else 0.0
                # ... which is the argmax of m·t − ρ_k(t − w)² − λ|t| (0 wins a tie)
                values = {t: m * t - rk * (t - w) ** 2 - lam * abs(t) for t in (-1.0, 0.0, 1.0)}
                assert values[new] >= max(values.values()) - 1e-12 * max(1.0, abs(m))
            else:
                new = (1.0 if m >= 0 else -1.0) if abs(m) > rk else w
            row.append(new)
        out.append(row)
    return out


def _rows(t):
    return t.detach().reshape(t.shape[0], -1).double().tolist()


SHAPES = [(1,), (5,), (1, 1), (7, 1), (1, 9), (4, 5), (3, 2, 3, 3)]


@pytest.mark.parametrize("mode", ["ternary", "binary"])
@pytest.mark.parametrize("seed", range(40))
def test_step_matches_plain_python_oracle(mode, seed):
    rnd = random.Random(seed)
    shape = SHAPES[seed % len(SHAPES)]
    scale = "learned" if seed % 3 == 0 else "fixed"
    alpha = rnd.choice([0.0, 0.5, 0.9, 0.999])
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    opt = MSA([p], mode=mode, ema_decay=alpha, scale=scale, seed=seed, fused=False)
    rho, lam = opt.param_groups[0]["rho"], opt.param_groups[0]["lam"]
    for step in range(4):
        g = torch.zeros(shape, dtype=torch.float64) if step == 3 else torch.randn(shape, dtype=torch.float64)
        p.grad = g * 10 ** rnd.uniform(-8, 1)
        W0, G, s0 = _rows(p), _rows(p.grad), opt.state[p]["scale"].tolist()
        # the average so far is M plus the carry of its compensated sum (the rounding M has not taken in)
        M0 = [[m + e for m, e in zip(rm, re)] for rm, re in zip(_rows(opt.state[p]["M"]), _rows(opt.state[p]["M_err"]))]
        codes = [[float(_sign(x)) for x in r] for r in W0]
        opt.step()
        M1 = _rows(opt.state[p]["M"])
        terms = _oracle_M([[abs(x) for x in r] for r in M0], [[-abs(x) for x in r] for r in G], s0, alpha)
        for rm, rr, rt in zip(M1, _oracle_M(M0, G, s0, alpha), terms):
            for a, b, t in zip(rm, rr, rt):
                assert abs(a - b) <= 1e-14 * t, (a, b)
        # the rule on the optimizer's own M (its last-bit rounding must not decide a comparison)
        want = _oracle_rule(M1, codes, rho, lam, mode)
        s1 = opt.state[p]["scale"].tolist()
        assert _rows(p) == [[c * sc for c in r] for r, sc in zip(want, s1)]
        if scale == "fixed":
            assert s1 == s0


def _exact(mode, M, W, rho, lam, fused):
    """One step with α = 0, so M becomes −grad exactly and ties are ties."""
    p = torch.nn.Parameter(torch.tensor(W))
    opt = MSA([p], mode=mode, rho=rho, lam=lam, ema_decay=0.0, fused=fused)
    assert opt.state[p]["scale"].tolist() == [1.0] * len(W)
    p.grad = -torch.tensor(M)
    opt.step()
    assert torch.equal(opt.state[p]["M"], torch.tensor(M))
    if fused:
        assert opt._fused_setting is True, "torch.compile fell back to eager"
    return p.detach().tolist()


# ρ_k = 0.25 · 1.0 (the largest wrong-signed |M| is the θ = 0 entry's 1.0); λ = 0.125; all exact in binary
TERNARY_TIES = (
    [[1.0, 0.375, 0.3759765625, -0.375, 0.0, -0.125, -0.1240234375, -0.875, -0.8759765625, 0.5, 0.125,
      0.1240234375, 0.875, 0.8759765625]],
    [[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0]],
    # θ = 0: up iff M > 0.375, down iff M < −0.375; θ = 1: stays iff M > −0.125, −1 iff M < −0.875
    # θ = −1: up iff M > 0.875, stays iff M < 0.125
    [[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0, -1.0, 0.0, 1.0]],
)
# ρ_k = 0.5 · 1.0: an entry flips iff |M| > 0.5 and sign(M) ≠ θ; sign(0) = +1
BINARY_TIES = (
    [[-1.0, 0.5, 0.5009765625, -0.5, 0.0, 0.0, -0.25]],
    [[1.0, -1.0, -1.0, 1.0, -1.0, 1.0, 1.0]],
    [[-1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0]],
)


@pytest.mark.parametrize("mode, case", [("ternary", TERNARY_TIES), ("binary", BINARY_TIES)])
def test_exact_thresholds_eager(mode, case):
    M, W, want = case
    rho = 0.25 if mode == "ternary" else 0.5
    assert _exact(mode, M, W, rho, 0.125 if mode == "ternary" else 0.0, fused=False) == want
    assert _oracle_rule(M, W, rho, 0.125 if mode == "ternary" else 0.0, mode) == want


def test_exact_thresholds_fused():
    M, W, want = TERNARY_TIES
    assert _exact("ternary", M, W, 0.25, 0.125, fused=True) == want


def test_rho_k_is_per_tensor_not_per_channel():
    # row 1's largest wrong-signed |M| (4.0) sets ρ_k for row 0 too: 0.25·4 + λ = 1.125 > 1.0
    assert _exact("ternary", [[1.0, 0.0], [4.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]], 0.25, 0.125, False) \
        == [[0.0, 1.0], [1.0, 1.0]]


def test_zero_gradients_only_decay_M():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 6))
    opt = MSA([p], ema_decay=0.9, fused=False)
    M0 = opt.state[p]["M"].clone()
    assert M0.abs().max() < 1e-6  # M starts uniform in (−1e−6, 1e−6)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    torch.testing.assert_close(opt.state[p]["M"], M0 * 0.9 ** 3, rtol=1e-5, atol=0)


def test_anneal_is_per_epoch_and_geometric():
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = MSA([p], ema_decay=0.999, ema_anneal=0.98, fused=False)
    for _ in range(5):
        p.grad = torch.randn_like(p)
        opt.step()
    assert opt.param_groups[0]["ema_decay"] == 0.999  # steps do not anneal
    for epoch in range(1, 301):
        opt.end_epoch()
        assert 1 - opt.param_groups[0]["ema_decay"] == pytest.approx(0.001 * 0.98 ** epoch, rel=1e-6)


@pytest.mark.parametrize("mode", ["ternary", "binary"])
def test_late_epochs_still_update_M_in_float32(mode):
    # after 210 epochs at η = 0.95, 1 − α ≈ 2e−8: float32 rounds α itself to 1, so the weight of the
    # gradient must come from 1 − α computed before the cast (it was 0: M froze for the last epochs)
    p = torch.nn.Parameter(torch.randn(4, 8))
    opt = MSA([p], mode=mode, fused=False)
    for _ in range(210):
        opt.end_epoch()
    one_minus = 1 - opt.param_groups[0]["ema_decay"]
    assert one_minus == pytest.approx(0.001 * 0.95 ** 210)
    M0 = opt.state[p]["M"].clone()
    p.grad = torch.full_like(p, -1.0)
    opt.step()
    torch.testing.assert_close(opt.state[p]["M"] - M0, one_minus * (1 - M0), rtol=1e-3, atol=0)


def test_binary_nan_gradient_does_not_freeze_the_tensor():
    # a NaN in M on a θ = +1 entry made ρ_k NaN: no entry of the tensor could flip again, silently
    p = torch.nn.Parameter(torch.tensor([[1.0, 1.0, -1.0, 1.0]]))
    opt = MSA([p], mode="binary", ema_decay=0.0, fused=False)
    p.grad = torch.tensor([[float("nan"), 2.0, -2.0, -0.1]])
    opt.step()
    assert p.detach().tolist() == [[1.0, -1.0, 1.0, 1.0]]  # ρ_k = 0.5·2: the ±2 flip, the NaN one stays
    p.grad = torch.tensor([[0.0, -2.0, 2.0, 0.0]])
    opt.step()
    assert p.detach().tolist() == [[1.0, 1.0, -1.0, 1.0]]


def test_ternary_nan_gradient_touches_only_its_entry():
    p = torch.nn.Parameter(torch.tensor([[1.0, 0.0, -1.0, 1.0]]))
    opt = MSA([p], mode="ternary", ema_decay=0.0, lam=0.0, fused=False)
    p.grad = torch.tensor([[float("nan"), -2.0, -2.0, -0.1]])
    opt.step()
    # ρ_k = 0.25·2 (the θ = 0 and θ = −1 entries are wrong-signed); only the NaN entry falls to 0
    assert p.detach().tolist() == [[0.0, 1.0, 1.0, 1.0]]


@pytest.mark.parametrize("fused", [False, True])
def test_increments_below_half_an_ulp_of_M_still_add_up(fused):
    # at the end of the paper's schedule (1 − α ≈ 3e−9) an increment (1 − α)(g − M) is far below half
    # a unit in the last place of M: a plain float32 update drops every one of them, the compensated
    # sum keeps them, so M follows the float64 average
    p = torch.nn.Parameter(torch.ones(64, 32))
    opt = MSA([p], mode="ternary", ema_decay=1 - 3e-9, fused=fused)
    opt.state[p]["M"].fill_(0.1)  # ulp(0.1) ≈ 7.5e-9; each increment below is about 3e-9 · 0.9
    exact = torch.full((64, 32), 0.1, dtype=torch.float64)
    for _ in range(400):
        p.grad = torch.full_like(p, -1.0)  # −∂L/∂θ = 1
        opt.step()
        exact += (1 - (1 - 3e-9)) * (1.0 - exact)
    moved = opt.state[p]["M"].double() - 0.1
    assert torch.allclose(moved, exact - 0.1, rtol=0.02, atol=0), (moved.mean().item(), (exact - 0.1).mean().item())


def test_a_checkpoint_without_the_carry_still_steps():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = MSA([p], fused=False)
    saved = opt.state_dict()
    for state in saved["state"].values():
        del state["M_err"]  # as a checkpoint written before the compensated sum holds it
    fresh = MSA([p], fused=False)
    fresh.load_state_dict(saved)
    p.grad = torch.randn(3, 4)
    fresh.step()
    assert torch.equal(fresh.state[p]["M_err"].abs() < 1e-6, torch.ones(3, 4, dtype=torch.bool))


@pytest.mark.parametrize("fused", [False, True])
def test_a_bfloat16_average_keeps_increments_below_its_ulp(fused):
    # bf16 has 8 bits: each increment 1e-3·(2 − M) is below half a unit in the last place of M ≈ 1.
    # A compiled kernel computes bf16 chains in float32 and rounds only when it stores, so the
    # compensation must form the average in float32 itself (the fused path had M stay at 1.0)
    p = torch.nn.Parameter(torch.ones(16, 8, dtype=torch.bfloat16))
    opt = MSA([p], mode="ternary", ema_decay=0.999, fused=fused)
    opt.state[p]["M"].fill_(1.0)
    for _ in range(2000):
        p.grad = torch.full_like(p, -2.0)  # −∂L/∂θ = 2 (the scale is 1)
        opt.step()
    average = opt.state[p]["M"].float() + opt.state[p]["M_err"].float()
    assert torch.allclose(average, torch.full_like(average, 2 - 0.999 ** 2000), atol=2e-3), average[0, 0].item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_minus_alpha_of_16_bit_weights_stays_float32(dtype):
    # in the parameter's dtype, 1 - α would be off by up to 0.4 % (bf16), and in fp16 it turns
    # subnormal after 55 anneals at η = 0.95 and 0 after 204
    p = torch.nn.Parameter(torch.zeros(4, 4, dtype=dtype))
    opt = MSA([p], mode="ternary", ema_decay=0.999, ema_anneal=0.95)
    for _ in range(200):
        opt.end_epoch()
    weight = opt._one_minus_alpha(opt.param_groups[0], p)
    assert weight.dtype == torch.float32
    assert weight.item() == float(np.float32(1 - opt.param_groups[0]["ema_decay"]))
