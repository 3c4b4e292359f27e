"""Silent defects of the training loop on unusual models and long runs: tied, frozen and
parametrized weights, resuming with an all-zero layer, float64 models."""

import numpy as np
import pytest
import torch
from torch import nn

from ternarize import ConfigError
from ternarize.data import Dataset
from ternarize.train import policy
from ternarize.train.loop import TrainConfig, fit

QUIET = dict(progress=False)


def _silent(_):
    pass


def _data(n=96, d=8, classes=3):
    rng = np.random.default_rng(0)
    x, xt = (rng.normal(size=(k, 1, 1, d)).astype(np.float32) for k in (n, 32))
    y, yt = (rng.integers(0, classes, k).astype(np.int64) for k in (n, 32))
    return Dataset("synthetic", x, y, xt, yt, classes)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.c, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.c.weight = self.a.weight  # one tensor, two layers

    def forward(self, x):
        return self.b(torch.relu(self.c(torch.relu(self.a(x.flatten(1))))))


def test_tied_weight_is_one_discrete_tensor():
    model = _Tied()
    assert [(lay.module, lay.param) for lay in policy.discrete_layers(model)] == [("a", "a.weight"), ("b", "b.weight")]
    assert [lay.module for lay in policy.discrete_layers(model, keep_float=("c",))] == ["b"]  # stays float with c
    result = fit(model, _data(), TrainConfig(epochs=2, **QUIET), log=_silent)  # was a KeyError 'c.weight'
    assert set(result.discrete) == {"a.weight", "b.weight"}
    assert model.c.weight is model.a.weight
    rows = model.a.weight.detach()
    s = rows.abs().amax(1, keepdim=True)
    assert torch.all((rows.abs() == s) | (rows == 0))


def test_frozen_or_parametrized_weight_is_refused_not_left_random():
    frozen = _mlp()
    frozen[1].weight.requires_grad_(False)  # nothing would train it: it kept random codes for good
    with pytest.raises(ConfigError, match="layer '1' is frozen"):
        fit(frozen, _data(), TrainConfig(epochs=1, **QUIET), log=_silent)
    assert [lay.module for lay in policy.discrete_layers(frozen, keep_float=("1",))] == ["3"]
    normed = _mlp()
    normed[1] = nn.utils.parametrizations.weight_norm(normed[1])  # was a KeyError '1.weight'
    with pytest.raises(ConfigError, match="layer '1' is not a parameter"):
        fit(normed, _data(), TrainConfig(epochs=1, **QUIET), log=_silent)


def test_resume_with_an_all_zero_layer_reaches_the_same_weights(tmp_path):
    # a huge λ zeroes every weight; the optimizer's initialisation used to give the resumed run's
    # all-zero tensors fresh random codes for its first step, so the biases came out different
    config = dict(epochs=3, batch_size=32, lam=10.0, scale="fixed", **QUIET)
    straight = _mlp()
    fit(straight, _data(), TrainConfig(checkpoint=str(tmp_path / "a.pt"), **config), log=_silent)
    assert not straight[1].weight.any()
    fit(_mlp(), _data(), TrainConfig(checkpoint=str(tmp_path / "b.pt"), **{**config, "epochs": 2}), log=_silent)
    resumed = _mlp()
    fit(resumed, _data(), TrainConfig(checkpoint=str(tmp_path / "b.pt"), resume=True, **config), log=_silent)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_float64_model_is_told_to_convert():
    with pytest.raises(ConfigError, match=r"parameters are float64 .*model\.float\(\)"):
        fit(_mlp().double(), _data(), TrainConfig(epochs=1, **QUIET), log=_silent)


def test_a_kept_parametrized_layer_is_skipped_before_its_weight_is_read():
    model = _mlp()
    for i in (1, 3):  # a parametrized weight is a new tensor on every access: no stable id
        model[i] = nn.utils.parametrizations.weight_norm(model[i])
    with pytest.raises(ConfigError, match="layer '3' is not a parameter"):
        policy.discrete_layers(model, keep_float=("1",))
    with pytest.raises(ConfigError, match="keeps every layer float"):
        policy.discrete_layers(model, keep_float=("1", "3"))


def test_a_tied_weight_is_lowered_as_one_discrete_tensor(tmp_path):
    import ternarize

    model = _Tied()
    with torch.no_grad():
        for layer in (model.a, model.b):
            layer.weight.copy_(torch.sign(torch.randn_like(layer.weight)) * torch.rand(layer.weight.shape[0], 1))
    graph = ternarize.lower(model.eval(), torch.zeros(1, *_data().in_shape),
                            discrete={"a.weight": "ternary", "b.weight": "ternary"})
    kinds = {n.name: graph.consts[n.inputs[1]].kind for n in graph.nodes if n.op == "linear"}
    assert kinds == {"a": "ternary", "c": "ternary", "b": "ternary"}  # c shares a's weight: was float32
    assert {n.inputs[1] for n in graph.nodes if n.name in ("a", "c")} == {"a.weight"}
