"""Training steps replayed from a CUDA graph.

A training step of a small model on a fast GPU is bound by kernel launches, not by arithmetic:
the paper's MLP at batch 100 spends most of an eager step starting some hundred small kernels one
after another from Python. Captured once in a CUDA graph, the whole step (forward, loss, backward,
the E-MSA update and Adam) is launched by one call.

``GraphedStep(fn, device)`` runs ``fn()`` eagerly for its first ``warmup`` calls, on a side stream
as CUDA graphs require (cuBLAS, autograd and torch.compile initialise there), captures the next call
(capturing records the kernels without running them) and from then on replays the graph, that call
included. Each call is one real step.

What ``fn`` must obey, since a replay repeats the captured kernels on the captured memory:

* read every input from tensors that stay in place (copy each batch into them before the call);
* keep all changing state in tensors updated in place: a Python number read inside ``fn``, or a
  tensor made anew outside it after the capture, is frozen at its value during the capture;
* not synchronise with the host (no ``.item()``, no data-dependent shapes): the capture fails;
* not choose in Python per call (``random.random()``, a counter in a model's forward): the choice
  made during the capture is replayed for good. Random numbers drawn by torch on the GPU are fine:
  each replay draws new ones.

The optimizers here obey this: :class:`~ternarize.train.msa.MSA` keeps 1 − α in one tensor that
``end_epoch`` fills in place, :class:`~ternarize.train.ste.STE` counts its steps on the device, and
Adam needs ``capturable=True``. If the capture fails, what it left behind is undone (the capture's
stream, the random generator's capture mode), ``on_fail`` says why (a warning by default) and every
later call runs ``fn`` eagerly: a step that cannot be captured still trains, only slower. Where that
cannot be undone, :class:`~ternarize.TrainingError` says to turn graphs off.

Example::

    x_static.copy_(x0); y_static.copy_(y0)
    step = GraphedStep(lambda: train_step(x_static, y_static), torch.device("cuda"))
    for x, y in batches:
        x_static.copy_(x); y_static.copy_(y)
        step()
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..errors import TrainingError

WARMUP = 3  # eager calls before the capture (PyTorch's documented whole-network example uses 3 and more)


class GraphedStep:
    """``fn()`` replayed from a CUDA graph after ``warmup`` eager calls; see the module docstring.

    ``state`` is ``"warming"``, ``"graphed"`` or ``"eager"`` (the capture failed; ``reason`` says why,
    and ``on_fail(reason)`` was called: by default a warning).
    """

    def __init__(self, fn, device: torch.device, warmup: int = WARMUP, on_fail=None):
        self.fn, self.device, self.warmup = fn, torch.device(device), warmup
        self.on_fail = on_fail or _warn
        self.calls = 0
        self.graph = None
        self.state = "warming"
        self.reason = None
        self._side = None

    def __call__(self) -> None:
        # the GPU of the step current: torch.cuda.graph captures on the current device's streams
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            self._call()

    def _call(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.state == "eager":
            self.fn()
            return
        if self.calls < self.warmup:
            self.calls += 1
            self._on_side_stream()
            return
        self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()

    def _on_side_stream(self) -> None:
        current = torch.cuda.current_stream(self.device)
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            self.fn()
        current.wait_stream(self._side)

    def _capture(self) -> None:
        graph = _new_graph()
        try:
            _record(graph, self.fn, self.device)
        except Exception as e:  # an operation that cannot be captured: train on, eagerly
            stuck = isinstance(e, _Stuck)
            self.reason = _root_reason(e.__cause__ if stuck else e)
            if stuck:
                raise TrainingError(f"the training step could not be captured in a CUDA graph ({self.reason}) and "
                                    f"cannot run eagerly in this process either ({e}); run again with --cuda-graphs "
                                    "off (TrainConfig(cuda_graphs='off'))") from e
            self.state = "eager"
            self.on_fail(self.reason)
            return
        self.graph = graph
        self.state = "graphed"


class _Stuck(Exception):
    """A failed capture left the device in a state that an eager step cannot run in."""


def _root_reason(e: BaseException) -> str:
    """'Type: first line' of what failed in the step: the first exception of the chain (the capture's
    end raises its own, 'operation failed due to a previous error during capture')."""
    while e.__context__ is not None:
        e = e.__context__
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _new_graph():
    return torch.cuda.CUDAGraph()


def _record(graph, fn, device: torch.device) -> None:
    """Capture ``fn()`` into ``graph``: its kernels are recorded, not run. After a failure, what the
    failed capture left behind is undone (:func:`_recover`) and the error raised again."""
    stream = torch.cuda.current_stream(device)
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:
        problem = _recover(device, stream)
        if problem:
            raise _Stuck(problem) from e
        raise


def _recover(device: torch.device, stream) -> str | None:
    """Undo what a failed capture leaves behind so that the step can run eagerly; returns what
    could not be undone, or None. torch.cuda.graph's exit raised before leaving the capture's
    stream, so that stream is still current; and before the random generator's epilogue, so the
    device's generator is still in capture mode, where every later random draw (dropout's) fails.
    The generator gets a fresh state with the same seed and offset."""
    try:
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
        fresh = torch.Generator(device=device)
        fresh.set_state(generator.get_state())
        generator.graphsafe_set_state(fresh.graphsafe_get_state())
    except Exception as e:  # e.g. a torch without graph-safe generator states
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
    return None


def _warn(reason: str) -> None:
    warnings.warn(f"the training step could not be captured in a CUDA graph ({reason}); it runs eagerly",
                  stacklevel=4)
