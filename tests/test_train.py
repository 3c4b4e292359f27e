"""The training loop: policy, resume equivalence, sparsity, NaN guard, distillation, DDP."""

import copy
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from torch import nn

from ternarize import ConfigError, TrainingError, zoo
from ternarize.data import Dataset, load_dataset
from ternarize.train import loop, policy
from ternarize.train.loop import TrainConfig, fit, fit_float

QUIET = dict(progress=False)


def _silent(_):
    pass


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def float_mlp(digits):
    torch.manual_seed(0)  # not whatever the tests before it in this worker left in the global generator
    model = zoo.create("mlp", in_shape=digits.in_shape, width=64, depth=2)
    fit_float(model, digits, epochs=3, progress=False, log=_silent)
    return model


def test_float_training_learns_digits(float_mlp, digits):
    from ternarize.train.loop import evaluate

    _, acc = evaluate(float_mlp, torch.from_numpy(digits.x_test), torch.from_numpy(digits.y_test))
    assert acc > 0.9


@pytest.mark.parametrize("method, mode", [("msa", "ternary"), ("msa", "binary"), ("ste", "ternary"),
                                          ("ste", "binary")])
def test_every_method_trains_and_stays_discrete(float_mlp, digits, method, mode):
    model = copy.deepcopy(float_mlp)
    result = fit(model, digits, TrainConfig(method=method, mode=mode, epochs=3, **QUIET), log=_silent)
    assert result.history[-1]["test_acc"] > 0.85
    for name in result.discrete:
        w = dict(model.named_parameters())[name].detach()
        rows = w.reshape(w.shape[0], -1)
        s = rows.abs().amax(1, keepdim=True)
        assert torch.all((rows.abs() == s) | ((rows == 0) if mode == "ternary" else torch.zeros_like(rows).bool()))
    assert set(result.history[-1]["layers"]) == set(result.discrete)


def test_policy_defaults_keep_float_and_scales():
    model = zoo.create("lenet", in_shape=(1, 28, 28))
    layers = policy.discrete_layers(model)
    assert [lay.module for lay in layers] == ["0", "4", "9", "12", "15"]
    # every layer but the last Linear (no BatchNorm after it) keeps a fixed scale
    assert [lay.scale for lay in layers] == ["fixed"] * 4 + ["learned"]
    kept = policy.discrete_layers(model, keep_float=("first", "last"))
    assert [lay.module for lay in kept] == ["4", "9", "12"]
    assert [lay.module for lay in policy.discrete_layers(model, keep_float=("1?",))] == ["0", "4", "9"]
    with pytest.raises(ConfigError, match="matches no"):
        policy.discrete_layers(model, keep_float=("nope*",))
    with pytest.raises(ConfigError, match="keeps every layer float"):
        policy.discrete_layers(model, keep_float=("*",))


def test_vgg_blocks_with_maxpool_before_batchnorm_keep_fixed_scales():
    model = zoo.create("vgg", in_shape=(1, 28, 28), width=0.125)
    assert {lay.scale for lay in policy.discrete_layers(model)} == {"fixed"}


def test_keep_float_layers_stay_float(float_mlp, digits):
    model = copy.deepcopy(float_mlp)
    before = model[1].weight.detach().clone()
    result = fit(model, digits, TrainConfig(epochs=1, keep_float=("first",), **QUIET), log=_silent)
    assert "1.weight" not in result.discrete
    assert not torch.equal(model[1].weight, before)  # trained by Adam, still float
    assert len(torch.unique(model[1].weight.abs())) > 10


def test_resume_reaches_the_same_weights(float_mlp, digits, tmp_path):
    config = dict(epochs=3, batch_size=50, **QUIET)
    straight = copy.deepcopy(float_mlp)
    fit(straight, digits, TrainConfig(checkpoint=str(tmp_path / "a.pt"), **config), log=_silent)
    interrupted = copy.deepcopy(float_mlp)
    fit(interrupted, digits, TrainConfig(checkpoint=str(tmp_path / "b.pt"), **{**config, "epochs": 2}), log=_silent)
    resumed = copy.deepcopy(float_mlp)  # a fresh process would start from the float model again
    result = fit(resumed, digits, TrainConfig(checkpoint=str(tmp_path / "b.pt"), resume=True, **config), log=_silent)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_resumed_run_counts_the_earlier_processes_seconds(float_mlp, digits, tmp_path, old_checkpoint):
    ck = str(tmp_path / "c.pt")
    config = dict(epochs=3, batch_size=50, checkpoint=ck, **QUIET)
    first = fit(copy.deepcopy(float_mlp), digits, TrainConfig(**{**config, "epochs": 2}), log=_silent)
    state = torch.load(ck, weights_only=True)
    assert 0 < state["seconds"] <= first.seconds
    if old_checkpoint:  # written before checkpoints kept the time: the epochs' training time counts
        del state["seconds"]
        torch.save(state, ck)
    earlier = state.get("seconds", sum(h["seconds"] for h in state["history"]))
    result = fit(copy.deepcopy(float_mlp), digits, TrainConfig(resume=True, **config), log=_silent)
    assert result.seconds >= earlier + result.history[-1]["seconds"]
    assert result.seconds >= sum(h["seconds"] for h in result.history)


def test_resume_refuses_another_model_or_other_data(float_mlp, digits, tmp_path):
    ck = str(tmp_path / "c.pt")
    fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=1, checkpoint=ck, **QUIET), log=_silent)
    other = copy.deepcopy(float_mlp)
    with torch.no_grad():
        other[1].weight[0, 0] += 1
    with pytest.raises(ConfigError, match="made from another float model"):
        fit(other, digits, TrainConfig(epochs=2, checkpoint=ck, resume=True, **QUIET), log=_silent)
    shifted = Dataset("digits", digits.x_train[::-1].copy(), digits.y_train[::-1].copy(), digits.x_test,
                      digits.y_test, digits.num_classes)
    with pytest.raises(ConfigError, match="made from other training data"):
        fit(copy.deepcopy(float_mlp), shifted, TrainConfig(epochs=2, checkpoint=ck, resume=True, **QUIET), log=_silent)
    result = fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, checkpoint=ck, resume=True, **QUIET),
                 log=_silent)
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_too_few_training_examples_and_non_finite_weights_are_refused(float_mlp, digits):
    one = Dataset("one", digits.x_train[:1], digits.y_train[:1], digits.x_test, digits.y_test, digits.num_classes)
    with pytest.raises(ConfigError, match="the training set has 1 example; a training step needs at least 2"):
        fit(copy.deepcopy(float_mlp), one, TrainConfig(epochs=1, **QUIET), log=_silent)
    few = Dataset("few", digits.x_train[:3], digits.y_train[:3], digits.x_test, digits.y_test, digits.num_classes)
    with pytest.raises(ConfigError, match="1 example left after the validation split.*smaller --val-fraction"):
        fit(copy.deepcopy(float_mlp), few.split_validation(0.6), TrainConfig(epochs=1, **QUIET), log=_silent)
    broken = copy.deepcopy(float_mlp)
    with torch.no_grad():
        broken[2].bias[3] = float("nan")
    with pytest.raises(ConfigError, match=r"the model's 2\.bias holds NaN or infinite values"):
        fit(broken, digits, TrainConfig(epochs=1, **QUIET), log=_silent)


@pytest.mark.parametrize("stat, value, says", [("running_mean", float("inf"), "NaN or infinite values"),
                                               ("running_var", float("nan"), "NaN or infinite values"),
                                               ("running_var", -1.0, "negative variances")])
def test_broken_batchnorm_statistics_are_refused_before_training(stat, value, says, digits):
    """Folded into the layer before at export, they would fail the run only after the training."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        getattr(model[2], stat)[5] = value
    with pytest.raises(ConfigError, match=rf"the model's 2\.{stat} holds {says}; retrain or repair"):
        fit(model.eval(), digits, TrainConfig(epochs=1, **QUIET), log=_silent)


def test_checks_allow_lazy_modules_masks_and_respelt_data_paths(digits, monkeypatch):
    from dataclasses import replace

    from ternarize.train.loop import _origin, check_fits

    lazy = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))
    check_fits(lazy, digits)  # the check's forward pass creates its parameters first
    masked = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    masked.register_buffer("mask", torch.full((10,), float("-inf")))  # a buffer may hold -inf on purpose
    check_fits(masked, digits)
    assert _origin(masked, digits) == _origin(masked, replace(digits, name="./" + digits.name))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="batch size 6 gives some of the 4 processes fewer than 2 samples"):
        TrainConfig(batch_size=6, device="cpu").validate()
    TrainConfig(batch_size=8, device="cpu").validate()


def test_resume_refuses_other_settings_and_missing_checkpoint(float_mlp, digits, tmp_path):
    ck = str(tmp_path / "c.pt")
    fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=1, checkpoint=ck, **QUIET), log=_silent)
    with pytest.raises(ConfigError, match="mode='ternary'"):
        fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, mode="binary", checkpoint=ck, resume=True,
                                                          **QUIET), log=_silent)
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, checkpoint=str(tmp_path / "x.pt"),
                                                          resume=True, **QUIET), log=_silent)


def _first_param_state(state):
    return next(iter(state["discrete_opt"]["state"].values()))


# (what is damaged, the edit, the refusal)
DAMAGED = [
    ("config", lambda s: s.update(config=[1]), "its config is not a mapping"),
    ("epoch a string", lambda s: s.update(epoch="x"), "its epoch is 'x', not a count"),
    ("epoch negative", lambda s: s.update(epoch=-5), "its epoch is '-5', not a count"),
    ("epoch a bool", lambda s: s.update(epoch=True), "its epoch is 'True', not a count"),
    ("model", lambda s: s.update(model={"w": 1}), "its model is not a state dict of tensors"),
    ("optimizer", lambda s: s.update(discrete_opt={"state": 1}), "its discrete_opt is not an optimizer's state"),
    ("adam", lambda s: s.update(adam=[]), "its adam is not an optimizer's state"),
    ("history a string", lambda s: s.update(history="abc"), "its history does not hold one record for each of its 2"),
    ("history short", lambda s: s["history"].pop(), "its history does not hold one record for each of its 2"),
    ("history record", lambda s: s["history"][1].update(seconds="1"), "its history record 2 is not an epoch's record"),
    ("history seconds NaN", lambda s: s["history"][0].update(seconds=float("nan")), "its history record 1 is not"),
    ("history accuracy a bool", lambda s: s["history"][0].update(test_acc=True), "its history record 1 is not"),
    ("rng", lambda s: s.update(rng=torch.zeros(5, dtype=torch.uint8)), "its random number generator state is not one"),
    ("resumed", lambda s: s.update(resumed=5), "its list of resumes is not one"),
    ("msa state keys", lambda s: s["discrete_opt"]["state"].update({0: {"x": 1}}),
     r"its optimizer state M of a \(64, 64\) parameter is not a tensor of shape \(64, 64\)"),
    ("msa state shape", lambda s: _first_param_state(s).update(scale=torch.zeros(3)),
     r"its optimizer state scale of a \(64, 64\) parameter is not a tensor of shape \(64,\)"),
    ("msa setting", lambda s: s["discrete_opt"]["param_groups"][0].update(ema_decay="a"),
     "its optimizer setting ema_decay is 'a'"),
    ("msa mode", lambda s: s["discrete_opt"]["param_groups"][0].update(mode="quinary"),
     "its optimizer setting mode is 'quinary'"),
    ("adam state", lambda s: next(iter(s["adam"]["state"].values())).update(exp_avg=torch.zeros(2)),
     r"its optimizer state exp_avg of a \(64,\) parameter is not a tensor of shape \(64,\)"),
    ("adam step", lambda s: next(iter(s["adam"]["state"].values())).update(step=torch.zeros(2)),
     "an Adam step count is not a number"),
]


@pytest.mark.parametrize("what, damage, says", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_resume_refuses_a_damaged_checkpoint_in_one_line(float_mlp, digits, tmp_path, what, damage, says):
    ck = str(tmp_path / "c.pt")
    config = dict(epochs=3, batch_size=50, checkpoint=ck, **QUIET)
    fit(copy.deepcopy(float_mlp), digits, TrainConfig(**{**config, "epochs": 2}), log=_silent)
    state = torch.load(ck, weights_only=True)
    damage(state)
    torch.save(state, ck)
    with pytest.raises(ConfigError, match=rf"^the checkpoint {ck} is damaged \({says}.*; delete it to start over$"):
        fit(copy.deepcopy(float_mlp), digits, TrainConfig(resume=True, **config), log=_silent)


def test_a_cpu_checkpoint_resumes_with_a_fused_adam(float_mlp, digits, tmp_path, monkeypatch):
    """On a GPU Adam is fused; a checkpoint of a CPU run (fused None) resumes there, not refused."""
    ck = str(tmp_path / "c.pt")
    config = dict(epochs=2, batch_size=50, checkpoint=ck, **QUIET)
    fit(copy.deepcopy(float_mlp), digits, TrainConfig(**{**config, "epochs": 1}), log=_silent)
    assert torch.load(ck, weights_only=True)["adam"]["param_groups"][0]["fused"] is None
    made = []

    def fused_adam(params, lr, capturable):
        made.append(torch.optim.Adam(list(params), lr=lr, capturable=capturable, fused=True))
        return made[-1]

    monkeypatch.setattr(loop, "_adam", fused_adam)
    result = fit(copy.deepcopy(float_mlp), digits, TrainConfig(resume=True, **config), log=_silent)
    assert [h["epoch"] for h in result.history] == [1, 2] and made[0].param_groups[0]["fused"] is True


def test_resume_with_changed_settings_applies_warns_and_records_them(float_mlp, digits, tmp_path, monkeypatch):
    ck = str(tmp_path / "c.pt")
    fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=1, checkpoint=ck, **QUIET), log=_silent)
    used = []  # the optimizers' settings in each epoch actually trained
    real_epoch = loop._Run.epoch

    def spy(run, epoch):
        used.append((epoch, dict((k, run.opt.param_groups[0][k]) for k in ("rho", "lam", "scale_lr")),
                     run.adam.param_groups[0]["lr"]))
        return real_epoch(run, epoch)

    monkeypatch.setattr(loop._Run, "epoch", spy)
    lines = []
    result = fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, lam=1e-6, lr=2e-3, rho=0.3, checkpoint=ck,
                                                               resume=True, **QUIET), log=lines.append)
    assert used == [(1, {"rho": 0.3, "lam": 1e-6, "scale_lr": 2e-3}, 2e-3)]  # the new values, not the checkpoint's
    assert result.resumed == [{"after_epoch": 1, "changed": {"rho": [None, 0.3], "lam": [1e-7, 1e-6],
                                                             "lr": [1e-3, 2e-3]}}]
    warning = [line for line in lines if line.startswith("warning:")]
    assert warning == ["warning: settings changed since the checkpoint: rho None -> 0.3, lam 1e-07 -> 1e-06, "
                       "lr 0.001 -> 0.002; epoch 1 used the old values, the rest use the new ones (recorded in the "
                       "report as training.resumed)"]
    again = fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=3, lam=1e-5, lr=2e-3, rho=0.3, checkpoint=ck,
                                                              resume=True, **QUIET), log=lines.append)
    assert again.resumed == [result.resumed[0], {"after_epoch": 2, "changed": {"lam": [1e-6, 1e-5]}}]  # both kept
    assert "epochs 1-2 used the old values" in [line for line in lines if line.startswith("warning:")][-1]
    same = fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=4, lam=1e-5, lr=2e-3, rho=0.3, checkpoint=ck,
                                                             resume=True, **QUIET), log=lines.append)
    assert same.resumed == again.resumed  # more epochs, same settings: nothing new to say
    assert len([line for line in lines if line.startswith("warning:")]) == 2
    with pytest.raises(ConfigError, match=r"has trained 4 epochs, more than --epochs 2; resume with --epochs 4 or "
                                          r"more, or start over"):
        fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, checkpoint=ck, resume=True, **QUIET), log=_silent)
    used.clear()
    done = fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=4, lam=1e-4, lr=2e-3, rho=0.3, checkpoint=ck,
                                                             resume=True, **QUIET), log=lines.append)
    assert used == [] and done.resumed == again.resumed  # nothing trained: the new lam is not recorded
    assert "resuming after epoch 4 of 4" in lines[-2] and "no epoch remains" in lines[-2]
    assert lines[-1].startswith("warning: settings changed since the checkpoint (lam) are not used")
    must_match = [("scale", "learned", ""),
                  ("ema_decay", 0.99, r" \(on the command line: --ema-decay 0\.999\)"),
                  ("ema_anneal", 0.9, r" \(on the command line: --ema-anneal 0\.95\)")]
    for key, value, hint in must_match:
        with pytest.raises(ConfigError, match=f"made with {key}=.*; use the same settings to resume{hint}, or start"):
            fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=5, checkpoint=ck, resume=True,
                                                              **{key: value}, **QUIET), log=_silent)


def test_progress_bar_stays_off_redirected_output(float_mlp, digits, capsys):
    fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, progress=True), log=print)
    out, err = capsys.readouterr()
    assert out.splitlines() == [line for line in out.splitlines() if line.startswith("epoch ")]  # no blank lines
    assert len(out.splitlines()) == 2 and err == ""  # the bar goes to stderr, and only to a terminal
    with loop._Progress(TrainConfig(progress=True), types.SimpleNamespace(rank=0), 0, 100) as bar:
        assert not bar.enabled  # no terminal: no refreshes either (each reads the loss from the device)


def test_sparsity_falls_over_epochs_under_the_anneal(float_mlp, digits):
    # a faster schedule than the paper's (α = 0.99, λ = 1e-5) so the trend shows in a few epochs
    result = fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=6, batch_size=50, ema_decay=0.99, lam=1e-5,
                                                               **QUIET), log=_silent)
    nz = [h["nonzero"] for h in result.history]
    assert nz[-1] < 0.9 * nz[0], nz
    assert all(b < a for a, b in zip(nz, nz[1:])), nz  # falls every epoch
    assert result.history[-1]["test_acc"] > 0.85


def test_nan_loss_stops_and_keeps_last_good_checkpoint(float_mlp, digits, tmp_path, monkeypatch):
    from ternarize.train import loop

    monkeypatch.setattr(loop, "_origin", lambda model, data: None)  # resumed on changed data on purpose
    bad = Dataset("bad", digits.x_train.copy(), digits.y_train, digits.x_test, digits.y_test, digits.num_classes)
    ck = tmp_path / "nan.pt"
    model = copy.deepcopy(float_mlp)
    fit(model, digits, TrainConfig(epochs=1, checkpoint=str(ck), **QUIET), log=_silent)
    good = ck.read_bytes()
    bad.x_train[5, 0, 3, 3] = np.nan
    with pytest.raises(TrainingError, match="became nan in epoch 2.*last good checkpoint"):
        fit(model, bad, TrainConfig(epochs=2, checkpoint=str(ck), resume=True, **QUIET), log=_silent)
    assert ck.read_bytes() == good


def test_distillation_and_squared_hinge(float_mlp, digits):
    for extra in ({"distill": True}, {"loss": "squared_hinge"}):
        result = fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, **extra, **QUIET), log=_silent)
        assert result.history[-1]["test_acc"] > 0.8, extra


@pytest.mark.parametrize("field, value, message", [
    ("method", "adam", "method"), ("mode", "int4", "mode"), ("epochs", 0, "epochs"), ("batch_size", 1, "batch"),
    ("rho", -1.0, "rho"), ("loss", "mse", "loss"), ("device", "tpu", "device"), ("scale", "free", "scale"),
    ("precision", "fp8", "precision"),
])
def test_bad_config(float_mlp, digits, field, value, message):
    with pytest.raises(ConfigError, match=message):
        fit(copy.deepcopy(float_mlp), digits, TrainConfig(**{field: value}, **QUIET), log=_silent)


def test_time_budget_stops_early(float_mlp, digits):
    result = fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=50, time_budget=1e-6, **QUIET), log=_silent)
    assert len(result.history) == 1


def test_bf16_autocast_trains(float_mlp, digits):
    result = fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, precision="bf16", **QUIET), log=_silent)
    assert result.history[-1]["test_acc"] > 0.8


def test_validation_split_is_reported(float_mlp, digits):
    data = digits.split_validation(0.1, seed=1)
    result = fit(copy.deepcopy(float_mlp), data, TrainConfig(epochs=1, **QUIET), log=_silent)
    assert 0 < result.history[0]["val_acc"] <= 1


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from ternarize import zoo
    from ternarize.data import load_dataset
    from ternarize.train.loop import TrainConfig, fit
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = zoo.create("mlp", in_shape=data.in_shape, width=32, depth=1)
    fit(model, data, TrainConfig(epochs=2, batch_size=64, device="cpu", progress=False), log=lambda s: None)
    rank = int(os.environ["RANK"])
    torch.save({k: v for k, v in model.state_dict().items()}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    if os.path.isdir("/proc/self/task"):  # the group is gone, its threads with it (left, they can abort the exit)
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        assert not [n for n in names if "gloo" in n], names
""")


@pytest.mark.slow
def test_ddp_ranks_hold_identical_discrete_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--standalone", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    w = a["1.weight"]
    assert set(torch.unique(torch.sign(w)).tolist()) <= {-1.0, 0.0, 1.0}
    start = zoo.create("mlp", in_shape=(1, 8, 8), width=32, depth=1)
    assert not torch.equal(start[1].weight, w)  # it did train


def test_a_model_ending_in_softmax_trains_on_the_log_of_its_outputs(float_mlp, digits):
    """Cross-entropy over probabilities would apply softmax twice (digits, 3 epochs: 74 % where the
    same model without its softmax reaches 91 %); the loss takes their log instead."""
    from ternarize.train.loop import evaluate

    x, y = torch.from_numpy(digits.x_test), torch.from_numpy(digits.y_test)
    plain = copy.deepcopy(float_mlp)
    soft = nn.Sequential(copy.deepcopy(float_mlp), nn.Softmax(dim=1))
    assert evaluate(soft, x, y, outputs="probabilities")[0] == pytest.approx(evaluate(plain, x, y)[0], rel=1e-4)
    config = dict(epochs=2, seed=3, **QUIET)
    a = fit(plain, digits, TrainConfig(**config), log=_silent)
    asked = TrainConfig(**config)  # outputs="auto": fit finds the softmax
    b = fit(soft, digits, asked, log=_silent)
    assert (asked.outputs, a.config.outputs, b.config.outputs) == ("auto", "logits", "probabilities")
    for ra, rb in zip(a.history, b.history):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=0.02)
        assert rb["test_acc"] == pytest.approx(ra["test_acc"], abs=0.02)
    told = fit(copy.deepcopy(soft), digits, TrainConfig(outputs="logits", **config), log=_silent)
    assert told.history[-1]["train_loss"] > 1.5 * a.history[-1]["train_loss"]  # softmax twice, as asked
    with pytest.raises(ConfigError, match="outputs"):
        TrainConfig(outputs="scores").validate()


class _SoftmaxCall(nn.Module):
    def __init__(self, dim=1, how="function"):
        super().__init__()
        self.fc, self.dim, self.how = nn.Linear(4, 3), dim, how

    def forward(self, x):
        y = self.fc(x)
        if self.how == "method":
            return y.softmax(dim=self.dim).view(-1, 3)
        return torch.nn.functional.softmax(y, self.dim)


@pytest.mark.parametrize("model, outputs", [
    (nn.Sequential(nn.Linear(4, 3)), "logits"),
    (nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)), "probabilities"),
    (nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)), "logits"),
    (nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1), nn.Flatten(), nn.Dropout()), "probabilities"),
    (nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=0)), "logits"),  # not over the classes
    (_SoftmaxCall(), "probabilities"), (_SoftmaxCall(how="method"), "probabilities"),
    (_SoftmaxCall(dim=0), "logits"),
])
def test_fit_tells_probabilities_from_logits(model, outputs):
    assert loop.model_outputs(model) == outputs


def test_a_checkpoint_from_before_outputs_resumes_and_records_the_loss_change(float_mlp, digits, tmp_path):
    """A checkpoint written before TrainConfig.outputs existed trained on logits; a softmax model
    resumed from it now trains on log-probabilities, which is said and recorded."""
    soft = nn.Sequential(copy.deepcopy(float_mlp), nn.Softmax(dim=1))
    ck = str(tmp_path / "c.pt")
    fit(copy.deepcopy(soft), digits, TrainConfig(epochs=1, outputs="logits", checkpoint=ck, **QUIET), log=_silent)
    state = torch.load(ck, weights_only=False)
    del state["config"]["outputs"]  # as written before the field
    torch.save(state, ck)
    lines = []
    result = fit(copy.deepcopy(soft), digits, TrainConfig(epochs=2, checkpoint=ck, resume=True, **QUIET),
                 log=lines.append)
    assert result.resumed == [{"after_epoch": 1, "changed": {"outputs": ["logits", "probabilities"]}}]
    assert any("outputs 'logits' -> 'probabilities'" in line for line in lines)


def test_checkpoints_of_flat_features_keep_their_fingerprint():
    """Flat features were held as (N, 1, 1, F) before: the data fingerprint is the same either way."""
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 6)).astype(np.float32), np.arange(20) % 2
    flat = Dataset("f", x, y, x[:4], y[:4], 2)
    old = Dataset("f", x.reshape(20, 1, 1, 6), y, x[:4].reshape(4, 1, 1, 6), y[:4], 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2))
    assert loop._origin(model, flat) == loop._origin(model, old)


def test_keep_best_ends_with_the_epoch_of_best_validation_accuracy(float_mlp, digits, tmp_path, monkeypatch):
    data = digits.split_validation(0.2, seed=0)
    accs = iter([0.5, 0.9, 0.7])  # the validation accuracies the three epochs report
    real = loop.evaluate
    snapshots = []

    def spy(model, x, y, batch=1000, outputs="logits"):
        loss, acc = real(model, x, y, batch, outputs)
        if x is tensors_val[-1]:
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            return loss, next(accs)
        return loss, acc

    tensors_val = []
    real_from = loop._Tensors.from_dataset

    def capture(dataset, device):
        t = real_from(dataset, device)
        tensors_val.append(t.x_val)
        return t

    monkeypatch.setattr(loop._Tensors, "from_dataset", staticmethod(capture))
    monkeypatch.setattr(loop, "evaluate", spy)
    lines = []
    model = copy.deepcopy(float_mlp)
    ck = str(tmp_path / "c.pt")
    result = fit(model, data, TrainConfig(epochs=3, keep_best=True, checkpoint=ck, **QUIET), log=lines.append)
    assert result.kept_epoch == 2 and [h["val_acc"] for h in result.history] == [0.5, 0.9, 0.7]
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())  # epoch 2's weights
    assert not all(torch.equal(v, snapshots[2][k]) for k, v in model.state_dict().items())
    assert lines[-1] == "kept the weights of epoch 2, the best validation accuracy (90.00%) of the 3 epochs"
    state = torch.load(ck, weights_only=False)
    assert state["best"]["epoch"] == 2  # a resume keeps comparing with it
    accs = iter([0.8])
    again = copy.deepcopy(float_mlp)
    resumed = fit(again, data, TrainConfig(epochs=4, keep_best=True, checkpoint=ck, resume=True, **QUIET),
                  log=_silent)
    assert resumed.kept_epoch == 2 and len(resumed.history) == 4
    assert all(torch.equal(v, snapshots[1][k]) for k, v in again.state_dict().items())
    with pytest.raises(ConfigError, match="keep_best=True, not False"):
        fit(copy.deepcopy(float_mlp), data, TrainConfig(epochs=4, checkpoint=ck, resume=True, **QUIET), log=_silent)
    with pytest.raises(ConfigError, match="keep_best picks the epoch of best validation accuracy"):
        fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=1, keep_best=True, **QUIET), log=_silent)


def _damage_first_weight(state, value):
    first = next(iter(state["best"]["model"]))
    state["best"]["model"][first] = value(state["best"]["model"][first])


@pytest.mark.parametrize("damage", [
    lambda s: s["best"].update(acc=float("nan")), lambda s: s["best"].update(acc=2.0),
    lambda s: s["best"].update(epoch=0), lambda s: s["best"].update(model={}),
    lambda s: _damage_first_weight(s, lambda t: torch.full_like(t, float("nan"))),
    lambda s: _damage_first_weight(s, lambda t: t.double()),
], ids=["acc NaN", "acc 2", "epoch 0", "no weights", "NaN weights", "float64 weights"])
def test_resume_refuses_a_damaged_best_epoch(float_mlp, digits, tmp_path, damage):
    data = digits.split_validation(0.2, seed=0)
    ck = str(tmp_path / "c.pt")
    config = dict(keep_best=True, checkpoint=ck, **QUIET)
    fit(copy.deepcopy(float_mlp), data, TrainConfig(epochs=1, **config), log=_silent)
    state = torch.load(ck, weights_only=True)
    damage(state)
    torch.save(state, ck)
    with pytest.raises(ConfigError, match=r"is damaged \(its best epoch's weights are not the model's\)"):
        fit(copy.deepcopy(float_mlp), data, TrainConfig(epochs=2, resume=True, **config), log=_silent)


def test_an_epoch_line_shows_once_its_checkpoint_is_written(float_mlp, digits, tmp_path):
    ck = str(tmp_path / "c.pt")
    seen = []

    def log(line):
        if line.startswith("epoch "):
            seen.append((line.split(":")[0], os.path.isfile(ck) and torch.load(ck, weights_only=True)["epoch"] + 1))

    fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, checkpoint=ck, **QUIET), log=log)
    assert seen == [("epoch 1/2", 1), ("epoch 2/2", 2)]  # a stop once the line shows resumes after that epoch


def test_float16_changed_on_resume_is_warned_unless_the_checkpoint_predates_it(float_mlp, digits, tmp_path):
    ck = str(tmp_path / "c.pt")
    fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=1, checkpoint=ck, float16=True, **QUIET), log=_silent)
    lines = []
    fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=2, checkpoint=ck, resume=True, **QUIET), log=lines.append)
    assert [line for line in lines if "--float16" in line] == [
        "warning: the interrupted run was started with --float16; this one writes the .tern file's float tensors "
        "in float32 (resume with --float16 for half precision)"]
    state = torch.load(ck, weights_only=True)
    del state["config"]["float16"]  # as a checkpoint written before the setting existed
    torch.save(state, ck)
    lines.clear()
    fit(copy.deepcopy(float_mlp), digits, TrainConfig(epochs=3, checkpoint=ck, resume=True, float16=True, **QUIET),
        log=lines.append)
    assert not [line for line in lines if "--float16" in line], lines  # what that run asked for is not known
