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
Adam needs ``capturable=True``. If the capture fails, a warning is given and every later call runs
``fn`` eagerly, so a step that cannot be captured still trains, only slower.

Example::

    x_static.copy_(x0); y_static.copy_(y0)
    step = GraphedStep(lambda: train_step(x_static, y_static), torch.device("cuda"))
    for x, y in batches:
        x_static.copy_(x); y_static.copy_(y)
        step()
"""

from __future__ import annotations

import warnings

import torch

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
            _record(graph, self.fn)
        except Exception as e:  # an operation that cannot be captured: train on, eagerly
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            self.reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
            self.state = "eager"
            torch.cuda.synchronize(self.device)
            self.on_fail(self.reason)
            return
        self.graph = graph
        self.state = "graphed"


def _new_graph():
    return torch.cuda.CUDAGraph()


def _record(graph, fn) -> None:
    """Capture ``fn()`` into ``graph``: its kernels are recorded, not run."""
    with torch.cuda.graph(graph):
        fn()


def _warn(reason: str) -> None:
    warnings.warn(f"the training step could not be captured in a CUDA graph ({reason}); it runs eagerly",
                  stacklevel=4)
