"""The training loop: discrete retraining (E-MSA or STE) and plain float training.

``fit(model, data, TrainConfig(...))`` makes the chosen weights discrete (see
:mod:`ternarize.train.policy`), trains them with :class:`ternarize.MSA` (or :class:`ternarize.STE`)
and every continuous parameter (BatchNorm, biases, float-kept layers) with Adam in the same loop,
evaluates each epoch and returns the history.

* The dataset is moved to the device once; batches are index slices (no per-step copies).
* Epoch e shuffles with a generator seeded by (seed, e), so a resumed run sees the same batches.
* A checkpoint is written atomically after every epoch; ``resume=True`` continues from it and
  reaches the same weights as an uninterrupted run (same seed, CPU).
* A NaN or infinite loss stops the run with :class:`TrainingError`; the last good checkpoint stays.
* Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, each rank
  takes its share of every batch, and rank 0 alone logs and writes checkpoints. Gradients are
  all-reduced before the optimizer sees them, so every rank makes the same discrete update.

Example::

    result = fit(model, load_dataset("mnist"), TrainConfig(mode="ternary", epochs=5))
    result.history[-1]["test_acc"]
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import io
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write
from .._version import __version__
from ..errors import ConfigError, TrainingError
from ..load import load_weights_only
from . import policy
from .graphs import GraphedStep
from .msa import MSA
from .ste import STE

LOSSES = ("cross_entropy", "squared_hinge")
OUTPUTS = ("auto", "logits", "probabilities")
MAX_LR, MAX_RHO, MAX_LAM = 1e3, 1e3, 1e6  # upper bounds of the steering settings (validate)


MAX_EPOCHS = 100_000  # a sanity bound: the paper ran 250


@dataclass
class TrainConfig:
    """Settings of a discrete retraining run. The E-MSA defaults (ρ, λ, α, its anneal, batch 100,
    random initial codes) are the paper's (Li & Hao, 2018); the paper trained 250 epochs, and its
    binary MNIST run used ``loss="squared_hinge"``. The CLI's ``--epochs`` defaults to 5."""

    method: str = "msa"            # msa | ste (BinaryConnect for binary, TWN for ternary)
    mode: str = "ternary"          # ternary | binary
    epochs: int = 10
    batch_size: int = 100
    rho: float | None = None       # None: 0.25 ternary, 0.5 binary
    lam: float = 1e-7
    ema_decay: float = 0.999
    ema_anneal: float = 0.95
    init: str = "random"           # random (paper) | twn (from the float weights)
    scale: str = "auto"            # auto (fixed where BatchNorm follows) | fixed | learned
    lr: float = 1e-3               # Adam: continuous parameters, learned scales, STE latents
    loss: str = "cross_entropy"    # cross_entropy | squared_hinge
    outputs: str = "auto"          # logits | probabilities (the model ends in a softmax: the loss takes their
    #                                log) | auto: probabilities when the model's last operation is a softmax
    keep_float: tuple = ()         # globs, or "first" / "last"
    distill: bool = False          # learn from the float model's outputs too
    distill_temperature: float = 4.0
    distill_weight: float = 0.5
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    seed: int = 0
    compile: str = "auto"          # fuse the MSA update with torch.compile: auto | on | off
    cuda_graphs: str = "auto"      # replay each step from a CUDA graph: auto (on CUDA, one process) | on | off
    precision: str = "fp32"        # fp32 | tf32 (CUDA matmuls and convs in TF32) | bf16 (autocast)
    keep_best: bool = False        # with a validation split: end with the epoch of best validation accuracy
    float16: bool = False          # compress: store the .tern file's float tensors in IEEE binary16
    time_budget: float | None = None  # seconds of training (a resumed run's earlier epochs count too);
    #                                   stops after the epoch that exceeds it
    checkpoint: str | None = None  # path of the per-epoch checkpoint
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.keep_float, str):  # one pattern, not its characters
            self.keep_float = (self.keep_float,)
        elif self.keep_float is None:
            self.keep_float = ()
        elif isinstance(self.keep_float, (list, tuple, set, frozenset)):
            self.keep_float = tuple(self.keep_float)

    def validate(self) -> None:
        _require(isinstance(self.keep_float, tuple) and all(isinstance(k, str) for k in self.keep_float),
                 f"keep_float must be glob strings (or 'first' / 'last'), got {self.keep_float!r}")
        _one_of("method", self.method, ("msa", "ste"))
        _one_of("mode", self.mode, ("ternary", "binary"))
        _one_of("init", self.init, ("random", "twn"))
        _one_of("scale", self.scale, ("auto", "fixed", "learned"))
        _one_of("loss", self.loss, LOSSES)
        _one_of("outputs", self.outputs, OUTPUTS)
        _one_of("compile", self.compile, ("auto", "on", "off"))
        _one_of("cuda_graphs", self.cuda_graphs, ("auto", "on", "off"))
        _one_of("precision", self.precision, ("fp32", "tf32", "bf16"))
        _require(isinstance(self.epochs, int) and 1 <= self.epochs <= MAX_EPOCHS,
                 f"epochs must be from 1 to {MAX_EPOCHS}, got {self.epochs}")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 2,
                 f"batch size must be >= 2 (BatchNorm needs two samples), got {self.batch_size}")
        for name in ("rho", "lam", "ema_decay", "ema_anneal", "lr", "distill_temperature", "distill_weight",
                     "time_budget"):
            value = getattr(self, name)
            _require((value is None and name in ("rho", "time_budget")) or _finite(value),
                     f"{name} must be a finite number, got {value!r}")
        _require(isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool)
                 and 0 <= self.seed < 1 << 32, f"seed must be an integer from 0 to 2**32 - 1, got {self.seed!r}")
        _require(isinstance(self.device, str), f"device must be a name such as 'cpu' or 'cuda:0', got {self.device!r}")
        _require(self.rho is None or self.rho > 0, f"rho must be positive, got {self.rho}")
        _require(self.lam >= 0, f"lam must be >= 0, got {self.lam}")
        _require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _require(0 < self.ema_anneal <= 1, f"ema_anneal must be in (0, 1], got {self.ema_anneal}")
        _require(self.lr > 0, f"lr must be positive, got {self.lr}")
        # beyond these a float32 step overflows (Adam divides lr by 1 − β₁ᵗ); they are absurd long before
        _require(self.lr <= MAX_LR, f"lr must be at most {MAX_LR:g} (Adam's step size), got {self.lr}")
        _require(self.rho is None or self.rho <= MAX_RHO, f"rho must be at most {MAX_RHO:g}, got {self.rho}")
        _require(self.lam <= MAX_LAM, f"lam must be at most {MAX_LAM:g}, got {self.lam}")
        _require(self.distill_temperature > 0, "distill temperature must be positive")
        _require(0 <= self.distill_weight <= 1, "distill weight must be in [0, 1]")
        _require(not self.resume or self.checkpoint, "resume needs a checkpoint path")
        _require(isinstance(self.float16, (bool, np.bool_)), f"float16 must be True or False, got {self.float16!r}")
        _require(self.time_budget is None or self.time_budget > 0,
                 f"time budget must be positive, got {self.time_budget}")
        world = _world_size()
        if world <= 1:  # torchrun ranks pick their own device
            device = _device(self.device)
            _require(self.precision != "tf32" or device.type == "cuda",
                     f"precision tf32 needs a CUDA GPU and this run is on {device.type}; use fp32 or bf16")
            _require(self.cuda_graphs != "on" or device.type == "cuda",
                     f"cuda_graphs 'on' needs a CUDA GPU and this run is on {device.type}; use 'auto' or 'off'")
        else:
            _require(self.cuda_graphs != "on", "cuda_graphs 'on' is not supported under torchrun (the steps "
                                               "all-reduce gradients); use 'auto' or 'off'")
            _require(self.batch_size >= 2 * world, f"batch size {self.batch_size} gives some of the {world} processes "
                     f"fewer than 2 samples (BatchNorm needs two); use a batch size of at least {2 * world}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["keep_float"] = list(self.keep_float)
        return d


@dataclass
class TrainResult:
    model: nn.Module
    history: list = field(default_factory=list)    # one dict per epoch
    discrete: dict = field(default_factory=dict)   # parameter name -> "ternary" | "binary"
    scales: dict = field(default_factory=dict)     # parameter name -> "fixed" | "learned"
    config: TrainConfig | None = None
    seconds: float = 0.0  # wall time of the epochs (evaluation included), a resumed run's earlier processes too
    # one {"after_epoch": n, "changed": {setting: [old, new]}} per resume that changed a setting
    resumed: list = field(default_factory=list)
    kept_epoch: int | None = None  # keep_best: the epoch whose weights the model ends with
    # "on": the steps were replayed from a CUDA graph; "off": not asked for or not possible (CPU,
    # torchrun, too few full batches); "failed: <reason>": the capture failed and the steps ran eagerly
    cuda_graphs: str = "off"


# ---------------------------------------------------------------------- public entry points


def fit(model: nn.Module, data, config: TrainConfig | None = None, teacher: nn.Module | None = None,
        log=print, on_start=None) -> TrainResult:
    """Retrain ``model`` in place with discrete weights; see the module docstring.

    ``data`` is a :class:`ternarize.data.Dataset`. ``teacher`` (for ``distill``) defaults to a copy
    of the float model taken before any weight becomes discrete. ``on_start``, if given, is called
    once the run is set up (with ``resume``, the checkpoint accepted), before anything is logged.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    check_fits(model, data, teacher)
    if config.keep_best and getattr(data, "x_val", None) is None:
        raise ConfigError("keep_best picks the epoch of best validation accuracy, and the data has no validation "
                          "split: hold one out (--val-fraction 0.1, or Dataset.split_validation)")
    config = _resolved(config, model)
    dist = _Distributed.setup(config.device)
    if config.distill and teacher is None:
        teacher = copy.deepcopy(model)
    model.to(dist.device)
    layers = policy.discrete_layers(model, config.keep_float, config.scale)
    origin = _origin(model, data) if config.checkpoint else None
    resume_state = _load_checkpoint(config, origin) if config.resume else None
    if resume_state is not None:
        _check_epochs(resume_state, config)
        _load_state(model, resume_state["model"], config.checkpoint)
    torch.manual_seed(config.seed)
    graphs = _use_graphs(config, dist)
    discrete_opt, adam = _optimizers(model, layers, config, capturable=graphs)
    if resume_state is not None:
        # again: the optimizers' initialisation rewrote the discrete weights, and a tensor it cannot
        # recognise as discrete (a layer whose weights are all 0) got fresh random codes
        _load_state(model, resume_state["model"], config.checkpoint)
    tensors = _Tensors.from_dataset(data, dist.device)
    teacher_logits = _teacher_logits(teacher, tensors, dist.device) if config.distill else None
    result = TrainResult(model, [], {lay.param: config.mode for lay in layers},
                         {lay.param: lay.scale for lay in layers}, config)
    start_epoch = 0
    if on_start is not None:
        on_start()
    best = None  # keep_best: {"epoch", "acc", "model"} of the best validation accuracy so far
    if resume_state is not None:
        start_epoch = _restore(resume_state, discrete_opt, adam, result, config, log, dist)
        best = resume_state.get("best") if config.keep_best else None
    net = dist.wrap(model)
    run = _Run(net, model, discrete_opt, adam, tensors, teacher_logits, config, dist, log, graphs)
    t0, earlier = time.perf_counter(), result.seconds  # a resumed run's earlier processes count too
    with _tf32(config.precision == "tf32"):
        for epoch in range(start_epoch, config.epochs):
            record = run.epoch(epoch)
            result.history.append(record)
            result.seconds = earlier + time.perf_counter() - t0
            if config.keep_best and (best is None or record["val_acc"] > best["acc"]):
                best = {"epoch": epoch + 1, "acc": record["val_acc"],
                        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            if config.checkpoint and dist.rank == 0:
                _save_checkpoint(config, model, discrete_opt, adam, result, epoch, origin, best)
            run.said(record)  # after the checkpoint: a run stopped once the line shows resumes after it
            spent = sum(h["seconds"] for h in result.history)
            if config.time_budget and dist.agree(spent > config.time_budget) and epoch + 1 < config.epochs:
                if dist.rank == 0:
                    log(f"stopping after epoch {epoch + 1}: the time budget of {config.time_budget:g}s is spent")
                break
    if best is not None:
        result.kept_epoch = best["epoch"]
        if best["epoch"] != len(result.history):
            model.load_state_dict(best["model"])  # copied into the model's own tensors, on its device
        if dist.rank == 0:
            log(f"kept the weights of epoch {best['epoch']}, the best validation accuracy "
                f"({100 * best['acc']:.2f}%) of the {len(result.history)} epochs")
    result.cuda_graphs = run.graph_state()
    del run, net  # a DistributedDataParallel wrapper goes before its process group (see close)
    dist.close()
    result.seconds = earlier + time.perf_counter() - t0
    return result


def _resolved(config: TrainConfig, model: nn.Module) -> TrainConfig:
    """``config`` with ``outputs="auto"`` made ``logits`` or ``probabilities`` (a copy: the
    caller's object is left as it is)."""
    if config.outputs != "auto":
        return config
    return dataclasses.replace(config, outputs=model_outputs(model))


_VIEWS = {"flatten", "reshape", "view", "squeeze", "contiguous"}


def model_outputs(model: nn.Module) -> str:
    """"probabilities" when ``model`` returns a softmax over its class axis (through views of it),
    else "logits" (a log-softmax's output is its own log-softmax: cross-entropy takes it as it is).
    Read from the model's torch.fx graph, without running it; a model fx cannot trace counts as
    giving logits."""
    from torch import fx

    from ..errors import LoweringError
    from ..lowering import _trace

    try:
        traced = _trace(model)
    except LoweringError:
        return "logits"
    modules = dict(traced.named_modules())
    node = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    while isinstance(node, fx.Node):
        module = modules.get(node.target) if node.op == "call_module" else None
        name = getattr(node.target, "__name__", node.target) if node.op != "call_module" else None
        if isinstance(module, nn.Softmax):
            return "probabilities" if module.dim in (None, 1, -1) else "logits"
        if name == "softmax" and node.op in ("call_function", "call_method"):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            return "probabilities" if dim in (None, 1, -1) else "logits"
        if isinstance(module, (nn.Flatten, nn.Identity, nn.Dropout)) or name in _VIEWS:
            node = node.args[0]
            continue
        return "logits"
    return "logits"


def _use_graphs(config, dist) -> bool:
    """Whether the steps are captured in a CUDA graph: asked for (or ``auto``), on CUDA, one process."""
    return config.cuda_graphs != "off" and dist.device.type == "cuda" and dist.world == 1


@contextlib.contextmanager
def _tf32(enabled: bool):
    """Allow TF32 in CUDA matmuls and convolutions for the duration of training, then restore."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fit_float(model: nn.Module, data, epochs: int = 5, lr: float = 1e-3, batch_size: int = 100,
              device: str = "auto", seed: int = 0, progress: bool = True, log=print,
              cuda_graphs: str = "auto") -> list[dict]:
    """Plain float training with Adam and cross-entropy (for making a float model to compress).
    The settings are checked as :class:`TrainConfig` fields, and the model against the data
    (:func:`check_fits`), before any training. On one GPU the steps are replayed from a CUDA graph
    unless ``cuda_graphs="off"``; a failed capture is logged and the steps run eagerly."""
    config = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, progress=progress, lr=lr, device=device,
                         cuda_graphs=cuda_graphs)
    config.validate()
    check_fits(model, data)
    config = _resolved(config, model)
    dist = _Distributed.setup(device)
    torch.manual_seed(seed)
    model.to(dist.device)
    tensors = _Tensors.from_dataset(data, dist.device)
    graphs = _use_graphs(config, dist)
    adam = _adam(model.parameters(), lr, capturable=graphs)
    run = _Run(dist.wrap(model), model, None, adam, tensors, None, config, dist, log, graphs)
    history = [run.said(run.epoch(e)) for e in range(epochs)]
    del run  # a DistributedDataParallel wrapper goes before its process group (see close)
    dist.close()
    return history


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000,
             outputs: str = "logits") -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode; restores the training flag.
    ``outputs``: what the model returns, as ``TrainConfig.outputs``."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            scores = _log_probabilities(out) if outputs == "probabilities" else out
            loss += F.cross_entropy(scores, y[i:i + batch], reduction="sum")
            correct += (out.argmax(1) == y[i:i + batch]).sum()
    model.train(was)
    n = max(1, len(x))
    return float(loss) / n, float(correct) / n


# ---------------------------------------------------------------------- pieces


def _finite(value) -> bool:
    """A finite real number (numpy scalars included, bools not)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _one_of(name, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} is unknown; choose one of {', '.join(allowed)}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _import_before_group() -> None:
    """Import what DistributedDataParallel imports on first use before the process group exists:
    imported while a default group exists, ``torch.distributed.fsdp`` keeps references to it, so
    that ``destroy_process_group`` leaves it alive with its gloo threads, which can then abort the
    process at interpreter exit."""
    try:
        import torch.distributed.fsdp  # noqa: F401
    except ImportError:  # a torch without it: nothing to import early
        pass


class _Distributed:
    """Device choice and, under torchrun, the process group and DDP wrapping."""

    def __init__(self, device: torch.device, rank: int, world: int, owned: bool = False):
        self.device, self.rank, self.world = device, rank, world
        self.owned = owned  # this object started the process group and ends it

    @classmethod
    def setup(cls, device: str) -> _Distributed:
        world = _world_size()
        if world <= 1:
            return cls(_device(device), 0, 1)
        import torch.distributed as tdist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device != "cpu" and torch.cuda.is_available()
        owned = not tdist.is_initialized()
        if owned:
            _import_before_group()
            tdist.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return cls(dev, tdist.get_rank(), tdist.get_world_size(), owned)

    def close(self) -> None:
        """End the process group this object started, every rank together: left to interpreter exit,
        its background threads can abort a rank that finishes before the others. The callers drop
        their DistributedDataParallel wrapper first: one torn down after its group is gone can
        wait forever."""
        if self.owned:
            import torch.distributed as tdist

            if tdist.is_initialized():
                gc.collect()  # a wrapper only a reference cycle still holds goes now, too
                tdist.barrier()
                tdist.destroy_process_group()
            self.owned = False

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics drift after the last forward)."""
        if self.world > 1:
            import torch.distributed as tdist

            for buf in model.buffers():
                tdist.broadcast(buf, 0)

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is true on any (so all ranks stop at the same epoch)."""
        if self.world <= 1:
            return flag
        import torch.distributed as tdist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as tdist

            t = t.clone()
            tdist.all_reduce(t)
            t /= self.world
        return t


def _world_size() -> int:
    """The number of processes training together: torchrun's WORLD_SIZE, else 1."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def check_fits(model, data, teacher=None) -> None:
    """Refuse, before any training, a model that is not an nn.Module or does not fit ``data`` (a
    :class:`~ternarize.data.Dataset`): it must accept two of its inputs and return scores of shape
    (batch, classes) with at least the data's classes; a ``teacher`` must return the same shape."""
    from ..data import Dataset

    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(data, Dataset):
        raise ConfigError(f"the data must be a ternarize Dataset (ternarize.load_dataset(name)), got "
                          f"{type(data).__name__}")
    world = _world_size()
    n = len(data.x_train)
    if n < 2 * world:  # BatchNorm needs two samples: a smaller batch is skipped (see _Run.batches)
        after = " left after the validation split" if data.x_val is not None else ""
        raise ConfigError(f"the training set has {n} example{'s' * (n != 1)}{after}; a training step needs at "
                          f"least {2 * world}" + (" (two per process)" if world > 1 else "")
                          + "; give more data" + (" or a smaller --val-fraction" if after else ""))
    y = _scores(model, data, "the model")  # first: it also creates a lazy module's parameters
    for name, t in model.named_parameters():  # buffers may hold -inf on purpose (a mask)
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            raise ConfigError(f"the model's {name} holds NaN or infinite values; retrain or repair the float model "
                              "before compressing it")
    for name, m in model.named_modules():  # BatchNorm statistics are folded into the layer before
        if not isinstance(m, nn.modules.batchnorm._NormBase):
            continue
        for stat in ("running_mean", "running_var"):
            t = getattr(m, stat, None)
            if t is None:
                continue
            what = ("NaN or infinite values" if not bool(torch.isfinite(t).all())
                    else "negative variances" if stat == "running_var" and bool((t < 0).any()) else None)
            if what:
                raise ConfigError(f"the model's {name}.{stat} holds {what}; retrain or repair the float model "
                                  "before compressing it")
    if y.shape[1] < data.num_classes:
        raise ConfigError(f"the model has {y.shape[1]} outputs but the data has {data.num_classes} classes; give "
                          "a model with an output per class, or data of the model's classes")
    if teacher is not None and tuple(_scores(teacher, data, "the teacher").shape) != tuple(y.shape):
        raise ConfigError(f"the teacher's outputs do not have the model's shape {tuple(y.shape)}")


def _scores(model, data, who: str) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{who} must be a torch nn.Module, got {type(model).__name__}")
    param = next(model.parameters(), None)
    example = torch.from_numpy(data.x_test[:2]).to(param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(example)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        other = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()
                        if p.is_floating_point() and p.dtype != torch.float32})
        hint = (f"; its parameters are {', '.join(other)} and the data is float32: convert it with model.float()"
                if other else "")
        raise ConfigError(f"{who} does not accept the data's inputs of shape {list(data.in_shape)} "
                          f"(batch excluded): {first}{hint}") from e
    finally:
        model.train(was_training)
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ConfigError(f"{who} must return class scores of shape (batch, classes); it returned "
                          f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    return y


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r} is unknown; use auto, cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                          f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


@dataclass
class _Tensors:
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None

    @classmethod
    def from_dataset(cls, data, device) -> _Tensors:
        def t(a, dtype):
            return None if a is None else torch.as_tensor(np.asarray(a), dtype=dtype).to(device)

        return cls(t(data.x_train, torch.float32), t(data.y_train, torch.long), t(data.x_test, torch.float32),
                   t(data.y_test, torch.long), t(getattr(data, "x_val", None), torch.float32),
                   t(getattr(data, "y_val", None), torch.long))


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _optimizers(model, layers, config, capturable=False):
    params = dict(model.named_parameters())
    discrete_ids = {id(params[lay.param]) for lay in layers}
    continuous = [p for p in model.parameters() if id(p) not in discrete_ids and p.requires_grad]
    adam = _adam(continuous, config.lr, capturable) if continuous else None
    groups = [{"params": [params[lay.param]], "scale": lay.scale} for lay in layers]
    if config.method == "msa":
        fused = {"auto": "auto", "on": True, "off": False}[config.compile]
        opt = MSA(groups, mode=config.mode, rho=config.rho, lam=config.lam, ema_decay=config.ema_decay,
                  ema_anneal=config.ema_anneal, scale_lr=config.lr, init=config.init, seed=config.seed, fused=fused)
    else:
        opt = STE(groups, mode=config.mode, lr=config.lr)
    return opt, adam


def _adam(params, lr: float, capturable: bool) -> torch.optim.Adam:
    """Adam; ``capturable`` keeps its step count and bias corrections on the device (CUDA graphs).
    On a GPU it is torch's fused Adam: one kernel that reads and writes each parameter's state
    once, where the default runs a dozen kernels over the list (a graphed float step of the paper
    MLP on an H200 in TF32: 0.32 against 0.56 ms, BENCHMARKS.md). Its warning that a
    capturable Adam stepping outside a graph is slower is expected here: the warm-up steps and a
    short last batch run eagerly by design."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda and p.dtype in _FUSED_DTYPES for p in params)
    adam = torch.optim.Adam(params, lr=lr, capturable=capturable, fused=True if fused else None)
    if capturable:
        adam._warned_capturable_if_run_uncaptured = True
    return adam


def _teacher_logits(teacher: nn.Module, tensors: _Tensors, device) -> torch.Tensor:
    teacher = teacher.to(device).eval()
    with torch.no_grad():
        return torch.cat([teacher(tensors.x[i:i + 1000]) for i in range(0, len(tensors.x), 1000)])


def _log_probabilities(p: torch.Tensor) -> torch.Tensor:
    """The log of a softmax's outputs: scores whose own log-softmax they are (they sum to 1), so
    cross-entropy, distillation and the hinge take them as they take logits."""
    return torch.log(p.float().clamp_min(torch.finfo(torch.float32).tiny))


def _loss(out, y, config, teacher_out=None) -> torch.Tensor:
    if config.outputs == "probabilities":  # cross-entropy over probabilities would apply softmax twice
        out = _log_probabilities(out)
        teacher_out = None if teacher_out is None else _log_probabilities(teacher_out)
    if config.loss == "squared_hinge":
        # ±1 targets; a comparison, not F.one_hot, which may check the labels on the host (a sync)
        target = (y.unsqueeze(1) == torch.arange(out.shape[1], device=y.device)).to(out.dtype) * 2 - 1
        base = F.relu(1 - target * out).pow(2).mean()
    else:
        base = F.cross_entropy(out, y)
    if teacher_out is None:
        return base
    t = config.distill_temperature
    kd = F.kl_div(F.log_softmax(out / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
                  reduction="batchmean", log_target=True) * t * t
    return (1 - config.distill_weight) * base + config.distill_weight * kd


class _Run:
    """One training run's epochs: batches, steps, evaluation and progress.

    With ``graphs`` every full batch's step is replayed from a CUDA graph (:mod:`.graphs`): the
    batch's indices are copied into a tensor that stays in place, and the step adds its loss to
    ``self.total`` on the device. A short last batch runs eagerly."""

    def __init__(self, net, model, discrete_opt, adam, tensors, teacher_logits, config, dist, log, graphs=False):
        self.net, self.model, self.opt, self.adam = net, model, discrete_opt, adam
        self.t, self.teacher, self.config, self.dist, self.log = tensors, teacher_logits, config, dist, log
        device = tensors.x.device
        self.total = torch.zeros((), device=device)  # the epoch's summed training loss
        self.graphed = None
        if graphs:
            self.static_idx = torch.zeros(config.batch_size, dtype=torch.long, device=device)
            self.graphed = GraphedStep(self._static_step, device, on_fail=self._graph_failed)

    def _static_step(self) -> None:
        self.total += self.step(self.static_idx).detach()

    def _graph_failed(self, reason: str) -> None:
        if self.dist.rank == 0:
            self.log(f"warning: the training step could not be captured in a CUDA graph ({reason}); "
                     "training goes on without graphs (slower; cuda_graphs='off' skips the attempt)")

    def graph_state(self) -> str:
        """TrainResult.cuda_graphs: "on", "off" or "failed: <reason>"."""
        if self.graphed is None or self.graphed.state == "warming":
            return "off"
        return "on" if self.graphed.state == "graphed" else f"failed: {self.graphed.reason}"

    def batches(self, epoch: int):
        """Index tensors of this rank's share of each batch; the order depends on (seed, epoch) only."""
        n, bs = len(self.t.x), self.config.batch_size
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen).to(self.t.x.device)
        starts = [i for i in range(0, n, bs) if min(bs, n - i) >= 2 * self.dist.world]
        for i in starts:
            yield perm[i:i + bs][self.dist.rank::self.dist.world]

    def epoch(self, epoch: int) -> dict:
        t0 = time.perf_counter()
        self.net.train()
        total = self.total
        total.zero_()
        steps = 0
        with _Progress(self.config, self.dist, epoch, len(self.t.x)) as bar:
            for idx in self.batches(epoch):
                if self.graphed is not None and len(idx) == len(self.static_idx):
                    self.static_idx.copy_(idx)
                    self.graphed()
                else:
                    total += self.step(idx).detach()
                steps += 1
                bar.advance(steps, total, self.opt)
        mean_loss = float(self.dist.all_reduce_mean(total)) / max(1, steps)
        if not math.isfinite(mean_loss):
            saved = self.config.checkpoint and os.path.isfile(self.config.checkpoint)
            where = f"; the last good checkpoint is {self.config.checkpoint}" if saved else ""
            raise TrainingError(f"the training loss became {mean_loss} in epoch {epoch + 1}{where}; "
                                "try a smaller --lr (or --rho) or check the data for NaNs")
        if self.opt is not None:
            self.opt.end_epoch()
        self.dist.sync_buffers(self.model)
        return self.record(epoch, mean_loss, time.perf_counter() - t0)

    def said(self, record: dict) -> dict:
        """The epoch's line (rank 0), once what it reports is kept (the checkpoint, if any, written)."""
        if self.dist.rank == 0:
            self.log(_describe(record, self.config.epochs))
        return record

    def step(self, idx) -> torch.Tensor:
        # autocast's cache of cast weights would be frozen into a CUDA graph: off when graphed
        with torch.autocast(self.t.x.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16",
                            cache_enabled=self.graphed is None):
            out = self.net(self.t.x[idx])
        teacher = self.teacher[idx] if self.teacher is not None else None
        loss = _loss(out.float(), self.t.y[idx], self.config, teacher)
        for opt in (self.opt, self.adam):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in (self.opt, self.adam):
            if opt is not None:
                opt.step()
        return loss

    def record(self, epoch: int, train_loss: float, seconds: float) -> dict:
        outputs = self.config.outputs
        test_loss, test_acc = evaluate(self.model, self.t.x_test, self.t.y_test, outputs=outputs)
        rec = {"epoch": epoch + 1, "train_loss": train_loss, "test_loss": test_loss, "test_acc": test_acc,
               "seconds": seconds}
        if self.t.x_val is not None:
            rec["val_loss"], rec["val_acc"] = evaluate(self.model, self.t.x_val, self.t.y_val, outputs=outputs)
        if self.opt is not None:
            rec.update(_sparsity(self.model, self.opt))
        return rec


def _sparsity(model: nn.Module, opt) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    layers, nz, total = {}, 0, 0
    for group in opt.param_groups:
        for p in group["params"]:
            k = int((p.detach() != 0).sum())
            layers[names[id(p)]] = k / p.numel()
            nz, total = nz + k, total + p.numel()
    return {"nonzero": nz / max(1, total), "layers": layers}


def _describe(rec: dict, epochs: int) -> str:
    text = (f"epoch {rec['epoch']}/{epochs}: loss {rec['train_loss']:.4f}, test acc {100 * rec['test_acc']:.2f}%")
    if "val_acc" in rec:
        text += f", val acc {100 * rec['val_acc']:.2f}%"
    if "nonzero" in rec:
        text += f", non-zero {100 * rec['nonzero']:.2f}%"
    return text + f" ({rec['seconds']:.1f}s)"


class _Progress:
    """A rich progress bar over an epoch's samples, refreshed a few times a second (each refresh
    reads the running loss, which syncs with the device; the steps in between do not). It goes to
    stderr, beside the log lines, and only to a terminal: a redirected run's output gets no blank
    lines from it."""

    def __init__(self, config, dist, epoch, n):
        self.enabled = config.progress and dist.rank == 0
        self.epoch, self.epochs, self.n, self.bs = epoch, config.epochs, n, config.batch_size
        self.last = 0.0

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = Console(stderr=True)
            self.enabled = console.is_terminal  # nor, then, the refreshes (each syncs with the device)
        if self.enabled:
            self.bar = Progress(TextColumn(f"epoch {self.epoch + 1}/{self.epochs}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.n, info="")
        return self

    def advance(self, steps, total, opt) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.25:
            return
        self.last = now
        info = f"loss {float(total) / steps:.4f}"
        if opt is not None:
            info += f"  non-zero {100 * float(opt.nonzero_fraction()):.1f}%"
        self.bar.update(self.task, completed=min(self.n, steps * self.bs), info=info)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


# ---------------------------------------------------------------------- checkpoints


# settings a resumed run must share with its checkpoint (α and η: the optimizer holds the annealed α)
_CHECKPOINT_KEYS = ("method", "mode", "batch_size", "seed", "init", "loss", "keep_float", "distill", "scale",
                    "ema_decay", "ema_anneal", "keep_best")
# settings a resumed run may change that steer the updates: they take effect, and are logged and recorded
_TUNED_KEYS = ("rho", "lam", "lr", "distill_temperature", "distill_weight", "precision", "outputs")
_BEFORE = {"outputs": "logits", "keep_best": False}  # what a checkpoint from before a setting existed ran with


def _saved_setting(saved: dict, key: str):
    """A setting of a checkpoint's config (``_BEFORE``'s value where it predates the setting)."""
    return saved.get(key, _BEFORE.get(key))
# the optimizers' group entries that follow them (load_state_dict would restore the checkpoint's),
# and Adam's capturable, fused and foreach, which follow this run's device and use of CUDA graphs,
# not the checkpoint's (a GPU run's fused Adam resumes on a CPU as the CPU run's default Adam)
_GROUP_KEYS = ("rho", "lam", "scale_lr", "lr", "capturable", "fused", "foreach")


def _origin(model, data) -> dict:
    """Fingerprints of the float model (its weights, before training) and of the training data
    (shapes, labels and a sample of the inputs, not the name: a path may be spelt anew), so that a
    resume can tell another model or dataset from the checkpoint's."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    shape = data.x_train.shape
    if len(shape) == 2:  # flat features, once held as (N, 1, 1, F): their checkpoints still resume
        shape = (shape[0], 1, 1, shape[1])
    d = hashlib.sha256(f"{shape}{data.num_classes}".encode())
    d.update(np.ascontiguousarray(data.y_train).tobytes())
    d.update(np.ascontiguousarray(data.x_train.reshape(-1)[::997]).tobytes())
    return {"model": h.hexdigest(), "data": d.hexdigest()}


def _save_checkpoint(config, model, discrete_opt, adam, result, epoch, origin=None, best=None) -> None:
    state = {
        "format": "ternarize-checkpoint", "version": __version__, "epoch": epoch,
        "config": config.to_json(), "model": model.state_dict(),
        "discrete_opt": discrete_opt.state_dict(), "adam": adam.state_dict() if adam is not None else None,
        "history": result.history, "rng": torch.get_rng_state(), "resumed": result.resumed,
        "seconds": result.seconds, "origin": origin, "best": best,
    }
    path = config.checkpoint
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, _saved(state))


def _saved(state) -> bytes:
    """``torch.save`` into memory: writing the bytes is ours, so a full disk is an OutputError
    (torch reports it as a RuntimeError)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _load_checkpoint(config, origin=None) -> dict:
    path = config.checkpoint
    if not os.path.isfile(path):
        raise ConfigError(f"there is no checkpoint to resume at {path}; run without --resume to start")
    try:
        state = load_weights_only(path)
    except Exception as e:
        raise ConfigError(f"the checkpoint {path} cannot be read ({type(e).__name__}); delete it to start over") from e
    if not isinstance(state, dict) or state.get("format") != "ternarize-checkpoint":
        raise ConfigError(f"{path} is not a ternarize training checkpoint")
    _check_checkpoint(state, path)
    saved = state["config"]
    mine = config.to_json()
    for key in _CHECKPOINT_KEYS:
        theirs = _saved_setting(saved, key)
        if theirs != mine.get(key):
            flag = "" if key in ("keep_float", "distill", "scale", "keep_best") or theirs is None else \
                f" (on the command line: --{key.replace('_', '-')} {theirs})"
            raise ConfigError(f"the checkpoint {path} was made with {key}={theirs!r}, not {mine.get(key)!r}; "
                              f"use the same settings to resume{flag}, or start over")
    theirs = state.get("origin")  # absent in checkpoints written before it was kept
    for key, what in (("model", "another float model (its weights differ)"), ("data", "other training data")):
        if isinstance(theirs, dict) and origin is not None and theirs.get(key) not in (None, origin[key]):
            raise ConfigError(f"the checkpoint {path} was made from {what}; resume with the same model file, "
                              "--data and --val-fraction, or start over")
    return state


def _damaged(path, what: str) -> ConfigError:
    return ConfigError(f"the checkpoint {path} is damaged ({what}); delete it to start over")


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite_number(value) -> bool:
    return _number(value) and math.isfinite(value)


def _check_checkpoint(state: dict, path) -> None:
    """The fields a resume reads, each of the type and size ``_save_checkpoint`` writes (the
    optimizers' per-parameter state is checked once loaded, by ``_check_optimizer``)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise _damaged(path, what)

    need(isinstance(state.get("config"), dict), "its config is not a mapping")
    epoch = state.get("epoch")
    need(isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0,
         f"its epoch is {str(epoch)[:40]!r}, not a count")
    model = state.get("model")
    need(isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()),
         "its model is not a state dict of tensors")
    for key in ("discrete_opt", "adam"):
        opt = state.get(key)
        need((opt is None and key == "adam") or (
            isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) for g in opt["param_groups"])), f"its {key} is not an optimizer's state")
    history = state.get("history")
    need(isinstance(history, list) and len(history) == epoch + 1,
         f"its history does not hold one record for each of its {epoch + 1} epochs")
    for i, rec in enumerate(history):
        need(isinstance(rec, dict) and rec.get("epoch") == i + 1 and _finite_number(rec.get("seconds"))
             and all(_number(rec.get(k)) for k in ("train_loss", "test_loss", "test_acc")),
             f"its history record {i + 1} is not an epoch's record")
    rng, ours = state.get("rng"), torch.get_rng_state()
    need(isinstance(rng, torch.Tensor) and rng.dtype == ours.dtype and rng.shape == ours.shape,
         "its random number generator state is not one")
    resumed = state.get("resumed")
    need(resumed is None or (isinstance(resumed, list) and all(isinstance(r, dict) for r in resumed)),
         "its list of resumes is not one")
    best = state.get("best")
    need(best is None or (
        isinstance(best, dict) and isinstance(best.get("epoch"), int) and 1 <= best["epoch"] <= epoch + 1
        and _finite_number(best.get("acc")) and 0 <= best["acc"] <= 1 and isinstance(best.get("model"), dict)
        and list(best["model"]) == list(model) and all(
            isinstance(v, torch.Tensor) and v.shape == model[k].shape and v.dtype == model[k].dtype
            and (not v.is_floating_point() or bool(torch.isfinite(v).all())) for k, v in best["model"].items())),
         "its best epoch's weights are not the model's")


def _layout(opt) -> tuple[list, list]:
    """What a loaded optimizer state must match: per group its settings, per parameter the shape
    of each tensor the optimizer keeps (MSA's, made at construction; Adam's, empty before a step)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    tensors = [{k: tuple(v.shape) for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
               for g in opt.param_groups for p in g["params"]]
    return groups, tensors


_ADAM_STATE = ("exp_avg", "exp_avg_sq")  # Adam keeps these, of the parameter's shape, and a step count


def _same_kind(theirs, mine) -> bool:
    """A loaded optimizer setting as this run's is: a finite number, a bool, or (a string) the same."""
    if _finite_number(mine):
        return _finite_number(theirs)
    if isinstance(mine, bool):
        return isinstance(theirs, bool)
    if isinstance(mine, str):
        return theirs == mine
    return True


def _check_optimizer(opt, layout, path) -> None:
    """After ``load_state_dict``: the groups' settings of the types this run's have (strings equal:
    they follow the checked config), and every per-parameter tensor there and of its shape."""
    groups, tensors = layout
    for group, ref in zip(opt.param_groups, groups):
        for key, mine in ref.items():
            if key not in group or key in _GROUP_KEYS:
                continue  # torch fills in settings older checkpoints lack; _GROUP_KEYS are this run's
            if not _same_kind(group[key], mine):
                raise _damaged(path, f"its optimizer setting {key} is {str(group[key])[:40]!r}")
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, ref in zip(params, tensors):
        state = opt.state.get(p, {})
        if isinstance(opt, torch.optim.Adam) and state:
            ref = {k: tuple(p.shape) for k in _ADAM_STATE}
            step = state.get("step")
            if not (_finite_number(step) or isinstance(step, torch.Tensor) and step.numel() == 1):
                raise _damaged(path, "an Adam step count is not a number")
        for key, shape in ref.items():
            if key == "M_err" and key not in state:
                continue  # a checkpoint from before the compensated sum: MSA starts its carry at zero
            value = state.get(key)
            if not (isinstance(value, torch.Tensor) and tuple(value.shape) == shape):
                raise _damaged(path, f"its optimizer state {key} of a {tuple(p.shape)} parameter is not a tensor "
                                     f"of shape {shape}")


def _load_state(target, state, path) -> None:
    """``target.load_state_dict(state)``, a mismatch being the user's: a checkpoint of another model."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(f"the checkpoint {path} was made for a different model ({first}); start over "
                          "without --resume or choose another --out") from e


def _place_adam_steps(adam: torch.optim.Adam) -> None:
    """Adam's step counts where its groups now want them: on the parameter's device when capturable
    (CUDA graphs), else on the CPU. load_state_dict places them as the checkpoint's groups had them,
    so a checkpoint of a graphed GPU run would not resume on a CPU, nor an eager one in a graph."""
    for group in adam.param_groups:
        for p in group["params"]:
            step = adam.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                where = p.device if group.get("capturable") or group.get("fused") else torch.device("cpu")
                adam.state[p]["step"] = step.to(device=where, dtype=torch.float32)


def _check_epochs(state, config) -> int:
    """The epoch a checkpoint resumes at; one past this run's ``epochs`` is refused."""
    epoch = int(state["epoch"]) + 1
    if epoch > config.epochs:
        raise ConfigError(f"the checkpoint {config.checkpoint} has trained {epoch} epochs, more than --epochs "
                          f"{config.epochs}; resume with --epochs {epoch} or more, or start over without --resume")
    return epoch


def _restore(state, discrete_opt, adam, result, config, log, dist) -> int:
    """The optimizers' state, the RNG and the history from a checkpoint; this run's rho, lam and lr
    replace the checkpoint's in the optimizers, and a change is logged and added to
    ``result.resumed`` (kept in the checkpoint, so a later resume adds to it). Returns the epoch to start.
    A checkpoint at this run's ``epochs`` only finishes (changes unused)."""
    epoch = _check_epochs(state, config)
    for opt, saved_opt in ((discrete_opt, state["discrete_opt"]), (adam, state["adam"])):
        if opt is None or saved_opt is None:
            continue
        ours = [{k: g[k] for k in _GROUP_KEYS if k in g} for g in opt.param_groups]
        layout = _layout(opt)
        _load_state(opt, saved_opt, config.checkpoint)
        _check_optimizer(opt, layout, config.checkpoint)
        for group, values in zip(opt.param_groups, ours):
            group.update(values)
        if isinstance(opt, torch.optim.Adam):
            _place_adam_steps(opt)
    torch.set_rng_state(state["rng"])
    result.history = list(state["history"])
    # wall time of the processes before (a checkpoint without it: their epochs' training time)
    seconds = state.get("seconds")
    ok = isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0
    result.seconds = float(seconds) if ok else float(sum(h["seconds"] for h in result.history))
    saved, mine = state["config"], config.to_json()
    changed = {k: [_saved_setting(saved, k), mine.get(k)] for k in _TUNED_KEYS
               if _saved_setting(saved, k) != mine.get(k)}
    # float16 shapes only the files written after training: a resume may change it (a checkpoint
    # from before the setting does not say what its run asked for)
    float16_changed = "float16" in saved and saved["float16"] != config.float16
    result.resumed = list(state.get("resumed") or [])
    if changed and epoch < config.epochs:
        result.resumed.append({"after_epoch": epoch, "changed": changed})
    if dist.rank == 0:
        log(f"resuming after epoch {epoch} of {config.epochs} from {config.checkpoint}"
            + ("" if epoch < config.epochs else ": no epoch remains, the outputs are written"))
        if changed and epoch == config.epochs:
            log(f"warning: settings changed since the checkpoint ({', '.join(changed)}) are not used: no epoch "
                "remains to train; give more --epochs to train on with them")
        elif changed:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            before = "epoch 1" if epoch == 1 else f"epochs 1-{epoch}"
            log(f"warning: settings changed since the checkpoint: {what}; {before} used the old values, the "
                "rest use the new ones (recorded in the report as training.resumed)")
        if float16_changed:
            was, now, other = (("without", "half precision", "float32") if config.float16
                               else ("with", "float32", "half precision"))
            log(f"warning: the interrupted run was started {was} --float16; this one writes the .tern file's "
                f"float tensors in {now} (resume {was} --float16 for {other})")
    return epoch

