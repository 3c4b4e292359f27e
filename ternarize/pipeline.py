"""The whole job in one call: load → evaluate → retrain → lower → write .tern and .onnx → verify →
report.

Everything that can be checked before training is checked first (options, the model file, the
dataset, that the model accepts the data's input shape and has enough outputs, that it can be
lowered, that the output folder may be written), so bad input fails in seconds with one line.
After training, the .tern file is run by the numpy runtime and the .onnx file by onnxruntime on
held-out inputs and both are compared with the trained torch model; a disagreement removes them
and raises :class:`VerificationError`. Every file is written atomically; under ``torchrun`` every
rank trains and rank 0 alone writes.

Example::

    result = ternarize.compress("model.pt", "mnist", out="out", epochs=5)
    print(result.report.summary())
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, fields

import numpy as np
import torch

from . import tern
from ._io import (
    LOCK,
    busy,
    busy_error,
    check_target,
    folder_lock,
    is_temp_of,
    missing_folders,
    remove_empty,
    same_file,
    signals_deferred,
)
from ._text import printable
from .data import Dataset, load_dataset
from .data import _canonical as dataset_name
from .errors import ConfigError, OutputError, VerificationError
from .load import load_model
from .lowering import lower
from .train import policy
from .train.loop import TrainConfig, TrainResult, check_fits, evaluate, fit

OUTPUTS = ("model.tern", "model.onnx", "report.json", "report.md", "layers.png", "training.png", "weights.png")
CHECKPOINT = "checkpoint.pt"
FLOAT_MODEL = "float_model.pt"  # the demo's float model, beside its outputs
PROBE = ".ternarize-probe-"  # a file made and removed to see that the output folder can be written
PREVIOUS = ".ternarize-previous"  # with --force, the previous outputs wait here until the new ones are written
VERIFY_SAMPLES = 512
RTOL = 1e-4
F16_MAX_CHANGED = 0.01  # with float16: the most held-out inputs whose predicted class may change
PAPER_ANNEAL = {"cifar10": 0.98}  # η of the paper's CIFAR-10 runs; MNIST and SVHN: 0.95, TrainConfig's default


@dataclass
class CompressResult:
    out: str
    tern_path: str
    onnx_path: str
    report: object            # ternarize.report.Report
    train: TrainResult | None
    float_accuracy: float
    accuracy: float           # the trained torch model on the test set
    runtime_accuracy: float   # the .tern file run by the numpy runtime on the test set
    files: list


def compress(model, data, out: str = "out", *, arch: str | None = None, trust: bool = False,
             data_dir: str | None = None, val_fraction: float = 0.0, force: bool = False, log=print,
             resumable: bool = True, **options) -> CompressResult | None:
    """Compress ``model`` (an nn.Module or a model file path) on ``data`` (a Dataset or a name).

    ``val_fraction`` holds out that share of the training set (the same split for the same seed)
    and reports accuracy on it after every epoch. ``resumable`` False removes the checkpoint too
    when the run fails (for callers that cannot resume). ``float16=True`` stores the float tensors
    (scales, biases, float-kept layers) of the .tern file as IEEE binary16, half their bytes, unless
    that changes the predicted class of more than ``F16_MAX_CHANGED`` of the held-out inputs (then
    they stay float32, with a warning); the .onnx file holds the same rounded values.

    ``options`` are :class:`ternarize.TrainConfig` fields (mode, method, epochs, rho, lam,
    keep_float, distill, device, seed, resume, ...). Without ``ema_anneal``, a dataset named in
    ``PAPER_ANNEAL`` gets the paper's (0.98 for cifar10), any other TrainConfig's 0.95. Returns None
    on ranks other than 0 under torchrun.
    """
    config = _config(paper_defaults(data, options), out)
    if _rank() != 0:
        log = _quiet  # under torchrun, rank 0 alone speaks
    model_path = model if isinstance(model, (str, os.PathLike)) else None
    if model_path is not None:
        model = load_model(model_path, arch=arch, trust=trust, log=log)
    # the file is hashed once the load has checked it (a 5 GB file that is no model is refused first)
    source = _source_info(model_path if model_path is not None else model)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch nn.Module or the path of a model file, got {type(model).__name__}")
    dataset = data if isinstance(data, Dataset) else load_dataset(data, data_dir=data_dir)
    if val_fraction:
        dataset = dataset.split_validation(val_fraction, seed=config.seed)
    if config.keep_best and dataset.x_val is None:
        raise ConfigError("--keep-best picks the epoch of best validation accuracy: hold out a validation set "
                          "with --val-fraction (0.1, say)")
    writer = _rank() == 0  # the other ranks of a torchrun job only train
    inputs = [p for p in (model_path, data) if isinstance(p, (str, os.PathLike))]
    if writer:
        check_out(out, force=force, resume=config.resume, inputs=inputs)
        if "checkpoint" in options:  # a path of the caller's: never one of the inputs, a folder or a device
            check_target(config.checkpoint)
            if any(same_file(source, config.checkpoint) for source in inputs):
                raise ConfigError(f"the checkpoint {config.checkpoint} is one of the inputs; choose another path")
    example = torch.from_numpy(dataset.x_test[:2])
    check_fits(model, dataset)
    policy.discrete_layers(model, config.keep_float, config.scale)  # a --keep-float that matches nothing
    lower(model, example)  # an unsupported op fails here, before any training
    with OutputFolder(out, force=force, resume=config.resume, active=writer, resumable=resumable,
                      inputs=inputs) as folder:
        float_acc = _accuracy(model, dataset)
        float_weights = {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters()}
        result = fit(model, dataset, config, log=log,  # a checkpoint --resume refuses: no line before the error
                     on_start=lambda: log(f"float model: test accuracy {100 * float_acc:.2f}%"))
        if not writer:
            return None
        model.cpu().eval()
        acc = _accuracy(model, dataset)
        params = dict(model.named_parameters())
        if result.discrete and all(not params[n].detach().any() for n in result.discrete):
            log("warning: every discrete weight ended at 0, so the model ignores its input; lower --lam "
                "(the price of a non-zero weight) or --rho, or train longer")
        graph = lower(model, example, discrete=result.discrete)
        graph.metadata.update(_metadata(source, dataset, config, result, float_acc, acc))
        return _write_outputs(out, graph, model, dataset, result, float_acc, acc,
                              {k: float_weights[k] for k in result.discrete}, log, folder, float16=config.float16)


# ---------------------------------------------------------------------- before training


def paper_defaults(data, options: dict) -> dict:
    """``options`` with the paper's η for a dataset given by name or alias (``PAPER_ANNEAL``) unless set."""
    name = dataset_name(data) if isinstance(data, str) else None
    if "ema_anneal" in options or name not in PAPER_ANNEAL:
        return options
    return {**options, "ema_anneal": PAPER_ANNEAL[name]}


def _config(options: dict, out: str) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; options are TrainConfig fields: {', '.join(sorted(names))}")
    options = dict(options)
    options.setdefault("checkpoint", os.path.join(out, CHECKPOINT))
    config = TrainConfig(**options)
    config.validate()
    return config


def _source_info(model) -> dict:
    if isinstance(model, (str, os.PathLike)) and os.path.isfile(model):
        h = hashlib.sha256()
        with open(model, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return {"source": os.path.basename(os.fspath(model)), "source_sha256": h.hexdigest(),
                "source_bytes": os.path.getsize(model)}
    return {"source": type(model).__name__} if not isinstance(model, (str, os.PathLike)) else {}


def _own_temp(name: str) -> bool:
    """A temp file this tool makes for one of its outputs or to probe the folder (left by a killed
    run), the previous outputs a killed ``--force`` run set aside, or the folder's lock."""
    return is_temp_of(name, OUTPUTS + (CHECKPOINT, FLOAT_MODEL)) or name.startswith(PROBE) or name in (PREVIOUS, LOCK)


def check_out(out: str, force: bool, resume: bool, inputs=(), resumable: bool = True) -> None:
    """Refuse an output folder that cannot be used, before any work and without touching it: a
    path that is not a folder or cannot be listed, a folder holding other files without ``force``
    (or no checkpoint with ``resume``), an output name taken by a folder or by one of ``inputs``
    (the model or data file: ``--force`` would remove it), a parent folder that is a file.
    ``resumable`` False: the caller has no ``--resume`` to suggest (the demo)."""
    if not out:
        raise ConfigError("--out is empty; give an output folder")
    if os.path.islink(out) and not os.path.exists(out):
        raise ConfigError(f"--out {out} is a link that leads to no folder (a broken link or a loop); fix the "
                          "link or choose another path")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} exists and is not a folder; choose another path")
    try:
        present = [f for f in os.listdir(out) if not _own_temp(f)] if os.path.isdir(out) else []
    except OSError as e:
        raise OutputError(f"cannot list the output folder {out}: {e.strerror or e}; choose another --out") from e
    if os.path.isdir(out) and busy(out):  # what it holds is that run's, not a finished or killed one's
        raise busy_error(out)
    for name in OUTPUTS + (CHECKPOINT,):
        path = os.path.join(out, name)
        if name not in present:
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is not a regular file, so the run could not write it; remove it or "
                              "choose another --out")
        if any(same_file(source, path) for source in inputs):
            raise ConfigError(f"the input {path} has the name of an output in {out}; move it or choose another --out")
    if resume:
        if CHECKPOINT not in present:
            finished = "model.tern" in present  # a finished run removes its checkpoint
            raise ConfigError(f"there is no {CHECKPOINT} in {out} to resume from"
                              + ("; the run there has finished: to train again, run without --resume and with "
                                 "--force (it replaces the folder's files), or choose another --out" if finished
                                 else "; run without --resume"))
        return
    if present and not force:
        raise ConfigError(f"the output folder {out} already holds {', '.join(sorted(present)[:3])}"
                          f"{' ...' if len(present) > 3 else ''}; pass --force to overwrite it"
                          + (" or --resume to continue" if resumable else ""))
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # makedirs creates the missing folders under the first that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot create the output folder {out}: {parent} is a file, not a folder; "
                          "choose another --out")


class OutputFolder:
    """The output folder of one run, from just before training to the written report.

    On entry: :func:`check_out`, the folder is created if missing (remembering which folders this
    run made) and locked (:func:`ternarize._io.folder_lock`: a second run into the same folder
    stops with one line), previous outputs a killed ``--force`` run set aside are put back
    (``_recover``), :func:`check_out` again, stale temp files of a killed run are removed, with
    ``force`` the previous outputs are set aside (in ``PREVIOUS``, inside the folder), and a
    probe file shows that the folder can be written (a read-only folder or file system fails here,
    before training). On success this run's checkpoint and the previous outputs are deleted (in
    one step that a signal waits for). On a failure or an interrupt
    inside, the outputs written so far are removed, the previous ones are put back (a signal
    meanwhile waits for the end: ``_io.signals_deferred``), and the folders
    this run made are removed again if they are left empty. A checkpoint this run wrote stays for
    ``--resume`` (and the error says so) when ``resumable``; otherwise (the demo, which has no
    ``--resume``) it goes too. ``active`` False (a torchrun rank other than 0) does nothing;
    ``also`` names more outputs than ``OUTPUTS`` to set aside (the demo's float model).
    """

    def __init__(self, out: str, force: bool, resume: bool, active: bool = True, resumable: bool = True,
                 inputs=(), also=()):
        self.out, self.force, self.resume, self.active = out, force, resume, active
        self.also = tuple(also)  # more names of this run's outputs (the demo's float model)
        self.resumable, self.inputs = resumable, inputs
        self.made: list[str] = []  # folders this run created, deepest first
        self.written: list[str] = []  # outputs of this run, removed on failure
        self.previous = os.path.join(out, PREVIOUS)  # with force: the previous outputs, until the end
        self.nested = False  # inside another OutputFolder of the same folder (the demo's): that one owns them
        self._lock = None

    def __enter__(self) -> OutputFolder:
        if not self.active:
            return self
        out = self.out
        check_out(out, self.force, self.resume, self.inputs, self.resumable)
        try:
            self.made = missing_folders(out)
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            self._tidy()
            raise OutputError(f"cannot write to the output folder {out}: {e.strerror or e}; "
                              "choose another --out") from e
        try:
            self._lock = folder_lock(out)
            nested = self.nested = self._lock.__enter__()  # a compress inside the demo's folder
        except BaseException:
            self._lock = None
            self._tidy()
            raise
        try:
            if not nested:
                self._recover()
            check_out(out, self.force, self.resume, self.inputs, self.resumable)  # another run may have finished
            for name in os.listdir(out):
                path = os.path.join(out, name)
                if os.path.isfile(path) and _own_temp(name) and name != LOCK:
                    os.remove(path)
            if self.force and not self.resume and not nested:  # (the outer folder has set them aside)
                present = [n for n in OUTPUTS + (CHECKPOINT,) + self.also if os.path.isfile(os.path.join(out, n))]
                if present:
                    os.mkdir(self.previous)
                for name in present:  # a signal midway: _restore puts back what PREVIOUS holds
                    os.replace(os.path.join(out, name), os.path.join(self.previous, name))
            with signals_deferred():  # an interrupt between the two leaves no probe behind
                fd, probe = tempfile.mkstemp(prefix=PROBE, dir=out)
                os.close(fd)
                os.remove(probe)
        except BaseException as e:
            with signals_deferred():
                self._restore()
                self._unlock()
                self._tidy()
            if isinstance(e, OSError):
                raise OutputError(f"cannot write to the output folder {out}: {e.strerror or e}; "
                                  "choose another --out") from e
            raise
        return self

    def add(self, *paths: str) -> None:
        """Record outputs written by this run (removed if the run fails after all)."""
        self.written.extend(paths)

    def __exit__(self, kind, error, tb) -> None:
        if not self.active:
            return
        kept = os.path.join(self.out, CHECKPOINT)
        with signals_deferred():  # a signal now waits until the folder is as it should be
            try:
                if kind is None:  # the new outputs are in place: the checkpoint and the previous ones can go
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(kept)
                    if not self.nested:
                        with contextlib.suppress(OSError):
                            shutil.rmtree(self.previous)
                    return
                for path in self.written + ([] if self.resumable else [kept]):
                    with contextlib.suppress(OSError):
                        os.remove(path)
                ours = os.path.isfile(kept)  # a checkpoint of this run (the previous one is set aside)
                self._restore()
            finally:
                self._unlock()
                self._tidy()
        if not (self.resumable and ours):
            return
        hint = f"the training is kept in {kept}: rerun with --resume"
        if isinstance(error, OutputError) and "--resume" not in str(error):
            raise OutputError(f"{error}; {hint} once the outputs can be written") from error
        if isinstance(error, KeyboardInterrupt):
            error.args = (f"{hint} to continue",)

    def _restore(self) -> None:
        """Put the previous outputs set aside back; a previous checkpoint goes where this run keeps
        its own. Whatever cannot go back stays set aside (never deleted here): see ``_recover``."""
        if self.nested:
            return
        if CHECKPOINT in self._put_back():
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.previous, CHECKPOINT))
        with contextlib.suppress(OSError):
            os.rmdir(self.previous)

    def _recover(self) -> None:
        """Previous outputs a killed ``--force`` run left set aside: back where no file took their
        place. Any others stop this run with one line: which of the two files to keep is the
        user's choice."""
        left = self._put_back()
        if left:
            raise OutputError(f"{self.previous} holds {', '.join(left)} of an earlier run, set aside by a --force run "
                              f"that was stopped while {self.out} holds newer files of those names; keep what you "
                              "need and remove that folder")
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.previous)

    def _put_back(self) -> list[str]:
        """Move each file set aside back into the folder where no file has its name; the names left."""
        if not os.path.isdir(self.previous) or os.path.islink(self.previous):
            return []
        for name in os.listdir(self.previous):
            target = os.path.join(self.out, name)
            with contextlib.suppress(OSError):
                if not os.path.lexists(target):
                    os.replace(os.path.join(self.previous, name), target)
        return sorted(os.listdir(self.previous))

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def _tidy(self) -> None:
        remove_empty(self.made)


def _accuracy(model, dataset: Dataset) -> float:
    model = model.cpu()
    return evaluate(model, torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test))[1]


def _quiet(_message: str) -> None:
    pass


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _metadata(source, dataset, config, result, float_acc, acc) -> dict:
    """What the .tern header keeps about its making: small on purpose (the per-epoch history, which
    can outweigh a small model's tensors, goes to report.json instead)."""
    used = result.config or config  # as fit resolved it (outputs="auto")
    settings = {k: v for k, v in used.to_json().items() if k not in ("checkpoint", "resume", "progress")}
    return {**source, "name": source.get("source", "model"), "dataset": dataset.name, "mode": config.mode,
            "method": config.method, "training": {"settings": settings, "epochs": len(result.history),
                                                  "seconds": round(result.seconds, 3),
                                                  **({"resumed": result.resumed} if result.resumed else {}),
                                                  **({"kept_epoch": result.kept_epoch}
                                                     if result.kept_epoch is not None else {}),
                                                  **({"cuda_graphs": result.cuda_graphs}
                                                     if result.cuda_graphs != "off" else {})},
            "accuracy": {"float": float_acc, "trained": acc}}


# ---------------------------------------------------------------------- after training


def _write_outputs(out, graph, model, dataset, result, float_acc, acc, float_weights, log,
                   folder: OutputFolder, float16: bool = False) -> CompressResult:
    """Write and check the outputs; any failure removes them (``folder`` does, on leaving)."""
    from . import onnx as onnx_export
    from . import report as reporting
    from .runtime import Runtime

    tern_path, onnx_path = os.path.join(out, "model.tern"), os.path.join(out, "model.onnx")
    folder.add(tern_path, onnx_path, *(os.path.join(out, name) for name in OUTPUTS[2:]))
    tern.write(graph, tern_path)
    runtime = Runtime.load(tern_path, sparse="indices")  # the fastest form; memory is no concern here
    x = dataset.x_test[:VERIFY_SAMPLES]
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    got = runtime.run(x)
    _agree("the .tern file (numpy runtime)", got, reference)
    against, full = "the trained torch model", None
    if float16:
        half = _write_half(graph, tern_path, x, got, log)
        if half is not None:  # from here on, the file's own (rounded) outputs are the reference
            full, (graph, runtime, reference) = graph, half
            against = "the .tern file with float16 tensors"
    runtime_acc = runtime.accuracy(dataset.x_test, dataset.y_test)
    accuracy = graph.metadata["accuracy"] | {"runtime": runtime_acc}
    _update_accuracy(tern_path, graph, accuracy, allow_lossy=full is not None)
    if full is not None:
        record = graph.metadata["float16"]
        plain = {k: v for k, v in graph.metadata.items() if k != "float16"}  # the file without --float16
        as_f32 = len(tern.dumps(dataclasses.replace(full, metadata=plain))[0])
        log(f"float16 tensors: model.tern is {os.path.getsize(tern_path):,} bytes instead of {as_f32:,}; outputs "
            f"moved by at most {record['max_change']:.2g} of their largest value, the predicted class changed on "
            f"{100 * record['class_changed']:.1f}% of the {len(x)} test inputs checked")
    onnx_export.export(graph, onnx_path)  # the .tern's metadata: `ternarize export` gives the same file
    _agree("the .onnx file (onnxruntime)", onnx_export.run(onnx_export.session(onnx_path), x), reference, against)
    training = dict(graph.metadata["training"], history=result.history)
    rep = reporting.build(tern_path, onnx_path, runtime=Runtime.load(tern_path), training=training)
    files = [tern_path, onnx_path] + rep.write(out, float_weights)
    log(f"wrote {', '.join(os.path.basename(f) for f in files)} to {printable(out)}")
    return CompressResult(out, tern_path, onnx_path, rep, result, float_acc, acc, runtime_acc, files)


def halved(graph):
    """A copy of ``graph`` whose float32 constants are rounded to the nearest IEEE binary16 values,
    which the .tern writer then stores as f16 (two bytes each). A constant with a value that rounds
    to infinity in binary16 (|x| ≥ 65520) keeps its float32 values. The input graph is left unchanged."""
    from .graph import Const

    consts = {}
    for name, const in graph.consts.items():
        if isinstance(const, Const) and const.kind == "float32":
            with np.errstate(over="ignore"):
                rounded = const.data.astype(np.float16)
            if np.isfinite(rounded).all():
                const = Const("float32", rounded.astype(np.float32))
        consts[name] = const
    return dataclasses.replace(graph, consts=consts, metadata=dict(graph.metadata))


def _write_half(graph, tern_path: str, x: np.ndarray, full: np.ndarray, log):
    """Rewrite ``tern_path`` with the float tensors in f16; return (graph, runtime, outputs on ``x``)
    for it, or None (the float32 file written back, with a warning) when that changes the predicted
    class of more than ``F16_MAX_CHANGED`` of ``x``. ``full``: the float32 file's outputs on ``x``.
    Either graph's metadata records the outcome under ``float16``."""
    from .runtime import Runtime

    half = halved(graph)
    tern.write(half, tern_path, allow_lossy=True)
    runtime = Runtime.load(tern_path, sparse="indices")
    got = runtime.run(x)
    finite = bool(np.isfinite(got).all())
    changed = float((got.argmax(1) != full.argmax(1)).mean()) if finite else 1.0
    moved = float(np.abs(got - full).max()) / (float(np.abs(full).max()) or 1.0) if finite else float("inf")
    record = {"stored": changed <= F16_MAX_CHANGED, "class_changed": changed,
              "max_change": moved if finite else None}
    if not record["stored"]:
        graph.metadata["float16"] = record
        tern.write(graph, tern_path)
        log(f"warning: float16 tensors changed the predicted class of {100 * changed:.1f}% of the {len(x)} test "
            f"inputs checked (more than {100 * F16_MAX_CHANGED:g}%); model.tern keeps its float tensors in float32")
        return None
    half.metadata["float16"] = record
    return half, runtime, got


def _agree(what: str, got: np.ndarray, reference: np.ndarray, against: str = "the trained torch model") -> None:
    scale = float(np.abs(reference).max()) or 1.0
    err = float(np.abs(got - reference).max()) if got.shape == reference.shape else float("inf")
    if not err <= RTOL * scale:
        raise VerificationError(f"{what} disagrees with {against}: max |difference| {err:.3g} "
                                f"> {RTOL:g} x {scale:.3g}; the output files were removed (please report this)")
    same = float((got.argmax(1) == reference.argmax(1)).mean())
    if same < 0.999:
        raise VerificationError(f"{what} predicts a different class than {against} on "
                                f"{100 * (1 - same):.2f}% of held-out inputs; the output files were removed")


def _update_accuracy(tern_path: str, graph, accuracy: dict, allow_lossy: bool = False) -> None:
    """Rewrite the .tern with the runtime's accuracy in its metadata (same tensors, atomic)."""
    graph.metadata["accuracy"] = accuracy
    tern.write(graph, tern_path, allow_lossy=allow_lossy)
