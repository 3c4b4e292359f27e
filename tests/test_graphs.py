"""Training steps replayed from a CUDA graph (ternarize.train.graphs and the loop's use of it).

On a CPU the graph machinery is stood in for by a fake whose capture records the step without
running it and whose replay runs it: the loop's side (indices copied into a tensor that stays in
place, the loss summed on the device, warm-up, the short last batch, a failed capture) must then give
exactly the eager run. The CUDA tests compare real graphs with eager steps on a GPU.
"""

import numpy as np
import pytest
import torch
from torch import nn

from ternarize import ConfigError
from ternarize.data import Dataset
from ternarize.train import graphs, loop
from ternarize.train.loop import TrainConfig, fit
from ternarize.train.msa import MSA

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _silent(_):
    pass


def _data(n=250, d=12, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x, xt = (rng.normal(size=(k, 1, 2, d // 2)).astype(np.float32) for k in (n, 64))
    y, yt = (rng.integers(0, classes, k).astype(np.int64) for k in (n, 64))
    return Dataset("synthetic", x, y, xt, yt, classes)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 4, bias=False), nn.BatchNorm1d(4))


class _FakeGraph:
    """Records the step at capture (without running it); replay runs it."""

    made = []

    def __init__(self):
        self.fn, self.replays = None, 0
        _FakeGraph.made.append(self)

    def replay(self):
        self.replays += 1
        self.fn()


@pytest.fixture
def fake_graphs(monkeypatch):
    _FakeGraph.made = []
    monkeypatch.setattr(graphs, "_new_graph", _FakeGraph)
    monkeypatch.setattr(graphs, "_record", lambda graph, fn: setattr(graph, "fn", fn))
    monkeypatch.setattr(graphs.GraphedStep, "_on_side_stream", lambda self: self.fn())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(loop, "_use_graphs", lambda config, dist: config.cuda_graphs != "off")
    return _FakeGraph


def _fit(config, log=_silent, data=None):
    model = _model()
    result = fit(model, data or _data(), config, log=log)
    return model, result


@pytest.mark.parametrize("extra", [dict(mode="ternary"), dict(mode="binary", loss="squared_hinge"),
                                   dict(method="ste"), dict(scale="learned")])
def test_graphed_loop_trains_exactly_like_eager(fake_graphs, extra):
    base = dict(epochs=3, batch_size=32, progress=False, compile="off", **extra)  # 250 = 7 full + a short batch
    eager_model, eager = _fit(TrainConfig(cuda_graphs="off", **base))
    model, result = _fit(TrainConfig(cuda_graphs="auto", **base))
    assert result.cuda_graphs == "on" and eager.cuda_graphs == "off"
    (graph,) = fake_graphs.made
    assert graph.replays == 3 * 7 - graphs.WARMUP  # full batches after the warm-up, capture's own included
    for h, e in zip(result.history, eager.history):
        assert h["train_loss"] == e["train_loss"] and h["test_acc"] == e["test_acc"]
    for (name, p), q in zip(model.state_dict().items(), eager_model.state_dict().values()):
        assert torch.equal(p, q), name


def test_failed_capture_trains_on_eagerly_and_says_so(fake_graphs, monkeypatch):
    def refuse(graph, fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(graphs, "_record", refuse)
    base = dict(epochs=2, batch_size=32, progress=False, compile="off")
    eager_model, eager = _fit(TrainConfig(cuda_graphs="off", **base))
    lines = []
    model, result = _fit(TrainConfig(**base), log=lines.append)
    assert result.cuda_graphs == "failed: RuntimeError: operation not permitted when stream is capturing"
    assert sum("could not be captured in a CUDA graph" in line for line in lines) == 1
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in eager.history]
    for p, q in zip(model.state_dict().values(), eager_model.state_dict().values()):
        assert torch.equal(p, q)


def test_too_few_full_batches_never_capture(fake_graphs):
    _, result = _fit(TrainConfig(epochs=1, batch_size=100, progress=False, compile="off"))  # 2 full batches
    assert result.cuda_graphs == "off" and not fake_graphs.made


def test_graphed_step_warms_up_then_captures_once_and_replays(fake_graphs):
    calls = []
    step = graphs.GraphedStep(lambda: calls.append(1), "cpu", warmup=2)
    for _ in range(5):
        step()
    (graph,) = fake_graphs.made
    assert len(calls) == 5 and graph.replays == 3 and step.state == "graphed"


def test_one_minus_alpha_stays_one_tensor_refilled_in_place():
    w = nn.Parameter(torch.zeros(3, 4))
    opt = MSA([w], mode="ternary", ema_decay=0.9, ema_anneal=0.5, fused=False)
    w.grad = torch.ones(3, 4)
    opt.step()
    (entry,) = opt._alphas.values()
    tensor = entry[1]
    opt.end_epoch()  # a graphed step never calls step() again in Python: end_epoch must refill now
    assert entry[1] is tensor and tensor.item() == np.float32(1 - (1 - 0.5 * (1 - 0.9)))
    opt.step()
    assert opt._alphas[next(iter(opt._alphas))][1] is tensor


def test_cuda_graphs_setting_is_checked():
    with pytest.raises(ConfigError, match="cuda_graphs 'maybe' is unknown"):
        TrainConfig(cuda_graphs="maybe").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda_graphs 'on' needs a CUDA GPU"):
            TrainConfig(cuda_graphs="on", device="cpu").validate()
    TrainConfig(cuda_graphs="off", device="cpu").validate()


def test_cpu_runs_never_use_graphs():
    _, result = _fit(TrainConfig(epochs=1, batch_size=32, progress=False, compile="off", device="cpu"))
    assert result.cuda_graphs == "off"


# ---------------------------------------------------------------------- on a GPU


@CUDA
@pytest.mark.parametrize("extra", [dict(mode="ternary"), dict(mode="binary", loss="squared_hinge"),
                                   dict(method="ste"), dict(scale="learned"), dict(precision="tf32")])
def test_cuda_graphed_training_matches_eager(extra):  # pragma: no cover - GPU machines only
    base = dict(epochs=3, batch_size=32, progress=False, device="cuda", **extra)
    eager_model, eager = _fit(TrainConfig(cuda_graphs="off", **base))
    model, result = _fit(TrainConfig(cuda_graphs="on", **base))
    assert result.cuda_graphs == "on", result.cuda_graphs
    # the same steps, with rounding apart: capturable Adam forms its bias corrections on the device,
    # and in TF32 (10-bit mantissas) a captured matmul may take another cuBLAS kernel than eager
    rtol, atol = (1e-2, 1e-3) if extra.get("precision") == "tf32" else (1e-3, 1e-4)
    for h, e in zip(result.history, eager.history):
        assert h["train_loss"] == pytest.approx(e["train_loss"], rel=rtol, abs=1e-6)
    for (name, p), q in zip(model.state_dict().items(), eager_model.state_dict().values()):
        if name in result.discrete:
            assert (torch.sign(p) == torch.sign(q)).float().mean() >= 0.99, name
        elif p.is_floating_point():
            assert torch.allclose(p, q, rtol=rtol, atol=atol), name


@CUDA
def test_cuda_graph_reads_alpha_after_anneal():  # pragma: no cover - GPU machines only
    w = nn.Parameter(torch.zeros(2, 8, device="cuda"))
    opt = MSA([w], mode="ternary", ema_decay=0.5, ema_anneal=0.5)
    grad = torch.ones(2, 8, device="cuda")

    def step():
        w.grad = grad
        opt.step()

    graphed = graphs.GraphedStep(step, "cuda", warmup=1)
    graphed()
    graphed()  # captured and replayed
    assert graphed.state == "graphed"
    M = opt.state[w]["M"]
    before = M.clone()
    opt.end_epoch()  # 1 - α: 0.5 -> 0.25
    graphed()
    torch.cuda.synchronize()
    expected = before + 0.25 * (-grad * opt.state[w]["scale"].unsqueeze(1) - before)
    assert torch.allclose(M, expected, atol=1e-6)


def test_file_metadata_says_whether_steps_were_graphed():
    from types import SimpleNamespace

    from ternarize import pipeline

    def training(state):
        result = SimpleNamespace(history=[{}], seconds=1.0, resumed=[], cuda_graphs=state)
        meta = pipeline._metadata({}, SimpleNamespace(name="mnist"), TrainConfig(), result, 0.9, 0.9)
        return meta["training"]

    assert "cuda_graphs" not in training("off")
    assert training("on")["cuda_graphs"] == "on"
    assert training("failed: RuntimeError: x")["cuda_graphs"] == "failed: RuntimeError: x"
    assert training("on")["settings"]["cuda_graphs"] == "auto"
