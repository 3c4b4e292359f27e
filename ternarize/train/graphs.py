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
Adam needs ``capturable=True``. The last warm-up call (unless it is the first, where torch.compile
compiles and times its kernels) runs under torch's sync debug mode: a step that synchronises with
the host is never captured. If a capture fails anyway, what it left behind is
undone (the current stream, the allocator's capture into the graph's pool, the random generator's
capture mode). Either way ``on_fail`` says why (a warning by default) and every later call runs
``fn`` eagerly: a step that cannot be captured still trains, only slower. Where a failed capture
cannot be undone, :class:`StuckCapture` (a :class:`~ternarize.TrainingError`) says to turn graphs off.

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

from .._text import error_line
from ..errors import TrainingError

WARMUP = 3  # eager calls before the capture (PyTorch's documented whole-network example uses 3 and more)
# torch's warning, in sync debug mode "warn", for each call that synchronises with the host; and the
# notice it gives once a process when the mode is first set, which names no synchronisation
_SYNC_WARNING = "called a synchronizing"
_PROTOTYPE_NOTICE = "debug mode is a prototype"


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
            # not the first call: torch.compile compiles and times its kernels there, which
            # synchronises, once; a step that syncs in every call does so in the last one too
            synced = self._on_side_stream(check=1 < self.calls == self.warmup)
            if synced:  # a capture would fail; better never to start one (see _recover)
                self._give_up(f"the step synchronises with the host ({synced})")
            return
        self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()

    def _on_side_stream(self, check: bool = False) -> str | None:
        """One eager call on the side stream. With ``check``, the first host synchronisation the call
        made (torch's sync debug mode), which a capture cannot contain, or None."""
        current = torch.cuda.current_stream(self.device)
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side), _sync_warnings(check) as seen:
            self.fn()
        current.wait_stream(self._side)
        return seen[0] if seen else None

    def _capture(self) -> None:
        graph = _new_graph()
        try:
            _record(graph, self.fn, self.device, self._side)
        except Exception as e:  # an operation that cannot be captured: train on, eagerly
            failure = e if not isinstance(e, _CaptureFailed) else e.cause
            reason = error_line(failure)
            if isinstance(e, _CaptureFailed) and e.stuck:
                self.reason = reason
                raise StuckCapture(f"the training step could not be captured in a CUDA graph ({reason}) and "
                                    f"cannot run eagerly in this process either ({e.stuck}); run again with "
                                    "--cuda-graphs off (TrainConfig(cuda_graphs='off'))") from e
            self._give_up(reason)
            return
        self.graph = graph
        self.state = "graphed"

    def _give_up(self, reason: str) -> None:
        self.reason, self.state = reason, "eager"
        self.on_fail(reason)


@contextlib.contextmanager
def _sync_warnings(enabled: bool):
    """Collect, as one line each, the host synchronisations made in the body (torch's sync debug
    mode "warn"); yields the list (left empty where the mode is not available)."""
    seen = []
    try:
        before = torch.cuda.get_sync_debug_mode() if enabled else None
    except Exception:  # noqa: BLE001 - no sync debug mode here: no check, the capture will tell
        before = None
    if before is None:
        yield seen
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(before)
    for w in caught:
        text = str(w.message)
        if _SYNC_WARNING in text:
            seen.append(text.strip().splitlines()[0][:160])
        elif _PROTOTYPE_NOTICE not in text:  # not ours: as if never caught
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class StuckCapture(TrainingError):
    """A capture failed and left the process unable to run CUDA work reliably: nothing more should
    run on the GPU in this process."""


class _CaptureFailed(Exception):
    """A capture failed: ``cause`` is what failed in the step (else the capture's own error), and
    ``stuck`` what the failed capture left behind that could not be undone (None: all undone)."""

    def __init__(self, cause: BaseException, stuck: str | None):
        super().__init__(str(cause))
        self.cause, self.stuck = cause, stuck


def _new_graph():
    return torch.cuda.CUDAGraph()


def _record(graph, fn, device: torch.device, stream) -> None:
    """Capture ``fn()`` into ``graph`` on ``stream`` (a side stream of ``device``; None: a new one,
    not torch.cuda.graph's shared default, which belongs to the device it was made on): its kernels are
    recorded, not run. After a failure, what the failed capture left behind is undone
    (:func:`_recover`) and :class:`_CaptureFailed` raised with the step's own error, if it raised one
    (the capture's end then adds "operation failed due to a previous error during capture")."""
    pool = torch.cuda.graph_pool_handle()
    current = torch.cuda.current_stream(device)
    stream = stream if stream is not None else torch.cuda.Stream(device)
    errors = []

    def step():
        try:
            fn()
        except Exception as e:
            errors.append(e)
            raise

    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            step()
    except Exception as e:
        raise _CaptureFailed(errors[0] if errors else e, _recover(device, current, pool)) from e


def _recover(device: torch.device, stream, pool) -> str | None:
    """Undo what a failed capture leaves behind so that the step can run eagerly; returns what
    could not be undone, or None. The capture's end raised before leaving the capture stream, so
    ``stream`` is made current again; before ending the allocator's capture into ``pool``, so
    allocations would keep being checked against it and ``empty_cache`` refused: it is ended and
    the pool released; and (torch 2.11) before the random generator's epilogue, so the device's
    generator would stay in capture mode, where every later random draw (dropout's) fails: it gets a
    fresh state with the same seed and offset."""
    try:
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            torch._C._cuda_endAllocateToPool(index, pool)
        except RuntimeError:  # the capture's end had ended it
            pass
        else:
            torch._C._cuda_releasePool(index, pool)
        generator = torch.cuda.default_generators[index]
        fresh = torch.Generator(device=device)
        fresh.set_state(generator.get_state())
        generator.graphsafe_set_state(fresh.graphsafe_get_state())
    except Exception as e:  # e.g. a torch without these calls
        return error_line(e, 120)
    return None


def _warn(reason: str) -> None:
    warnings.warn(f"the training step could not be captured in a CUDA graph ({reason}); it runs eagerly",
                  stacklevel=5)
