"""Training steps replayed from a CUDA graph (ternarize.train.graphs and the loop's use of it).

On a CPU a CUDA graph is emulated: the capture records the aten operations of the step, with the
very tensors and Python numbers they saw, and undoes what they wrote (a capture runs nothing); a
replay runs those operations again on those tensors, without the step's Python code. What a real
graph would freeze (a number read in Python, a tensor made anew after the capture, a step count kept
on the host) is frozen here too, and an operation that syncs with the host fails the capture as it
does on a GPU. Training with emulated graphs must give exactly the eager run. The CUDA tests compare
real graphs with eager steps on a GPU.
"""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.optim.adam as adam_module
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ternarize import ConfigError, TrainingError
from ternarize.data import Dataset
from ternarize.train import graphs, loop
from ternarize.train.loop import TrainConfig, fit
from ternarize.train.msa import MSA

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
aten = torch.ops.aten
SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


def _silent(_):
    pass


def _data(n=250, d=12, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x, xt = (rng.normal(size=(k, 1, 2, d // 2)).astype(np.float32) for k in (n, 64))
    y, yt = (rng.integers(0, classes, k).astype(np.int64) for k in (n, 64))
    return Dataset("synthetic", x, y, xt, yt, classes)


def _model(dropout=False, sync=False):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(12, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU()]
    layers += [nn.Dropout(0.2)] if dropout else []
    layers += [nn.Linear(32, 4, bias=False), nn.BatchNorm1d(4)]
    return _Syncing(*layers) if sync else nn.Sequential(*layers)


class _Syncing(nn.Sequential):
    """Reads a value on the host in every forward (as a model that logs or branches on data does)."""

    def forward(self, x):
        if x.abs().sum().item() < 0:
            x = -x
        return super().forward(x)


class _Recorder(TorchDispatchMode):
    """The aten operations of a step, with their arguments, and the tensors they write (saved first)."""

    def __init__(self):
        super().__init__()
        self.ops, self.saved = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func})")
        values = list(args) + [kwargs.get(a.name) for a in func._schema.arguments[len(args):]]
        for arg, value in zip(func._schema.arguments, values):
            if arg.alias_info is not None and arg.alias_info.is_write:
                for t in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(t, torch.Tensor):
                        self.saved.append((t, t.detach().clone()))
        if func is aten.native_batch_norm.default:  # writes the running statistics; its schema does not say so
            self.saved += [(t, t.detach().clone()) for t in args[3:5] if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class _EmulatedGraph:
    made = []

    def __init__(self):
        self.ops, self.replays = None, 0
        _EmulatedGraph.made.append(self)

    def replay(self):
        self.replays += 1
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                result = func(*args, **kwargs)
                for r, o in zip(tree_flatten(result)[0], tree_flatten(out)[0]):
                    if isinstance(o, torch.Tensor) and r is not o and o.data_ptr() != r.data_ptr():
                        o.copy_(r)  # into the tensor the later operations read


def _emulated_record(graph, fn, device, stream):
    recorder = _Recorder()
    try:
        with recorder:
            fn()
    finally:  # a capture runs nothing: undo what the recording wrote
        with torch.no_grad():
            for t, saved in reversed(recorder.saved):
                t.copy_(saved)
    graph.ops = recorder.ops


def _eager_warmup(step, check=False):
    step.fn()  # no host sync seen (an emulated capture fails on one)


@pytest.fixture
def emulated(emulated_mixed, monkeypatch):
    """Emulated graphs, and capturable Adam in eager runs too: capturable Adam forms its bias
    corrections in float32 tensors, the eager one in Python floats, so only then are the two
    runs the same to the last bit."""
    optimizers = loop._optimizers
    monkeypatch.setattr(loop, "_optimizers", lambda *a, capturable=False: optimizers(*a, capturable=True))
    return emulated_mixed


@pytest.fixture
def emulated_mixed(monkeypatch):
    _EmulatedGraph.made = []
    monkeypatch.setattr(graphs, "_new_graph", _EmulatedGraph)
    monkeypatch.setattr(graphs, "_record", _emulated_record)
    monkeypatch.setattr(graphs.GraphedStep, "_on_side_stream", _eager_warmup)
    monkeypatch.setattr(loop, "_use_graphs", lambda config, dist: config.cuda_graphs != "off")
    # capturable Adam (its step count and bias corrections on the device) is refused on a CPU
    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices",
                        lambda supports_xla=True: ["cpu", "cuda"])
    return _EmulatedGraph


def _fit(config, log=_silent, data=None, **model):
    net = _model(**model)
    result = fit(net, data or _data(), config, log=log)
    return net, result


def _same(model, other, rtol=0.0):
    for (name, p), q in zip(model.state_dict().items(), other.state_dict().values()):
        if rtol and p.is_floating_point():
            assert torch.allclose(p, q, rtol=rtol, atol=rtol), name
        else:
            assert torch.equal(p, q), name


CASES = [dict(mode="ternary"), dict(mode="binary", loss="squared_hinge"), dict(method="ste"),
         dict(scale="learned"), dict(mode="binary", scale="learned"), dict(distill=True), dict(init="twn"),
         dict(precision="bf16")]  # not compile="on": the recording cannot see into compiled code


@pytest.mark.parametrize("extra", CASES)
def test_graphed_loop_trains_exactly_like_eager(emulated, extra):
    # 250 examples in batches of 32: 7 full batches and a short one (eager) per epoch; η = 0.5
    # anneals α visibly from epoch to epoch, which a frozen 1 - α would miss
    base = dict(epochs=3, batch_size=32, progress=False, compile="off", ema_anneal=0.5)
    base.update(extra)
    eager_model, eager = _fit(TrainConfig(cuda_graphs="off", **base))
    model, result = _fit(TrainConfig(cuda_graphs="auto", **base))
    assert result.cuda_graphs == "on" and eager.cuda_graphs == "off"
    (graph,) = emulated.made
    assert graph.replays == 3 * 7 - graphs.WARMUP  # full batches after the warm-up, the capture's own included
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in eager.history]
    _same(model, eager_model)


def test_the_emulation_catches_a_value_frozen_at_capture(emulated, monkeypatch):
    def fresh_each_anneal(self, group, p):  # what MSA did before: a new 1 - α tensor when α changes
        return torch.tensor(1.0 - group["ema_decay"], dtype=p.dtype, device=p.device)

    base = dict(epochs=3, batch_size=32, progress=False, compile="off", ema_anneal=0.5)
    eager_model, _ = _fit(TrainConfig(cuda_graphs="off", **base))
    monkeypatch.setattr(MSA, "_one_minus_alpha", fresh_each_anneal)
    model, result = _fit(TrainConfig(**base))
    assert result.cuda_graphs == "on"
    assert any(not torch.equal(p, q) for p, q in zip(model.state_dict().values(), eager_model.state_dict().values()))


def test_a_step_that_syncs_with_the_host_trains_on_eagerly_and_says_so(emulated):
    base = dict(epochs=2, batch_size=32, progress=False, compile="off")
    eager_model, eager = _fit(TrainConfig(cuda_graphs="off", **base), sync=True)
    lines = []
    model, result = _fit(TrainConfig(**base), log=lines.append, sync=True)
    assert result.cuda_graphs.startswith("failed: RuntimeError: operation not permitted when stream is capturing")
    assert sum("could not be captured in a CUDA graph" in line for line in lines) == 1
    assert not emulated.made[0].replays
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in eager.history]
    _same(model, eager_model)


def test_capture_failure_reports_the_step_error_and_trains_on(monkeypatch):
    def record(graph, fn, device, stream):
        step_error = ValueError("a host sync in forward\nmore")
        raise graphs._CaptureFailed(step_error, None) from RuntimeError("operation failed due to a previous error")

    monkeypatch.setattr(graphs, "_new_graph", object)
    monkeypatch.setattr(graphs, "_record", record)
    reasons, calls = [], []
    step = graphs.GraphedStep(lambda: calls.append(1), "cpu", warmup=0, on_fail=reasons.append)
    step()
    step()
    assert step.state == "eager" and reasons == ["ValueError: a host sync in forward"] and len(calls) == 2


def test_a_step_seen_to_sync_in_the_last_warm_up_is_never_captured(monkeypatch):
    checks = []

    def warm_up(step, check=False):
        checks.append(check)
        step.fn()
        return "called a synchronizing CUDA operation" if check else None

    monkeypatch.setattr(graphs.GraphedStep, "_on_side_stream", warm_up)
    captured = []
    monkeypatch.setattr(graphs, "_record", lambda *args: captured.append(args))
    reasons, calls = [], []
    step = graphs.GraphedStep(lambda: calls.append(1), "cpu", warmup=3, on_fail=reasons.append)
    for _ in range(5):
        step()
    assert checks == [False, False, True] and not captured and len(calls) == 5
    assert step.state == "eager"
    assert reasons == ["the step synchronises with the host (called a synchronizing CUDA operation)"]
    # a single warm-up call is not checked: torch.compile's first call syncs while it times kernels
    checks.clear()
    monkeypatch.setattr(graphs, "_new_graph", lambda: SimpleNamespace(replay=lambda: calls.append("replay")))
    step = graphs.GraphedStep(lambda: calls.append(1), "cpu", warmup=1, on_fail=reasons.append)
    step()
    step()
    assert checks == [False] and len(captured) == 1 and step.state == "graphed" and calls[-1] == "replay"


def test_the_sync_check_counts_torchs_sync_warnings_only(monkeypatch):
    # torch gives, once a process, a notice when the sync debug mode is first set; it named no
    # synchronisation, but counted as one it kept every first step of a process from being captured
    mode = []

    def set_mode(m):
        if m == "warn" and not mode:
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations (Triggered internally at Module.cpp)", stacklevel=2)
        mode.append(m)

    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with graphs._sync_warnings(True) as seen:
            warnings.warn("something else", stacklevel=2)
        assert seen == []
        with graphs._sync_warnings(True) as seen:
            warnings.warn("called a synchronizing CUDA operation\nmore", stacklevel=2)
        assert seen == ["called a synchronizing CUDA operation"]
    assert [str(w.message) for w in outside] == ["something else"] and mode == ["warn", 0, "warn", 0]


def test_a_capture_that_cannot_be_undone_stops_with_the_way_out(monkeypatch):
    def record(graph, fn, device, stream):
        raise graphs._CaptureFailed(RuntimeError("operation not permitted when stream is capturing"),
                                    "AttributeError: no graphsafe_set_state")

    monkeypatch.setattr(graphs, "_new_graph", object)
    monkeypatch.setattr(graphs, "_record", record)
    step = graphs.GraphedStep(lambda: None, "cpu", warmup=0)
    with pytest.raises(TrainingError, match="operation not permitted .* no graphsafe_set_state.*--cuda-graphs off"):
        step()


@pytest.mark.parametrize("graphed_first", [True, False])
@pytest.mark.parametrize("method", ["msa", "ste"])
def test_resume_across_graphed_and_eager_runs(emulated_mixed, monkeypatch, tmp_path, graphed_first, method):
    # capturable Adam keeps its step counts on the device, the eager one on the host (and a
    # checkpoint is loaded onto the host): either resumes under the other, STE's counts go back to
    # the device, and the run ends where one uninterrupted run does (up to the bias corrections'
    # rounding, float32 tensors in one Adam and Python floats in the other)
    base = dict(batch_size=32, progress=False, compile="off", ema_anneal=0.5, method=method,
                checkpoint=str(tmp_path / "c.pt"))
    first, then = ("auto", "off") if graphed_first else ("off", "auto")
    _fit(TrainConfig(epochs=2, cuda_graphs=first, **base))
    if graphed_first:
        monkeypatch.undo()  # resumed by a plain CPU run, where capturable Adam is refused
    model, result = _fit(TrainConfig(epochs=4, cuda_graphs=then, resume=True, **base))
    assert result.cuda_graphs == ("off" if graphed_first else "on")
    whole_model, whole = _fit(TrainConfig(epochs=4, cuda_graphs="off", **{**base, "checkpoint": None}))
    assert [h["train_loss"] for h in result.history] == pytest.approx([h["train_loss"] for h in whole.history],
                                                                      rel=1e-5)
    _same(model, whole_model, rtol=1e-5)


def test_a_fused_adam_checkpoint_resumes_with_this_runs_adam(tmp_path, monkeypatch):
    # a GPU run's Adam is fused; its checkpoint resumes on a CPU with the CPU run's Adam, not the
    # checkpoint's fused and foreach settings
    base = dict(batch_size=32, progress=False, compile="off", cuda_graphs="off", device="cpu",
                checkpoint=str(tmp_path / "c.pt"))
    _fit(TrainConfig(epochs=1, **base))
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    for group in state["adam"]["param_groups"]:
        group.update(fused=True, foreach=False)
    torch.save(state, tmp_path / "c.pt")
    made = []
    real = loop._adam
    monkeypatch.setattr(loop, "_adam", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    _fit(TrainConfig(epochs=2, resume=True, **base))
    (adam,) = made
    assert all(not g["fused"] and g["foreach"] is None for g in adam.param_groups)


def test_adam_is_fused_on_a_gpu_only():
    assert not loop._adam([nn.Parameter(torch.zeros(3))], 1e-3, capturable=False).param_groups[0]["fused"]
    adam = loop._adam([nn.Parameter(torch.zeros(3, device="meta"))], 1e-3, capturable=False)
    assert not adam.param_groups[0]["fused"]
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        adam = loop._adam([nn.Parameter(torch.zeros(3, device="cuda"))], 1e-3, capturable=True)
        assert adam.param_groups[0]["fused"] and adam.param_groups[0]["capturable"]


def test_optimizer_step_counts_follow_the_parameters_after_a_resume():
    # on a GPU: a checkpoint is loaded onto the host; capturable Adam and STE count on the device
    from ternarize.train.ste import STE

    p = nn.Parameter(torch.zeros(3, 4, device="meta"))
    adam = torch.optim.Adam([p], capturable=True)
    adam.state[p]["step"] = torch.tensor(5.0)
    loop._place_adam_steps(adam)
    assert adam.state[p]["step"].device.type == "meta"
    adam.param_groups[0]["capturable"] = False
    adam.state[p]["step"] = torch.tensor(5.0, dtype=torch.float64)
    loop._place_adam_steps(adam)
    assert adam.state[p]["step"].device.type == "cpu" and adam.state[p]["step"].dtype == torch.float32

    w = nn.Parameter(torch.ones(3, 4))
    saved = STE([w]).state_dict()
    saved["state"][0]["step"] = torch.tensor(7.0)
    on_meta = nn.Parameter(torch.ones(3, 4, device="meta"))
    ste = STE([on_meta])
    ste.load_state_dict(saved)
    assert ste.state[on_meta]["step"].device.type == "meta"


def test_too_few_full_batches_never_capture(emulated):
    _, result = _fit(TrainConfig(epochs=1, batch_size=100, progress=False, compile="off"))  # 2 full batches
    assert result.cuda_graphs == "off" and not emulated.made


def test_graphed_step_warms_up_then_captures_once_and_replays(emulated):
    calls = []
    counter = torch.zeros(())
    step = graphs.GraphedStep(lambda: (calls.append(1), counter.add_(1)), "cpu", warmup=2)
    for _ in range(5):
        step()
    (graph,) = emulated.made
    assert len(calls) == 3 and graph.replays == 3 and step.state == "graphed" and counter.item() == 5


def test_fit_float_replays_its_steps_too(emulated):
    data = _data()
    eager, graphed = _model(), _model()
    h1 = loop.fit_float(eager, data, epochs=2, batch_size=32, progress=False, log=_silent, cuda_graphs="off")
    h2 = loop.fit_float(graphed, data, epochs=2, batch_size=32, progress=False, log=_silent)
    assert len(emulated.made) == 1 and emulated.made[0].replays == 2 * 7 - graphs.WARMUP
    # the eager run's Adam is not capturable: equal up to the bias corrections' rounding
    assert [h["train_loss"] for h in h1] == pytest.approx([h["train_loss"] for h in h2], rel=1e-5)
    _same(graphed, eager, rtol=1e-5)


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
def test_cuda_failed_capture_leaves_dropout_and_streams_working():  # pragma: no cover - GPU machines only
    # the step syncs with the host (capture fails) and draws random numbers (dropout): the eager
    # steps after the failure need the generator out of capture mode and the capture stream left
    stream = torch.cuda.current_stream()
    lines = []
    _, result = _fit(TrainConfig(epochs=2, batch_size=32, progress=False, device="cuda"), log=lines.append,
                     dropout=True, sync=True)
    assert result.cuda_graphs.startswith("failed: ") and len(result.history) == 2
    assert torch.cuda.current_stream() == stream
    torch.nn.functional.dropout(torch.ones(8, device="cuda"), 0.5)


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
        result = SimpleNamespace(history=[{}], seconds=1.0, resumed=[], cuda_graphs=state, config=None,
                                 kept_epoch=None)
        meta = pipeline._metadata({}, SimpleNamespace(name="mnist"), TrainConfig(), result, 0.9, 0.9)
        return meta["training"]

    assert "cuda_graphs" not in training("off")
    assert training("on")["cuda_graphs"] == "on"
    assert training("failed: RuntimeError: x")["cuda_graphs"] == "failed: RuntimeError: x"
    assert training("on")["settings"]["cuda_graphs"] == "auto"


def test_sync_check_never_breaks_a_step():
    # without a sync debug mode (a CPU build of torch) the check is skipped; with one, a step that
    # does not sync is seen as such
    ran = []
    with graphs._sync_warnings(True) as seen:
        ran.append(1)
    assert ran == [1] and seen == []
