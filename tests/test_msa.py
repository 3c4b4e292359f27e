"""E-MSA update rules against brute force, and the optimizer on real layers."""

import copy
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ternarize import MSA, ConfigError
from ternarize.lowering import detect_kind
from ternarize.train.msa import _as_discrete, binary_rule, ternary_rule, threshold

floats = st.floats(min_value=-10, max_value=10, allow_nan=False, width=32)


def brute_force(M, theta, rho_k, lam, allowed, penalty):
    """argmax_t of M·t − penalty·ρ_k(t − θ)² − λ|t| by enumeration; returns (best value, values)."""
    values = {t: M * t - penalty * rho_k * (t - theta) ** 2 - lam * abs(t) for t in allowed}
    return max(values.values()), values


@settings(max_examples=400, deadline=None)
@given(M=st.lists(floats, min_size=1, max_size=30), data=st.data(),
       rho_k=st.floats(min_value=0, max_value=5, width=32), lam=st.floats(min_value=0, max_value=1, width=32))
def test_ternary_rule_is_the_brute_force_argmax(M, data, rho_k, lam):
    theta = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=len(M), max_size=len(M)))
    Mt = torch.tensor(M, dtype=torch.float64)
    th = torch.tensor(theta, dtype=torch.float64)
    new = ternary_rule(Mt, th, rho_k, lam)
    for m, t, n in zip(M, theta, new.tolist()):
        best, values = brute_force(m, t, rho_k, lam, (-1.0, 0.0, 1.0), penalty=1.0)
        assert n in (-1.0, 0.0, 1.0)
        assert values[n] == pytest.approx(best, abs=1e-9), (m, t, rho_k, lam, n, values)


@settings(max_examples=400, deadline=None)
@given(M=st.lists(floats, min_size=1, max_size=30), data=st.data(), rho_k=st.floats(min_value=0, max_value=5, width=32))
def test_binary_rule_is_the_brute_force_argmax(M, data, rho_k):
    theta = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=len(M), max_size=len(M)))
    new = binary_rule(torch.tensor(M, dtype=torch.float64), torch.tensor(theta, dtype=torch.float64), rho_k)
    for m, t, n in zip(M, theta, new.tolist()):
        best, values = brute_force(m, t, rho_k, 0.0, (-1.0, 1.0), penalty=0.5)
        assert values[n] == pytest.approx(best, abs=1e-9), (m, t, rho_k, n, values)


def test_rules_on_exact_cases():
    # θ = 0 moves only past ρ_k + λ; θ = +1 falls to 0 below −ρ_k + λ and to −1 below −3ρ_k − λ
    M = torch.tensor([0.3, 0.2, -0.3, -0.2, -0.3, -0.8, 0.0])
    th = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert ternary_rule(M, th, 0.25, 0.0).tolist() == [1, 0, -1, 0, 0, -1, 1]
    assert binary_rule(torch.tensor([0.6, -0.4, -0.6, 0.0]), torch.tensor([-1.0, 1.0, 1.0, -1.0]), 0.5).tolist() \
        == [1, 1, -1, -1]


def test_threshold_counts_zeros_as_wrong_signed():
    M = torch.tensor([5.0, -1.0, 2.0, -3.0])
    th = torch.tensor([1.0, -1.0, 0.0, 1.0])   # wrong: index 2 (zero) and 3 (sign)
    assert float(threshold(M, th, 0.5, "ternary")) == pytest.approx(0.5 * 3.0)
    thb = torch.tensor([1.0, -1.0, 1.0, 1.0])  # wrong: index 3 only
    assert float(threshold(M, thb, 0.5, "binary")) == pytest.approx(0.5 * 3.0)
    assert float(threshold(M, torch.sign(M), 0.5, "ternary")) == 0.0  # nothing wrong-signed


def _step_by_hand(w, g, M, alpha, rho, lam, mode):
    """The rule written out with numpy loops over elements, for the optimizer check."""
    s = np.abs(w).max(axis=1, keepdims=True)
    theta = np.sign(w)
    M = alpha * M - (1 - alpha) * g * s
    if mode == "ternary":
        wrong = [abs(m) for m, t in zip(M.ravel(), theta.ravel()) if np.sign(m) != t or t == 0]
    else:
        wrong = [abs(m) for m, t in zip(M.ravel(), theta.ravel()) if (1 if m >= 0 else -1) != t]
    rk = rho * max(wrong, default=0.0)
    out = np.empty_like(theta)
    for i, j in itertools.product(*map(range, theta.shape)):
        m, t = M[i, j], theta[i, j]
        if mode == "ternary":
            out[i, j] = 1 if m > rk * (1 - 2 * t) + lam else -1 if m < -rk * (1 + 2 * t) - lam else 0
        else:
            out[i, j] = (1 if m >= 0 else -1) if abs(m) > rk else t
    return out * s, M


@pytest.mark.parametrize("mode", ["ternary", "binary"])
@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_step_matches_hand_written_rule(mode, fused):
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6, 7, dtype=torch.float64))
    opt = MSA([p], mode=mode, ema_decay=0.9, fused=fused)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        w0, M0 = p.detach().numpy().copy(), opt.state[p]["M"].numpy().copy()
        g = p.grad.numpy().copy()
        opt.step()
        w_ref, M_ref = _step_by_hand(w0, g, M0, 0.9, opt.param_groups[0]["rho"], 1e-7, mode)
        np.testing.assert_allclose(opt.state[p]["M"].numpy(), M_ref, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(p.detach().numpy(), w_ref)


def _assert_discrete(p: torch.Tensor, mode: str, scale: torch.Tensor):
    rows = p.detach().reshape(p.shape[0], -1)
    s = scale.reshape(-1, 1)
    assert torch.all(s > 0)
    ok = (rows.abs() == s) | (rows == 0) if mode == "ternary" else rows.abs() == s
    assert torch.all(ok), "every output channel c must hold only {−s_c, 0, +s_c} ({−s_c, +s_c} if binary)"


@pytest.mark.parametrize("layer", [
    torch.nn.Linear(12, 5, bias=False),
    torch.nn.Conv2d(4, 6, 3, padding=1, bias=False),
    torch.nn.Conv2d(4, 6, 3, groups=2, bias=False),
    torch.nn.Conv1d(3, 4, 5, bias=False),
], ids=["linear", "conv2d", "grouped-conv2d", "conv1d"])
@pytest.mark.parametrize("mode", ["ternary", "binary"])
def test_every_step_keeps_the_constraint(layer, mode):
    torch.manual_seed(0)
    layer = layer.double()
    opt = MSA([layer.weight], mode=mode, scale="learned", fused=False)
    _assert_discrete(layer.weight, mode, opt.state[layer.weight]["scale"])
    shape = (2, 4, 8, 8) if isinstance(layer, torch.nn.Conv2d) else (2, 3, 16) if isinstance(layer, torch.nn.Conv1d) \
        else (2, 12)
    for _ in range(5):
        layer(torch.randn(*shape, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        _assert_discrete(layer.weight, mode, opt.state[layer.weight]["scale"])


def test_discrete_tensor_is_kept_with_unit_scale():
    w = torch.nn.Parameter(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]))
    MSA([w])
    assert w.tolist() == [[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]
    v = torch.nn.Parameter(torch.tensor([[0.5, 0.0, -0.5], [0.0, 2.0, 2.0]]))
    opt = MSA([v])
    assert opt.state[v]["scale"].tolist() == [0.5, 2.0]


def test_one_weight_per_row_is_discrete_only_with_one_magnitude():
    """Every row of one float weight is trivially ±s_c: such a tensor (Linear(1, N)) starts from
    random codes with unit scale, as any float layer does, unless all its magnitudes are equal."""
    w = torch.nn.Parameter(torch.tensor([[0.8], [-0.0075], [0.3], [-0.5]]))
    opt = MSA([w], seed=1)
    assert opt.state[w]["scale"].tolist() == [1.0] * 4 and set(w.flatten().tolist()) <= {-1.0, 0.0, 1.0}
    kept = torch.nn.Parameter(torch.tensor([[0.5], [0.0], [-0.5], [0.5]]))
    opt = MSA([kept])
    assert kept.flatten().tolist() == [0.5, 0.0, -0.5, 0.5]
    assert opt.state[kept]["scale"].tolist() == [0.5, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("w", [
    [[0.8], [-0.0075], [0.3], [-0.5]], [[0.5], [0.0], [-0.5], [0.5]], [[0.0], [0.0]], [[0.5, -0.5], [0.0, 0.0]],
    [[0.5, -0.5], [0.25, 0.25]], [[0.5, 0.0], [0.25, -0.25]], [[0.5, 0.25]], [[1.0, -1.0, 1.0]], [[2.0], [2.0]],
])
@pytest.mark.parametrize("mode", ["ternary", "binary"])
def test_msa_and_lowering_take_the_same_weights_for_discrete(w, mode):
    """A weight E-MSA keeps as it is, lowering stores as discrete, and the other way round."""
    t = torch.tensor(w)
    kind = detect_kind(t.numpy())
    theta, _ = _as_discrete(t, mode)
    assert (theta is not None) == (kind == "binary" or (mode == "ternary" and kind == "ternary"))


def test_twn_initialisation():
    w = torch.nn.Parameter(torch.tensor([[1.0, -0.1, 0.9, -1.1], [0.1, 0.1, 0.1, 3.0]]))
    opt = MSA([w], init="twn")
    # row 0: Δ = 0.7·0.775; kept 1, 0.9, −1.1 → α = 1.0; row 1: Δ = 0.7·0.825 → only 3.0
    assert torch.allclose(w, torch.tensor([[1.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 3.0]]))
    assert torch.allclose(opt.state[w]["scale"], torch.tensor([1.0, 3.0]))


def test_random_initialisation_is_seeded_and_uniform():
    a = torch.nn.Parameter(torch.randn(300, 300))
    b = torch.nn.Parameter(a.detach().clone())
    MSA([a], seed=3)
    MSA([b], seed=3)
    assert torch.equal(a, b)
    theta = torch.sign(a)
    fractions = [float((theta == v).float().mean()) for v in (-1, 0, 1)]
    assert all(abs(f - 1 / 3) < 0.01 for f in fractions)


def test_state_dict_round_trip_and_anneal():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4, bias=False)
    opt = MSA([layer.weight], scale="learned")
    layer(torch.randn(3, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    opt.end_epoch()
    assert opt.param_groups[0]["ema_decay"] == pytest.approx(1 - 0.95 * 0.001)
    state = copy.deepcopy(opt.state_dict())  # load_state_dict would share same-device tensors
    other = torch.nn.Linear(8, 4, bias=False)
    other.weight.data.copy_(layer.weight.data)
    opt2 = MSA([other.weight], scale="learned")
    opt2.load_state_dict(state)
    for a, b in ((layer, opt), (other, opt2)):
        a(torch.ones(3, 8)).sum().backward()
        b.step()
    assert torch.equal(layer.weight, other.weight)
    assert opt2.param_groups[0]["ema_decay"] == opt.param_groups[0]["ema_decay"]


@pytest.mark.parametrize("fused", [False, True])
def test_step_updates_the_largest_tensor_first_and_each_as_if_alone(monkeypatch, fused):
    # the order is for a compiled update's one-time kernel tuning; results must not depend on it
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (16, 9), (1, 4), (7, 7)]
    weights = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    alone = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    groups = [{"params": [w], "scale": "learned" if i == 2 else "fixed"} for i, w in enumerate(weights)]
    opt = MSA(groups, seed=1, fused=fused)
    singles = [MSA([{"params": [a], "scale": g["scale"]}], seed=1, fused=fused) for a, g in zip(alone, groups)]
    for w, a, single in zip(weights, alone, singles):  # the same start: codes, M and scales
        a.data.copy_(w.data)
        single.state[a].update({k: v.clone() for k, v in opt.state[w].items()})
    order = []
    real = MSA._step_param
    monkeypatch.setattr(MSA, "_step_param", lambda self, p, g: (order.append(tuple(p.shape)), real(self, p, g)))
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for w, a, g in zip(weights, alone, grads):
            w.grad, a.grad = g, g.clone()
        opt.step()
        for single in singles:
            single.step()
    assert order[:4] == [(16, 9), (7, 7), (3, 5), (1, 4)]
    assert all(torch.equal(w, a) for w, a in zip(weights, alone))


def test_msa_alone_fits_a_separable_problem():
    torch.manual_seed(0)
    centers = torch.randn(3, 10) * 3  # three well separated blobs
    y = torch.arange(256) % 3
    x = centers[y] + 0.5 * torch.randn(256, 10)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(10, 64, bias=False), nn.BatchNorm1d(64, affine=False), nn.ReLU(),
                          nn.Linear(64, 3, bias=False), nn.BatchNorm1d(3, affine=False))
    opt = MSA([model[0].weight, model[3].weight], ema_decay=0.9, ema_anneal=0.9, fused=False)
    for _ in range(60):
        for i in range(0, 256, 32):
            torch.nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
            opt.zero_grad()
        opt.end_epoch()
    model.eval()
    assert float((model(x).argmax(1) == y).float().mean()) == 1.0


def test_torchscript_module_parameters():
    model = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.ReLU()))
    weight = next(model.parameters())
    opt = MSA([weight], fused=False)
    model(torch.randn(3, 5)).sum().backward()
    opt.step()
    _assert_discrete(weight, "ternary", opt.state[weight]["scale"])


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "quaternary"}, "mode"), ({"rho": 0}, "rho"), ({"lam": -1}, "lam"),
    ({"ema_decay": 1.0}, "ema_decay"), ({"ema_anneal": 0}, "ema_anneal"),
    ({"scale": "free"}, "scale"), ({"init": "zeros"}, "init"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MSA([torch.nn.Parameter(torch.randn(2, 2))], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_matches_cpu():  # pragma: no cover - GPU machines only
    torch.manual_seed(0)
    cpu = torch.nn.Parameter(torch.randn(64, 33))
    gpu = torch.nn.Parameter(cpu.detach().cuda())
    a, b = MSA([cpu], fused=False), MSA([gpu], fused=True)
    b.state[gpu]["M"].copy_(a.state[cpu]["M"])
    g = torch.randn_like(cpu)
    cpu.grad, gpu.grad = g, g.cuda()
    a.step()
    b.step()
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach())


def test_learned_scales_of_float16_weights_stay_finite_and_positive():
    """The scales' Adam moments are float32: in float16, small gradients square to 0 and eps rounds
    to 0, which sent every scale to NaN or 0 within a few steps."""
    scales = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        p = torch.nn.Parameter((torch.randn(8, 16) * 0.05).to(dtype))
        opt = MSA([p], mode="ternary", scale="learned", fused=False)
        for step in range(4):
            p.grad = (torch.randn(8, 16) * 1e-5).to(dtype)
            opt.step()
            if step == 1:  # a checkpoint resume: the moments come back as they were, float32
                saved = {k: v.clone() for k, v in opt.state[p].items()}
                opt.load_state_dict(opt.state_dict())
                for key in ("scale_m", "scale_v", "scale_step"):
                    assert torch.equal(opt.state[p][key], saved[key]) and opt.state[p][key].dtype == torch.float32
        state = opt.state[p]
        assert state["scale_m"].dtype == state["scale_v"].dtype == torch.float32
        assert torch.isfinite(state["scale"]).all() and (state["scale"] > 0).all()
        scales[dtype] = state["scale"].float()
    torch.testing.assert_close(scales[torch.float16], scales[torch.float32], rtol=0.1, atol=0)  # θ differs a little
