"""The report's cost and size figures (formats/REPORT.md), against numbers worked out by hand."""

import math

import pytest
import torch
from torch import nn

from ternarize import lower, report, tern
from ternarize import onnx as tonnx

# the two weights' codes: a 2 × 1 × 3 × 3 convolution and a 3 × 50 linear layer
CONV = [[[[1, 0, -1], [0, 0, 0], [0, 1, 0]]],
        [[[0, 0, 0], [0, -1, 0], [0, 0, 0]]]]
LINEAR = [[1] + [0] * 49, [0] * 50, [-1, 1, 0, 1] + [0] * 46]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(50, 3)
        with torch.no_grad():
            self.conv.weight.copy_(0.5 * torch.tensor(CONV, dtype=torch.float32))
            self.fc.weight.copy_(0.25 * torch.tensor(LINEAR, dtype=torch.float32))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _flat(nested) -> list:
    return [v for sub in nested for v in (_flat(sub) if isinstance(sub, list) else [sub])]


def _entropy(codes: list) -> float:
    """H(p0, p+, p-) in bits, from the counts."""
    n = len(codes)
    return -sum(k / n * math.log2(k / n) for k in (codes.count(-1), codes.count(0), codes.count(1)) if k)


def test_macs_adds_multiplies_and_entropy_by_hand(tmp_path):
    g = lower(Net(), torch.zeros(1, 1, 5, 5), {"conv.weight": "ternary", "fc.weight": "ternary"})
    path = tmp_path / "model.tern"
    tern.write(g, path)
    rep = report.build(str(path))
    conv, fc = rep.layers
    # the convolution: 18 weights, 4 non-zero, at 5 × 5 output positions, one scale per output value
    assert (conv["weights"], conv["nonzero"]) == (18, 4)
    assert conv["macs"] == 18 * 25 and conv["add_only_macs"] == 4 * 25 and conv["multiplies"] == 2 * 25
    assert conv["outputs"] == 50
    # the linear layer: 150 weights, 4 non-zero, one position; its bias is a float tensor
    assert (fc["weights"], fc["nonzero"]) == (150, 4)
    assert fc["macs"] == 150 and fc["add_only_macs"] == 4 and fc["multiplies"] == 3
    assert conv["plus_fraction"] == pytest.approx(2 / 18) and conv["minus_fraction"] == pytest.approx(2 / 18)
    h_conv, h_fc = _entropy(_flat(CONV)), _entropy(_flat(LINEAR))
    assert conv["entropy_bits"] == pytest.approx(h_conv) and fc["entropy_bits"] == pytest.approx(h_fc)
    t = rep.totals
    assert t["macs"] == 450 + 150 and t["add_only_macs"] == 100 + 4 and t["multiplies"] == 50 + 3
    assert t["discrete_weights"] == 168 == sum(e.count for e in tern.load(str(path)).tensors if e.kind != "float32")
    assert t["float_weights"] == 2 + 3 + 3  # the two scale vectors and the bias
    assert t["nonzero_fraction"] == pytest.approx(8 / 168)
    assert t["entropy_bits_per_discrete_weight"] == pytest.approx((18 * h_conv + 150 * h_fc) / 168)
    assert t["entropy_bits_per_discrete_weight"] != pytest.approx((h_conv + h_fc) / 2)  # weighted, not plain


class Twice(nn.Module):
    """One linear layer called twice: two layers of the graph on one weight tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


def test_a_weight_two_layers_share_counts_once(tmp_path):
    torch.manual_seed(0)
    model = Twice().eval()
    with torch.no_grad():
        model.a.weight.copy_(0.1 * torch.tensor([[1, 0, 0, -1, 0, 0, 0, 0]] * 8, dtype=torch.float32))
        model.b.weight.copy_(0.1 * torch.sign(torch.randn(4, 8)))  # every code non-zero
    g = lower(model, torch.zeros(1, 8), {"a.weight": "ternary", "b.weight": "ternary"})
    assert [n.inputs[1] for n in g.nodes if n.op == "linear"] == ["a.weight", "a.weight", "b.weight"]
    tern.write(g, tmp_path / "model.tern")
    tonnx.export(g, tmp_path / "model.onnx")
    notes = []
    rep = report.load(str(tmp_path), notes)
    t = rep.totals
    assert notes == []  # the ONNX file is recognised as this model's export
    assert t["onnx_bytes"] == (tmp_path / "model.onnx").stat().st_size
    assert t["layers"] == t["discrete_layers"] == 3
    assert t["discrete_weights"] == 64 + 32
    assert t["float_weights"] == 8 + 8 + 4 + 4  # scales and biases
    assert t["nonzero_fraction"] == pytest.approx((16 + 32) / 96)
    assert t["nonzero_fraction"] == pytest.approx(float(tonnx.read_metadata_props(tmp_path / "model.onnx")["sparsity"]))
    h_a, h_b = (_entropy(g.consts[n].data.ravel().tolist()) for n in ("a.weight", "b.weight"))
    assert t["entropy_bits_per_discrete_weight"] == pytest.approx((64 * h_a + 32 * h_b) / 96)
    assert t["macs"] == 64 + 64 + 32 and t["add_only_macs"] == 16 + 16 + 32  # per call


def test_a_file_larger_than_its_float_weights_is_called_larger(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    tern.write(lower(model, torch.zeros(1, 2)), tmp_path / "model.tern")
    rep = report.build(str(tmp_path / "model.tern"))
    ratio = rep.totals["float32_bytes"] / rep.totals["tern_bytes"]
    assert ratio < 1 and f"({1 / ratio:.1f}x larger than float32)" in rep.summary()
    assert report._ratio(30.64) == "30.6x smaller" and report._ratio(0.5) == "2.0x larger"
