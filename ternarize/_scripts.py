"""Shared pieces of the scripts under examples/ and bench/ (private; torch is imported only by
:func:`device`).

Argparse types that refuse a bad value, checks to run before the long work (outputs, device and
precision), an atomic JSON writer, and :func:`main`, which runs a script's ``main(argv)`` and turns
a :class:`ternarize.Error`, an ``OSError`` or Ctrl-C into one line on stderr,
``<script>: <what is wrong>; <what to do>``, with exit code 2 (130 for Ctrl-C). With
``TERNARIZE_DEBUG=1`` the exception goes through with its traceback. The parser from :func:`parser`
reports usage errors in one line too, with exit code 2.

Example::

    from ternarize import _scripts

    def main(argv=None) -> int:
        p = _scripts.parser(__file__, __doc__)
        p.add_argument("--steps", type=_scripts.positive_int, default=20)
        p.add_argument("--models", type=_scripts.models(["mlp", "vgg"]), default="mlp,vgg")
        p.add_argument("--json")
        args = p.parse_args(argv)
        _scripts.check_output(args.json)          # before the work
        ...
        _scripts.write_json(args.json, results)   # atomic

    if __name__ == "__main__":
        sys.exit(_scripts.main(main))
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys

from . import _io
from ._text import one_line
from .errors import ConfigError, Error, OutputError


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line on stderr, with exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {one_line(message)}; see {self.prog} --help\n")


def parser(file: str, doc: str | None) -> ArgumentParser:
    """The parser of the script ``file`` (its name is the program name), described by the first
    paragraph of ``doc`` (its lines joined)."""
    first = (doc or "").strip().split("\n\n")[0]
    return ArgumentParser(prog=os.path.basename(file), description=" ".join(first.split()))


# ---------------------------------------------------------------------- argparse types


def integer(low: int, high: int | None = None):
    """An argparse type: an integer from ``low`` to ``high`` (no upper bound when None)."""
    what = (f"an integer from {low} to {high}" if high is not None else "a positive integer" if low == 1
            else f"an integer >= {low}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = integer(1)
non_negative_int = integer(0)
seed = integer(0, 2**32 - 1)
units = integer(1, 2**20)  # an MLP's width: units per layer


def _real(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    return _real(text, "a finite number above 0", lambda v: v > 0)


def fraction(text: str) -> float:
    """An argparse type: a number above 0 and at most 1."""
    return _real(text, "a number above 0 and at most 1", lambda v: 0 < v <= 1)


def width(text: str) -> float:
    """An argparse type: a VGG width multiplier (1: the paper's channel counts), above 0 and at most 1024."""
    return _real(text, "a width multiplier above 0 and at most 1024 (1: the paper's channels)",
                 lambda v: 0 < v <= 1024)


def models(allowed):
    """An argparse type: a comma-separated list of names from ``allowed`` (spaces around names ignored)."""
    allowed = tuple(allowed)

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",")]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown model {unknown[0]!r}; give a comma-separated list of "
                                             f"{', '.join(allowed)}")
        return names

    return parse


def model_options(ap, with_models: bool = True) -> None:
    """The benchmark models' options: ``--width`` (MLP units), ``--vgg-width`` (VGG multiplier)
    and, with ``with_models``, ``--models`` (a comma-separated list of mlp, vgg)."""
    ap.add_argument("--width", type=units, default=2048, help="MLP hidden width (paper: 2048)")
    ap.add_argument("--vgg-width", type=width, default=0.5, help="VGG width multiplier")
    if with_models:
        ap.add_argument("--models", type=models(["mlp", "vgg"]), default="mlp,vgg",
                        help="comma-separated: mlp, vgg")


# ---------------------------------------------------------------------- checks before the work


def check_output(path, inputs=()):
    """Refuse, before any work, an output file ``path`` that cannot be written or is one of the
    ``inputs`` (:func:`ternarize._io.check_output`: OutputError). None passes (no output asked)."""
    return None if path is None else _io.check_output(path, inputs=[i for i in inputs if i is not None])


@contextlib.contextmanager
def output_folder(path, files=()):
    """Check that ``path`` is, or can be made, a writable folder and that none of ``files`` in it is
    a folder or another non-regular file (OutputError); create the missing folders, then run the
    body. When the body fails, the folders made here are removed again if they are empty."""
    text = os.fspath(path)
    if not text or "\0" in text:
        raise OutputError(f"the output folder {text!r} is not a usable name; give a folder name")
    missing = _io.missing_folders(text)
    existing = os.path.dirname(missing[-1]) if missing else os.path.abspath(text)
    if not os.path.isdir(existing):
        where = f"{text} is" if not missing else f"{existing} (in the path of {text}) is"
        raise OutputError(f"{where} not a folder; choose another folder for the outputs")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in the folder {existing}: it is not writable; choose another place")
    if not missing:
        for name in files:
            _io.check_target(os.path.join(text, name))
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
        yield text
    except BaseException:
        with _io.signals_deferred():  # a further SIGTERM waits for the clean-up (see main)
            _io.remove_empty(missing)
        raise


def device(name: str, precision: str = "fp32", precisions=("fp32", "tf32", "bf16")):
    """Check a ``--device`` (auto, cpu, cuda, cuda:N) and ``--precision`` (one of ``precisions``,
    the script's choices) as training does (ConfigError: unknown device, no CUDA GPU, tf32 off
    CUDA, its hint naming the script's other choices) and return the torch.device; auto is cuda
    when a GPU is available, else cpu."""
    import torch

    from .train.loop import TrainConfig

    TrainConfig(device=name, precision="fp32" if precision == "tf32" else precision).validate()
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto"
                          else name)
    if precision == "tf32" and device.type != "cuda":
        others = " or ".join(p for p in precisions if p != "tf32")
        raise ConfigError(f"precision tf32 needs a CUDA GPU and this run is on {device.type}; use {others}")
    return device


@contextlib.contextmanager
def out_of_memory(hint: str):
    """Turn running out of memory in the body (MemoryError, or torch's RuntimeError "can't allocate
    memory" / CUDA "out of memory") into one ConfigError line that ends with ``hint``."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        text = str(e)
        if not isinstance(e, MemoryError) and "allocate memory" not in text and "out of memory" not in text:
            raise
        asked = re.search(r"allocate ([0-9]+) bytes|allocate ([0-9.]+ [KMGTP]iB)", text)
        size = "" if not asked else asked.group(2) or f"{int(asked.group(1)) / 2**30:,.1f} GiB"
        raise ConfigError(f"out of memory{f' (an allocation of {size} failed)' if size else ''}; {hint}") from e


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (OutputError when that fails)."""
    _io.atomic_write(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------- running a script


def _stop(signum, _frame) -> None:
    """SIGTERM or SIGHUP in a script: stop where it is, as Ctrl-C does (``_io.Stopped``); one that
    comes while a clean-up runs waits for its end."""
    if _io.deferring_signals():
        _io.defer_signal(signum)
        return
    raise _io.stop_exception(signum)


def main(fn, argv=None) -> int:
    """Run ``fn(argv)`` (a script's main) and return its exit code (None counts as 0). A
    :class:`ternarize.Error` or an ``OSError`` becomes one line on stderr and code 2; Ctrl-C, SIGTERM
    and SIGHUP stop the script as Ctrl-C does (clean-ups run) with the line "interrupted" or
    "stopped by SIGTERM" and code 130, 143 or 129; the line starts with the script's file name.
    With ``TERNARIZE_DEBUG=1`` the exception is raised instead."""
    import signal

    prog = os.path.basename(fn.__globals__.get("__file__") or sys.argv[0])
    debug = os.environ.get("TERNARIZE_DEBUG") == "1"
    before = {}
    for name in ("SIGTERM", "SIGHUP"):
        s = getattr(signal, name, None)
        if s is not None and signal.getsignal(s) == signal.SIG_DFL:  # not one ignored (nohup) or handled
            with contextlib.suppress(ValueError, OSError):  # ValueError: not the main thread
                before[s] = signal.signal(s, _stop)
    try:
        return fn(argv) or 0
    except (Error, OSError) as e:
        if debug:
            raise
        message = one_line(e) if isinstance(e, Error) else one_line(_io.os_error_line(e))
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:
        if debug:
            raise
        signum = getattr(e, "signum", None)
        print(f"{prog}: {_io.stop_words(signum)}", file=sys.stderr, flush=True)
        return 128 + signum if signum else 130
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
