"""Lowering torch models to the graph IR, checked against the torch model through an independent
torch interpreter of the IR (tests/ir_torch.py)."""

import ir_torch
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ternarize import LoweringError, lower, zoo
from ternarize.lowering import detect_kind, split_discrete
from ternarize.testing import project, randomize_batchnorm


def _randomize_batchnorm(model, negative=True):
    randomize_batchnorm(model)
    if not negative:
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.data.abs_().add_(0.1)


def _ternarize(model, mode="ternary"):
    return project(model, mode, density=2 / 3)


def _check(model, shape, discrete=None, rtol=1e-5):
    model.eval()
    x = torch.randn(16, *shape)
    graph = lower(model, x[:1], discrete)
    with torch.no_grad():
        ref = model(x).numpy()
    out = ir_torch.run(graph, x.numpy())
    assert np.abs(out - ref).max() <= rtol * np.abs(ref).max()
    return graph


ZOO = [("mlp", (1, 28, 28), {"width": 32}), ("vgg", (1, 28, 28), {"width": 0.125}),
       ("vgg", (3, 32, 32), {"width": 0.125}), ("lenet", (1, 28, 28), {}), ("resnet", (3, 32, 32), {"width": 8}),
       ("resnet", (1, 28, 28), {"width": 8, "blocks": 2})]


@pytest.mark.parametrize("name, shape, kw", ZOO, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s, _ in ZOO])
@pytest.mark.parametrize("mode", ["ternary", "binary"])
def test_every_zoo_model_lowers_exactly(name, shape, kw, mode):
    torch.manual_seed(0)
    model = zoo.create(name, in_shape=shape, **kw)
    _randomize_batchnorm(model)
    discrete = _ternarize(model, mode)
    graph = _check(model, shape, discrete)
    assert set(graph.discrete_weights()) == set(discrete)
    for w in graph.discrete_weights():
        data = graph.consts[w].data
        assert data.dtype == np.int8 and set(np.unique(data)) <= ({-1, 0, 1} if mode == "ternary" else {-1, 1})
    assert not any(n.op == "channel_affine" for n in graph.nodes if name in ("mlp", "lenet"))  # all folded
    assert _check(model, shape).discrete_weights() == graph.discrete_weights()  # detection finds the same


def test_theta_and_scale_are_recovered_bit_for_bit():
    w = np.array([[0.25, 0, -0.25, 0.25], [0, 0, 0, 0], [-3.0, 3.0, 3.0, -3.0]], np.float32)
    theta, scale = split_discrete(w, "ternary")
    assert theta.tolist() == [[1, 0, -1, 1], [0, 0, 0, 0], [-1, 1, 1, -1]]
    assert np.array_equal(scale[:, None] * theta, w)
    assert detect_kind(w) == "ternary" and detect_kind(np.abs(w[2:]) + 1) == "binary"
    assert detect_kind(np.array([[0.1, 0.2]], np.float32)) == "float32"
    assert detect_kind(np.array([[0.8], [-0.0075], [0.3]], np.float32)) == "float32"  # Linear(1, N) of floats
    assert detect_kind(np.array([[0.5], [0.0], [-0.5]], np.float32)) == "ternary"
    assert detect_kind(np.zeros((0, 3), np.float32)) == detect_kind(np.zeros((2, 2), np.float32)) == "float32"
    dense_but_one_zero_row = np.array([[0.5, -0.5], [0, 0], [-0.25, 0.25]], np.float32)
    assert detect_kind(dense_but_one_zero_row) == "ternary"  # not binary: a binary weight holds no 0
    model = nn.Sequential(nn.Linear(2, 3))
    model[0].weight.data = torch.from_numpy(dense_but_one_zero_row)
    graph = lower(model, torch.zeros(1, 2))
    assert graph.consts["0.weight"].kind == "ternary"
    with pytest.raises(LoweringError, match="not ternary: row 0"):
        split_discrete(np.array([[0.5, 0.25]], np.float32), "ternary", "fc.weight")
    with pytest.raises(LoweringError, match="should be binary but holds 0"):
        split_discrete(w, "binary")


def test_declared_discrete_weight_that_is_not_discrete_is_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(LoweringError, match="'0.weight' is not ternary"):
        lower(model, torch.zeros(1, 4), {"0.weight": "ternary"})


def test_batchnorm_folds_through_maxpool_only_when_every_multiplier_is_positive():
    def block():
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU())

    pos, neg = block(), block()
    _randomize_batchnorm(pos, negative=False)
    _randomize_batchnorm(neg, negative=True)
    neg[2].weight.data[0] = -1.0
    disc = _ternarize(pos) | _ternarize(neg)
    assert "channel_affine" not in [n.op for n in _check(pos, (2, 8, 8), disc).nodes]
    assert "channel_affine" in [n.op for n in _check(neg, (2, 8, 8), disc).nodes]


def test_negative_folded_scales_flip_theta():
    model = nn.Sequential(nn.Linear(5, 3, bias=False), nn.BatchNorm1d(3))
    _randomize_batchnorm(model)
    model[1].weight.data[:] = torch.tensor([-1.0, 0.5, -2.0])
    disc = _ternarize(model)
    graph = _check(model, (5,), disc)
    scale = graph.consts["0.scale"].data
    assert (scale >= 0).all()
    assert np.array_equal(graph.consts["0.weight"].data[0], -np.sign(model[0].weight.detach().numpy()[0]))


class Functional(nn.Module):
    """Functional calls, methods and reused modules that fx records as functions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1, groups=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.act = nn.LeakyReLU(0.2)
        self.fc = nn.Linear(8 * 4 * 4 * 2, 10)

    def forward(self, x):
        y = self.act(self.conv(x))
        z = F.hardtanh(self.grouped(y), -0.5, 0.5)
        y = torch.cat([y, z + y], dim=1)
        y = F.avg_pool2d(y, 2, ceil_mode=True, count_include_pad=False)
        y = y.view(y.size(0), -1)
        return F.log_softmax(self.act(self.fc(y)), dim=-1)


def test_functional_ops_methods_and_reused_modules():
    model = Functional()
    graph = _check(model, (3, 16, 16))
    ops = [n.op for n in graph.nodes]
    for op in ("conv2d", "leaky_relu", "hardtanh", "concat", "add", "avgpool2d", "flatten", "linear", "log_softmax"):
        assert op in ops, op
    assert len({n.name for n in graph.nodes}) == len(graph.nodes)  # the reused LeakyReLU gets unique names


def test_noops_disappear_and_reshape_keeps_shape():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop, self.id, self.fc = nn.Dropout(0.5), nn.Identity(), nn.Linear(12, 6)

        def forward(self, x):
            return F.softmax(self.fc(self.id(self.drop(x))).reshape(x.shape[0], 2, 3), dim=2)

    graph = _check(Net(), (12,))
    assert [n.op for n in graph.nodes] == ["linear", "reshape", "softmax"]
    assert graph.nodes[1].attrs == {"shape": [2, 3]}


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.GELU()), r"unsupported module GELU at '2'"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect", padding=1)), "padding_mode='reflect'"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(3)), r"output size \[3, 3\]"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)), "no running statistics"),
    (nn.Sequential(nn.Conv2d(1, 2, 1), nn.Linear(4, 3)), r"Linear at '1' takes an input of rank 4; only \(batch, "
                                                          r"features\) inputs are supported: flatten first"),
])
def test_unsupported_things_are_named(model, message):
    with pytest.raises(LoweringError, match=message):
        lower(model, torch.zeros(1, 1, 4, 4))


class _Inner(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv, self.fn = nn.Conv2d(1, 2, 1), fn

    def forward(self, x):
        return self.fn(self.conv(x))


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x, y):
        return self.fc(x.flatten(1)) + y


@pytest.mark.parametrize("fn, message", [
    (lambda x: F.softmax(x), "F.softmax at 'softmax' in module '1.1': softmax without an explicit dim"),
    (lambda x: F.log_softmax(x, 0), "F.log_softmax at 'log_softmax' in module '1.1': log_softmax over the "
                                    "batch dimension"),
    (lambda x: torch.cat([x, x], 0), "torch.cat at 'cat' in module '1.1' concatenates along the batch"),
    (lambda x: x.view(-1, 8), r"\.view\(\) at 'view' in module '1.1': a reshape from \[2, 2, 4, 4\] to \[8, 8\]"),
    (lambda x: F.adaptive_avg_pool2d(x, 2), r"F.adaptive_avg_pool2d at 'adaptive_avg_pool2d' in module '1.1' "
                                            r"has output size \[2, 2\]"),
    (lambda x: F.hardtanh(x, 0.5, 0.5), r"F.hardtanh at 'hardtanh' in module '1.1' clamps to \[0.5, 0.5\]"),
], ids=["softmax-no-dim", "log-softmax-batch", "cat-batch", "view-batch", "adaptive-2", "hardtanh-constant"])
def test_functional_calls_are_named_with_their_module(fn, message):
    """A call inside a submodule is named as the call, its fx node and the module it sits in."""
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.ReLU(), _Inner(fn)))  # the call sits in '1.1'
    with pytest.raises(LoweringError, match=message):
        lower(model, torch.zeros(1, 1, 4, 4))


def test_pool_indices_and_two_inputs_are_refused_by_name():
    with pytest.raises(LoweringError, match=r"MaxPool2d at '1' has return_indices=True, which is not supported"):
        lower(nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(2, return_indices=True)), torch.zeros(1, 1, 4, 4))
    pooled = nn.Sequential(nn.Identity(), _Inner(lambda x: F.max_pool2d(x, 2, return_indices=True)[0]))
    with pytest.raises(LoweringError, match=r"F.max_pool2d at 'max_pool2d_with_indices' in module '1' has "
                                            r"return_indices=True, which is not supported"):
        lower(pooled, torch.zeros(1, 1, 4, 4))
    with pytest.raises(LoweringError, match=r"_TwoInputs.forward takes 2 inputs \(x, y\); only models of one input"):
        lower(_TwoInputs(), torch.zeros(1, 1, 4, 4))


def test_unsupported_function_and_batch_mixing_reshape():
    class Sig(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x.flatten(1))

    class Mix(nn.Module):
        def forward(self, x):
            return x.reshape(1, -1)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(LoweringError, match="unsupported operation .*sigmoid"):
        lower(Sig(), torch.zeros(1, 4))
    with pytest.raises(LoweringError, match="changes the batch dimension"):
        lower(Mix(), torch.zeros(1, 4))
    with pytest.raises(LoweringError, match="cannot be traced by torch.fx"):
        lower(Branchy(), torch.zeros(1, 4))
    with pytest.raises(LoweringError, match="TorchScript"):
        lower(torch.jit.script(nn.Linear(2, 2)), torch.zeros(1, 2))


def test_lowering_leaves_the_model_as_it_was():
    model = zoo.create("lenet", in_shape=(1, 8, 8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lower(model, torch.zeros(1, 1, 8, 8))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("layer, shape", [(nn.Linear(0, 2), (1, 0)), (nn.Linear(3, 0), (1, 3))])
def test_a_layer_without_weights_is_refused_by_name(layer, shape):
    with pytest.raises(LoweringError, match=r"at '0' has a weight of shape \(.*0.*\), which holds no weights"):
        lower(nn.Sequential(layer), torch.zeros(shape))
