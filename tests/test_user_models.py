"""Models a user writes themselves (not the zoo): functional calls, in-place activations, shared
layers, odd pools and convolutions. Each lowers, and the .tern file (numpy runtime) and the .onnx
file (onnxruntime) agree with the torch model; what cannot be lowered fails with a LoweringError."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ternarize import LoweringError, Runtime, lower, tern
from ternarize import onnx as tonnx
from ternarize.testing import project, randomize_batchnorm


def _agree(tmp_path, model, shape, kind="ternary", density=0.5, discrete="project"):
    """Lower, write both files, run them at batch 1 and 7: each agrees with torch within 1e-4."""
    torch.manual_seed(0)
    randomize_batchnorm(model)
    discrete = project(model, kind, density) if discrete == "project" else discrete
    model.eval()
    graph = lower(model, torch.zeros(1, *shape), discrete)
    tern.write(graph, tmp_path / "m.tern")
    tonnx.export(graph, tmp_path / "m.onnx")
    rt, sess = Runtime.load(tmp_path / "m.tern"), tonnx.session(tmp_path / "m.onnx")
    for batch in (1, 7):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            ref = model(x).numpy()
        for label, got in (("runtime", rt.run(x.numpy())), ("onnxruntime", tonnx.run(sess, x.numpy()))):
            assert got.shape == ref.shape, label
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), f"{label} at batch {batch}"
    return graph


class _Fn(nn.Module):
    """A model whose forward is a function of (self, x), its layers given as keywords."""

    def __init__(self, fn, **layers):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


# ---------------------------------------------------------------------- defects


def test_a_layer_called_twice_keeps_its_weights_when_a_batchnorm_follows_one_call(tmp_path):
    def fn(s, x):  # the BatchNorm must not be folded into fc's shared weight and bias
        return s.out(F.relu(s.fc(F.relu(s.bn(s.fc(x))))))

    model = _Fn(fn, fc=nn.Linear(8, 8), bn=nn.BatchNorm1d(8), out=nn.Linear(8, 3))
    graph = _agree(tmp_path, model, (8,), "binary", 1.0)
    assert [n.op for n in graph.nodes].count("channel_affine") == 1
    _agree(tmp_path, _Fn(fn, fc=nn.Linear(8, 8), bn=nn.BatchNorm1d(8), out=nn.Linear(8, 3)), (8,), discrete={})


@pytest.mark.parametrize("act", ["module", "F.relu", "relu_", "leaky", "hardtanh then relu6"])
def test_an_inplace_activation_overwrites_the_tensor_it_reads(tmp_path, act):
    def fn(s, x):
        y = s.fc(x)
        if act == "module":
            z = s.act(y)
        elif act == "F.relu":
            z = F.relu(y, inplace=True)
        elif act == "relu_":
            z = y.relu_()
        elif act == "leaky":
            z = F.leaky_relu(y, 0.1, True)
        else:  # z is y too, so relu6 overwrites it again
            z = F.hardtanh(y, -0.5, 0.5, True)
            F.relu6(y, inplace=True)
        return s.out(torch.cat([y, z], 1))  # y reads the activated values in torch

    _agree(tmp_path, _Fn(fn, fc=nn.Linear(8, 8), act=nn.ReLU(inplace=True), out=nn.Linear(16, 3)), (8,), density=1.0)


def test_an_augmented_add_that_fx_traces_out_of_place_is_refused():
    def fn(s, x):
        y = s.a(x)
        kept = y
        y += s.b(x)  # fx records y + b: `kept` would read the old y
        return torch.cat([y, kept], 1)

    with pytest.raises(LoweringError, match=r"traces an in-place `y \+= x` as `y \+ x`"):
        lower(_Fn(fn, a=nn.Linear(4, 4), b=nn.Linear(4, 4)), torch.zeros(1, 4))


def test_forward_hooks_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    nn.init.ones_(model[0].bias)  # else a zero input may leave every ReLU output 0, which doubling keeps
    model[1].register_forward_hook(lambda module, inputs, output: output * 2)
    with pytest.raises(LoweringError, match="ReLU at '1' has a forward hook"):
        lower(model, torch.zeros(1, 4))
    model = nn.Sequential(nn.Linear(4, 2))
    model.register_forward_hook(lambda module, inputs, output: output * 2)
    with pytest.raises(LoweringError, match="fx skips the model's own forward hooks"):
        lower(model, torch.zeros(1, 4))


def test_hooks_that_change_nothing_are_fine_and_pre_hooks_that_do_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    nn.init.ones_(model[0].bias)  # some ReLU output must be non-zero for the doubling to show
    seen = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))  # observes only
    _agree(tmp_path, model, (4,))
    assert seen
    model[2].register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))
    with pytest.raises(LoweringError, match="Linear at '2' has a forward hook or pre-hook that changes what it "
                                            "computes"):
        lower(model, torch.zeros(1, 4))


def _view_then_relu_(s, x):
    h = s.fc1(x)
    v = h.view(-1, 4, 4)
    h.relu_()
    return s.fc2(v.flatten(1))  # in torch, v sees the relu; a reshape of the old h would not


def _flatten_relu_then_return_both(s, x):
    h = s.conv(x)
    out = F.relu(h.flatten(1), inplace=True)  # overwrites h's storage too
    return s.fc(torch.cat([out, h.flatten(1)], 1))


def _adaptive_copy_then_relu_(s, x):
    h = s.conv(x)
    p = s.pool(h)  # to h's size: torch copies, the graph reads h itself
    p.relu_()
    return s.fc((h + p).flatten(1))


@pytest.mark.parametrize("fn, layers, shape, says", [
    (_view_then_relu_, dict(fc1=nn.Linear(16, 16), fc2=nn.Linear(16, 10)), (16,), "a view of it ('view')"),
    (_flatten_relu_then_return_both, dict(conv=nn.Conv2d(1, 2, 3, padding=1), fc=nn.Linear(64, 3)), (1, 4, 4),
     "a view of it ('conv')"),
    (_adaptive_copy_then_relu_, dict(conv=nn.Conv2d(1, 2, 3, padding=1), pool=nn.AdaptiveAvgPool2d((4, 4)),
                                     fc=nn.Linear(32, 3)), (1, 4, 4), "a copy of it ('conv')"),
])
def test_an_inplace_op_whose_view_or_copy_is_read_later_is_refused(fn, layers, shape, says):
    with pytest.raises(LoweringError, match=r"overwrites '\w+' in place, and " + re.escape(says) + " is read later"):
        lower(_Fn(fn, **layers), torch.zeros(1, *shape))


def test_an_inplace_op_whose_view_is_not_read_again_lowers(tmp_path):
    def fn(s, x):
        h = s.fc1(x).view(x.shape[0], -1)
        h.relu_()
        return s.fc2(h)

    _agree(tmp_path, _Fn(fn, fc1=nn.Linear(8, 8), fc2=nn.Linear(8, 3)), (8,), density=1.0)


def test_a_model_random_in_eval_mode_is_refused_as_such():
    noisy = _Fn(lambda s, x: s.fc(x), fc=nn.Linear(4, 2))
    noisy.register_forward_hook(lambda m, i, out: out + torch.rand_like(out))
    with pytest.raises(LoweringError, match="different outputs for the same input in eval mode"):
        lower(noisy, torch.ones(1, 4))
    # refused by the call, also where the outputs agree by chance (dropout of zeros, or of everything)
    says = r"F.dropout at 'dropout' has training=True, so it drops values at random in eval mode too"
    for p, example in ((0.2, torch.ones(1, 4)), (0.2, torch.zeros(1, 4)), (1.0, torch.ones(1, 4))):
        with pytest.raises(LoweringError, match=says):
            lower(_Fn(lambda s, x, p=p: s.fc(F.dropout(x, p)), fc=nn.Linear(4, 2)), example)  # training=True
    for kwargs in ({"training": False}, {"p": 0.0}):  # the identity: lowers
        lower(_Fn(lambda s, x, kw=kwargs: s.fc(F.dropout(x, **kw)), fc=nn.Linear(4, 2)), torch.ones(1, 4))
    with pytest.raises(LoweringError, match="unsupported operation torch.randn_like"):  # named before any check
        lower(_Fn(lambda s, x: s.fc(x + torch.randn_like(x)), fc=nn.Linear(4, 2)), torch.zeros(1, 4))


def test_parameters_named_like_the_graphs_inputs_and_outputs(tmp_path):
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.input, self.output = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(3, 6))

        def forward(self, x):
            return F.linear(F.relu(F.linear(x, self.input)), self.output)

    graph = _agree(tmp_path, Named(), (4,), discrete={})
    assert {"input.param", "output.param"} <= set(graph.consts)


def test_adaptive_pool_to_a_traced_size(tmp_path):
    def fn(s, x):
        h = s.conv(x)
        return s.fc(F.adaptive_avg_pool2d(h, h.shape[2:]).flatten(1))

    _agree(tmp_path, _Fn(fn, conv=nn.Conv2d(1, 2, 3, padding=1), fc=nn.Linear(2 * 5 * 4, 3)), (1, 5, 4))


def test_a_model_in_training_mode_is_traced_in_eval_mode(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            y = F.relu(self.fc(x))
            if self.training:
                y = y + y
            return self.out(y)

    model = Branchy()
    discrete = project(model, "ternary", 0.5)
    model.train()
    graph = lower(model, torch.zeros(1, 8), discrete)
    assert model.training and "add" not in [n.op for n in graph.nodes]


def test_functional_weights_keep_their_parameter_names(tmp_path):
    class Two(nn.Module):  # two F.linear weights in one module: neither may overwrite the other
        def __init__(self):
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
            self.w2, self.b2 = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
            self.register_buffer("w3", torch.randn(3, 8))

        def forward(self, x):
            return F.linear(F.relu(F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)), self.w3)

    model = _Fn(lambda s, x: s.layer(x), layer=Two())
    with torch.no_grad():
        for p in (model.layer.w1, model.layer.w2):
            p.copy_(torch.sign(p) * (p.abs() > 0.5) * 0.125)
    graph = _agree(tmp_path, model, (8,), discrete={"layer.w1": "ternary", "layer.w2": "ternary"})
    assert sorted(graph.discrete_weights()) == ["layer.w1", "layer.w2"]
    assert {"layer.b1", "layer.b2", "layer.w3"} <= set(graph.consts)


def test_adaptive_pool_with_a_none_size(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d((None, 1)), nn.Flatten(), nn.Linear(4, 2))
    _agree(tmp_path, model, (3, 3, 6))
    with pytest.raises(LoweringError, match=r"AdaptiveAvgPool2d at '1' has output size \[4, 1\]; only 1"):
        lower(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d((None, 1))), torch.zeros(1, 3, 6, 6))


def test_returning_one_tensor_twice_is_refused():
    with pytest.raises(LoweringError, match="returns the same tensor twice"):
        lower(_Fn(lambda s, x: (lambda y: (y, y.contiguous()))(s.fc(x)), fc=nn.Linear(4, 2)), torch.zeros(1, 4))


@pytest.mark.parametrize("fn, message", [
    (lambda s, x: torch.sigmoid(s.fc(x)), r"unsupported operation torch\.sigmoid at 'sigmoid' in module 'block'"),
    (lambda s, x: s.fc(x) * 2, r"unsupported operation operator\.mul at 'mul' in module 'block'"),
    (lambda s, x: s.fc(x) - s.fc(x).mean(), r"unsupported operation \.mean\(\) at 'mean' in module 'block'"),
    (lambda s, x: F.gelu(s.fc(x)), r"unsupported operation F\.gelu at 'gelu' in module 'block'"),
    (lambda s, x: s.fc(x) + 1, r"operator\.add at 'add' in module 'block': only the sum of two tensors"),
], ids=["sigmoid", "mul", "mean", "gelu", "add-constant"])
def test_unsupported_calls_name_the_operation_and_the_module(fn, message):
    model = _Fn(lambda s, x: s.block(x), block=_Fn(fn, fc=nn.Linear(4, 4)))
    with pytest.raises(LoweringError, match=message):
        lower(model, torch.zeros(1, 4))


@pytest.mark.parametrize("layer, shape, name", [
    (nn.GELU(), (4,), "GELU"), (nn.Conv1d(2, 2, 1), (2, 4), "Conv1d"), (nn.LSTM(4, 2), (3, 4), "LSTM"),
    (nn.ConvTranspose2d(2, 2, 3), (2, 4, 4), "ConvTranspose2d"), (nn.Upsample(scale_factor=2), (2, 4, 4), "Upsample"),
])
def test_unsupported_modules_name_the_module_and_its_path(layer, shape, name):
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), layer))
    with pytest.raises(LoweringError, match=rf"unsupported module {name} at '1\.1'"):
        lower(model, torch.zeros(1, *shape))


# ---------------------------------------------------------------------- custom models that work


class _Block(nn.Module):
    """torchvision's BasicBlock: in-place ReLU, `out += identity`."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


@pytest.mark.parametrize("kind, density", [("ternary", 0.05), ("binary", 1.0)])
def test_torchvision_style_resnet(tmp_path, kind, density):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.MaxPool2d(3, 2, 1), _Block(8), _Block(8), nn.AdaptiveAvgPool2d((1, 1)),
                          nn.Flatten(), nn.Linear(8, 10))
    _agree(tmp_path, model, (3, 17, 15), kind, density)


def test_functional_forward_with_views_residuals_and_concat(tmp_path):
    def fn(s, x):
        y = F.relu(s.bn0(s.stem(x)))
        y = torch.add(y, F.leaky_relu(s.dw(y), 0.2))
        y = torch.cat([y, s.branch(y).relu()], 1)
        y = F.avg_pool2d(y, 3, 2, 1, ceil_mode=True, count_include_pad=False)
        y = F.max_pool2d(y, 2, ceil_mode=True)
        y = s.fc1(y.view(y.size(0), -1))
        return F.log_softmax(s.fc2(F.hardtanh(s.bn1(y), -2.0, 2.0)), dim=1)

    model = _Fn(fn, stem=nn.Conv2d(3, 6, (3, 5), padding="same"), bn0=nn.BatchNorm2d(6, affine=False),
                dw=nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6), branch=nn.Conv2d(6, 4, 1, stride=1),
                fc1=nn.Linear(10 * 3 * 3, 16), bn1=nn.BatchNorm1d(16), fc2=nn.Linear(16, 5))
    _agree(tmp_path, model, (3, 9, 11))


def test_batchnorm_first_and_after_activations(tmp_path):
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 4, 3, stride=2), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Dropout(0.3), nn.Flatten(), nn.Linear(4 * 3 * 3, 8, bias=False), nn.ReLU6(),
                          nn.BatchNorm1d(8), nn.Linear(8, 3), nn.Softmax(dim=-1))
    _agree(tmp_path, model, (2, 8, 7))


def test_weights_that_are_already_ternary_are_detected(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 5))
    project(model, "ternary", 0.3)
    graph = _agree(tmp_path, model, (1, 8, 8), discrete=None)
    assert sorted(graph.discrete_weights()) == ["0.weight", "5.weight"]


@pytest.mark.parametrize("kernel, padding, dilation", [(1, 1, 1), (3, 2, 1), (3, 3, 2), ((3, 1), (2, 3), 1)])
def test_a_convolution_may_pad_more_than_half_its_kernel(tmp_path, kernel, padding, dilation):
    conv = nn.Conv2d(2, 4, kernel, padding=padding, dilation=dilation)
    features = conv(torch.zeros(1, 2, 6, 5)).numel()
    _agree(tmp_path, nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(features, 3)), (2, 6, 5))


def test_a_pool_padded_beyond_half_its_kernel_is_refused_as_torch_does():
    with pytest.raises(RuntimeError, match="pad should be"):
        nn.MaxPool2d(2, padding=2)(torch.zeros(1, 1, 6, 6))  # torch refuses it too, so no model has it


def test_batchnorm_without_running_statistics_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                          nn.Linear(4 * 16, 3))
    randomize_batchnorm(model)  # the affine parameters only: there are no running statistics
    with pytest.raises(LoweringError, match=r"BatchNorm at '1' has no running statistics"):
        lower(model.eval(), torch.zeros(1, 2, 6, 6), {})
