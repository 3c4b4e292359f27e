"""Reading model files safely.

Security policy: a model file is hostile until proven otherwise. Unpickling a file can run any code
the file names, so :func:`load_model` never unpickles anything it has not checked first:

1. The path is checked (exists, a regular file, not empty) and the first bytes are sniffed: a zip
   archive (``torch.save`` since 1.6, TorchScript) or a bare pickle (the legacy ``torch.save``
   format). Anything else is refused before torch sees it, and so is a zip record whose CRC-32
   fails (torch's reader does not check them: a changed weight would load silently), a compressed
   record (torch.save never writes one, and inflating it is how a small file fills the memory) and
   a record listed twice or overlapping another.
2. A TorchScript archive is refused unless ``trust=True``: it holds compiled TorchScript, and
   methods such as ``__setstate__`` run while ``torch.jit.load`` reads it, so it is code too (and
   it cannot be retrained: TorchScript cannot be lowered). With ``trust`` it loads as TorchScript.
3. Everything else loads with ``torch.load(weights_only=True)``, but for a full module in the
   legacy format, which stores the module's source code beside it: torch's safe loader cannot
   read that, so it is refused (re-save it with a current ``torch.save``, or trust it); a
   legacy-format state_dict loads. A full module saved with
   ``torch.save(model)`` names the classes it is built from; each name must be on the allowlist
   before anything is unpickled:

   - ``torch.nn.Module`` subclasses defined under ``torch.nn.modules`` (the built-in layers);
   - the zoo's classes (:func:`ternarize.zoo.classes`);
   - the data-only helpers that pickled modules reference (``collections.OrderedDict``,
     ``builtins.set``, ``torch.nn.Parameter`` and its tensor rebuild functions) and the two
     activation functions ``nn.TransformerEncoderLayer`` keeps as an attribute (relu, gelu).

   Names are matched against objects already imported; the file never makes this module import
   anything. A name off the list raises :class:`~ternarize.errors.UnsafeModelError`, and so does a
   pickle that calls a layer class (``REDUCE``) where torch.save rebuilds a layer from its state: the
   file would choose the size and number of layers built, and one that calls an allocation with a
   size of the file's (``bytearray(n)``, a legacy tensor or storage constructor), and objects
   nested more than ``MAX_NESTING`` deep (hashing them overflows the C stack). The calls torch's
   safe loader allows can still build large objects from small files in other ways, so that load
   runs with the growth of the address space capped (Linux: ``LOAD_MEMORY``; one such load at a
   time, as the limit and torch's allowlist are the process's). Pickle protocols
   0 and 1 (in a torch.save archive), 4 and 5, which torch's safe loader cannot read, are named as
   such.
4. ``trust=True`` (``--trust`` on the command line) loads with ``weights_only=False``: the file may
   then run any code, so pass it only for files from a trusted source.
5. Either way, a loaded module's parameter or buffer without data (on the ``meta`` device) or
   whose elements share memory (a small storage standing for a large tensor, as an ``expand``ed
   view does) is refused before anything copies it.

A file may also hold a state_dict (or a checkpoint dict wrapping one under ``state_dict``,
``model_state_dict`` or ``model``); then ``arch`` names the architecture to build and fill.

Example::

    from ternarize.load import load_model, parse_arch
    model = load_model("model.pt")                                    # a full module
    scripted = load_model("scripted.pt", trust=True)                 # TorchScript: its code runs
    model = load_model("weights.pt", arch="mlp(width=256, in_shape=(1, 8, 8))")
    model = load_model("weights.pt", arch="mypackage.models:build(depth=4)")
    build = parse_arch("vgg(width=0.5)")                             # a zero-argument factory
"""

from __future__ import annotations

import ast
import collections
import contextlib
import functools
import importlib
import inspect
import io
import os
import pickle
import pickletools
import re
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import zoo
from ._io import atomic_write, input_problem
from ._text import byte_size as _size
from ._text import printable
from .errors import Error, ModelLoadError, UnsafeModelError
from .tern import MAGIC

__all__ = ["load_model", "parse_arch"]

# Keys under which training scripts commonly nest the state_dict inside a checkpoint dict.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes DataParallel/DistributedDataParallel ("module.") and torch.compile ("_orig_mod.") add.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_NN_PREFIX = "torch.nn.modules."
# What reading a zip record can raise for a damaged or odd archive (encrypted: RuntimeError;
# an unknown compression: NotImplementedError).
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError)
# torch's weights-only unpickler reads protocols 2 and 3; 4 and 5 add opcodes it refuses (FRAME ...).
_SAFE_PROTOCOL = 3
# A checkpoint naming more distinct globals than this is not a model; stop retrying (fallback).
_MAX_GLOBALS = 512
# Arch specs are typed by people; a cap keeps ast from chewing on megabytes of nesting.
_MAX_SPEC = 2000
_HINT_TRUST = "pass --trust (CLI) / trust=True (API) only if the file comes from a trusted source"
_SPEC_FORMS = "expected NAME, NAME(key=value, ...) or package.module:factory(key=value, ...)"
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_SPEC_RE = re.compile(rf"(?P<target>{_DOTTED}(?::{_DOTTED})?)\s*(?P<call>\(.*)?", re.S)


def _full_name(obj) -> str:
    # The key torch's weights-only unpickler files an allowlisted global under.
    return f"{obj.__module__}.{obj.__qualname__}"


# Helpers a pickled nn.Module references besides its classes. Each one only carries data or does
# pure tensor math, so calling it with arguments from the file cannot reach the outside world.
_HELPERS = {
    _full_name(obj): obj
    for obj in (
        collections.OrderedDict,  # Module._parameters/_buffers/_modules and every hook dict
        set,  # Module._non_persistent_buffers_set
        nn.Parameter,  # the parameters themselves
        torch._utils._rebuild_parameter,  # how a Parameter pickles
        torch._utils._rebuild_tensor_v2,  # how a tensor pickles
        F.relu,  # nn.TransformerEncoderLayer(activation="relu") keeps the function
        F.gelu,  # ... and activation="gelu" (a builtin, torch._C._nn.gelu)
    )
}


# ---------------------------------------------------------------------------------------------
# Public API


def load_model(path, arch: str | None = None, trust: bool = False, log=None) -> nn.Module:
    """Load the model in ``path`` on the CPU, in eval mode, without running code from the file.

    ``path`` may hold a full module (``torch.save(model)``: its classes must be torch.nn built-ins
    or zoo models unless ``trust=True``), a TorchScript archive (only with ``trust=True``: loading it
    runs code stored in it), or a state_dict, for which ``arch``
    (see :func:`parse_arch`) names the architecture. ``arch`` is ignored when the file holds a full
    module (``log``, when given, is told so). Raises :class:`ModelLoadError` (or its subclass
    :class:`UnsafeModelError`) with a one-line message.
    """
    if not isinstance(trust, bool):  # a string such as "false" is truthy: only True may run code
        raise ModelLoadError(f"trust must be True or False, got {trust!r}")
    path = _check_path(path)
    if _sniff(path) == "torchscript":
        if not trust:
            raise UnsafeModelError(
                f"{path} is a TorchScript archive: loading it runs code stored in it, and TorchScript cannot be "
                "retrained; give the original module saved with torch.save(model), or a state_dict with --arch "
                "(in Python, load_model(path, trust=True) loads it as TorchScript)")
        model = _guarded(path, lambda: _load_torchscript(path))
    else:
        with _LOAD_LOCK:  # torch's allowlist of safe globals and the memory cap are the process's
            obj = _guarded(path, lambda: _unpickle(path, trust))
        model = _to_module(obj, path, arch)
        _check_tensors(model, path)
        if arch is not None and log is not None and _find_state_dict(obj) is None:
            log(f"warning: {path} holds a whole module, so --arch {printable(arch)} is not used")
    model.cpu()
    model.eval()
    return model


def save_model(model: nn.Module, path) -> None:
    """Save ``model`` whole with ``torch.save``, atomically, so that :func:`load_model` reads it back
    without ``trust`` when it is built from torch.nn modules and zoo models.

    Example::

        save_model(zoo.create("mlp", width=256), "model.pt")
    """
    buf = io.BytesIO()
    torch.save(model, buf)
    atomic_write(path, buf.getvalue())  # torch would turn a full disk into a RuntimeError


def parse_arch(spec: str) -> Callable[[], nn.Module]:
    """Turn an architecture spec into a zero-argument factory that builds the model.

    ``spec`` is a zoo name (``mlp``), a zoo name with keyword arguments (``mlp(width=256,
    in_shape=(1, 8, 8))``), or ``package.module:factory`` with optional keyword arguments. The
    arguments must be Python literals; they are parsed with :mod:`ast`, never evaluated. The module
    of a ``package.module:factory`` spec is imported here (the user named it, not a file).
    """
    target, kwargs = _split_spec(spec)
    if ":" in target:
        fn = _import_factory(spec, target)
    elif target in zoo.names():
        fn = functools.partial(zoo.create, target)
    else:
        hint = " (use package.module:factory for a factory)" if "." in target else ""
        raise ModelLoadError(
            f"unknown zoo model {target!r} in arch {spec!r}{hint}; choose one of "
            f"{', '.join(zoo.names())}, or pass package.module:factory"
        )
    return functools.partial(_build, spec, fn, kwargs)


# ---------------------------------------------------------------------------------------------
# The file: path checks and sniffing


def _check_path(path) -> Path:
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise ModelLoadError(f"model path must be a file path, got {type(path).__name__}") from None
    if p.is_dir():
        raise ModelLoadError(f"{p} is a folder, not a model file; pass the .pt/.pth file inside it")
    problem = input_problem(p)
    if problem:
        raise ModelLoadError(f"model file {p} {problem}")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"model file {p} is empty (0 bytes); the save that wrote it failed, save again")
    return p


def _sniff(p: Path) -> str:
    """'torchscript' or 'pickle' (torch.save, zip or legacy); anything else is refused."""
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {p}: {e.strerror or e}") from e
    if head in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive (or an empty one)
        return _zip_kind(p)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        return "pickle"  # a pickle (protocol 2+): the legacy torch.save format
    if head == MAGIC[:4]:
        raise ModelLoadError(f"{p} is a .tern file, what ternarize compress writes, not a PyTorch model; give the "
                             "float model it was made from (a .tern file runs with ternarize run)")
    what = "a text file" if _looks_like_text(p) else "an unknown binary format"
    raise ModelLoadError(
        f"{p} is not a PyTorch model file (it looks like {what}, not a torch.save or TorchScript "
        f"file); save the model with torch.save(model) or torch.jit.save"
    )


def _looks_like_text(p: Path) -> bool:
    with p.open("rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c.isspace() for c in text)


def _zip_kind(p: Path) -> str:
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            _check_records(z, p)
    except _ZIP_ERRORS as e:
        raise ModelLoadError(
            f"{p} is a truncated or corrupted archive ({e}); copy or save the model again"
        ) from e
    # torch writes every record under one top-level folder: <name>/data.pkl, <name>/code/...
    inner = {n.split("/")[1] for n in names if n.count("/") >= 1}
    if "constants.pkl" in inner or "code" in inner:
        return "torchscript"
    if "data.pkl" in inner:
        return "pickle"
    raise ModelLoadError(
        f"{p} is a zip archive but not a torch.save or TorchScript file (no data.pkl inside); "
        f"save the model with torch.save(model) or torch.jit.save"
    )


def _check_records(z: zipfile.ZipFile, p: Path) -> None:
    """Read every record once: torch's reader skips the zip's CRC-32s, so a changed byte of a weight
    would load silently. torch.save stores every record uncompressed, each once: a compressed data
    record (which torch would inflate, a zip bomb's way to fill the memory) and a record listed
    twice or overlapping another (to be read again and again) are refused. (TorchScript archives
    compress their code, which loads only with trust: it is not inflated here.)"""
    records = sorted(z.infolist(), key=lambda i: i.header_offset)
    seen: set[str] = set()
    for prev, info in zip([None, *records], records):
        if info.filename in seen or prev is not None and info.header_offset < prev.header_offset + 30 + \
                prev.compress_size:
            what = f"lists {info.filename} twice" if info.filename in seen else \
                f"has {info.filename} overlapping {prev.filename}"
            raise ModelLoadError(f"{p} is not a zip archive torch.save writes: it {what}; save the model again "
                                 "with torch.save")
        seen.add(info.filename)
        if info.compress_type != zipfile.ZIP_STORED:
            if info.filename.split("/")[1:2] == ["code"]:  # <archive>/code/...: TorchScript's
                continue
            raise ModelLoadError(f"{p} holds {info.filename} compressed (zip method {info.compress_type}), which "
                                 "torch.save never writes; save the model again with torch.save")
        try:
            with z.open(info) as f:
                while f.read(1 << 20):
                    pass
        except zipfile.BadZipFile as e:
            if "CRC" not in str(e):
                raise
            raise ModelLoadError(f"{p} is corrupted: {info.filename} inside it does not match its checksum; "
                                 "copy or save the model again") from e


def _load_torchscript(p: Path) -> torch.jit.ScriptModule:
    # torch >= 2.10 deprecates TorchScript; the warning would only be noise for someone who has
    # a TorchScript file to compress.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        return torch.jit.load(str(p), map_location="cpu")


def _guarded(p: Path, fn: Callable):
    """Run ``fn``; turn anything torch raises into a one-line ModelLoadError (cause kept)."""
    try:
        return fn()
    except Error:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"cannot load {p}: {_one_line(e)}; the file may be truncated or corrupted"
        ) from e


def _one_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    # torch's weights-only errors wrap the real reason in paragraphs of advice; keep the reason.
    _, found, reason = text.partition("WeightsUnpickler error:")
    lines = [s.strip() for s in (reason if found else text).splitlines() if s.strip()]
    line = next((s for s in lines if "GLOBAL " in s), lines[0] if lines else type(e).__name__)
    if len(line) <= 200:
        return line
    end = line.find(". ", 40, 200)  # whole sentences (torch's zip errors go on with advice), else whole words
    return line[:end] if end > 0 else line[:197].rsplit(" ", 1)[0] + "..."


# ---------------------------------------------------------------------------------------------
# Unpickling behind the allowlist


def _unpickle(p: Path, trust: bool):
    if trust:
        # The user vouched for the file: a plain pickle load, which may run code from it.
        try:
            return torch.load(p, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as e:
            if isinstance(e, AttributeError) and not str(e).startswith("Can't get attribute"):
                raise
            raise ModelLoadError(
                f"cannot load {p}: {_one_line(e)}: the file names a class this process cannot import; "
                "make the module that defines it importable (on PYTHONPATH; a class defined in a script run as "
                "__main__ must move to a module)") from e
    protocol = _pickle_protocol(p)
    if protocol is not None and not 2 <= protocol <= _SAFE_PROTOCOL:
        raise ModelLoadError(
            f"{p} was saved with pickle protocol {protocol if protocol > 1 else '0 or 1'}, which torch's safe loader "
            f"cannot read; save it again with torch.save's default protocol (no pickle_protocol argument), or "
            f"{_HINT_TRUST}")
    called = _called_layer(p)
    if called == _TOO_DEEP:
        raise UnsafeModelError(
            f"{p} nests objects more than {MAX_NESTING} deep, which no model needs and which can crash the reader; "
            f"save the model again with torch.save(model), or {_HINT_TRUST}")
    if called and called.startswith(_ALLOCATES):
        raise UnsafeModelError(
            f"{p} calls {called[len(_ALLOCATES):]} with a size of its own, which torch.save never writes, so it "
            f"could fill the memory from a few bytes; save the model again with torch.save(model), or {_HINT_TRUST}")
    if called:
        raise UnsafeModelError(
            f"{p} calls the layer class {called} with arguments of its own, which torch.save never writes (a saved "
            f"layer is rebuilt from its state), so it could build layers of any size any number of times; save the "
            f"model again with torch.save(model), or {_HINT_TRUST}")
    names = _unsafe_globals(p)
    if names is None:
        return _load_iteratively(p)
    resolved = {name: _allowed_global(name) for name in names}
    refused = [name for name, obj in resolved.items() if obj is None]
    if refused:
        raise _unsafe(p, refused)
    return _load_allowing(p, list(resolved.values()))


def _data_record(z: zipfile.ZipFile) -> str | None:
    """The name of torch.save's pickle record, ``<folder>/data.pkl``, if the archive has one."""
    return next((n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)


@contextlib.contextmanager
def _pickles(p: Path) -> Iterator[tuple]:
    """(stream, number of pickles to read) of the file's object: torch.save's data record, streamed (a
    compressed record is not inflated in memory), or the legacy file with its magic number, protocol
    and system info before the object; (None, 0) for an archive without a data record."""
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            name = _data_record(z)
            if name is None:
                yield None, 0
                return
            with z.open(name) as f:
                yield f, 1
    else:
        with p.open("rb") as f:
            yield f, 4


def _pickle_protocol(p: Path) -> int | None:
    """The pickle protocol of the file's data record (zip) or of the file (legacy), None if unclear;
    1 for a record that does not start with PROTO (protocols 0 and 1 have none)."""
    try:
        with _pickles(p) as (f, _):
            head = f.read(2) if f else b""
    except _ZIP_ERRORS:
        return None
    if len(head) == 2 and head[0] == 0x80:
        return head[1]
    return 1 if head and zipfile.is_zipfile(p) else None


def _called_layer(p: Path) -> str | None:
    """The first layer class (a torch.nn.Module subclass) the file's pickle calls, or None; or
    ``_ALLOCATES`` + the name of an allocating call torch's safe loader allows but torch.save never
    writes: a legacy tensor or storage constructor (``torch.FloatTensor(n, m)``,
    ``torch.UntypedStorage(n)``), or ``bytearray(n)``.

    torch.save pickles a module as its class and its state (``NEWOBJ``: ``cls.__new__``, then the
    state), never as a call of the class (``REDUCE``), which would run ``__init__`` with the file's
    arguments: ``Linear(100000, 100000)``, or thousands of large layers from a tiny file. This walks
    the opcodes of the data record (zip) or of the first pickles (legacy format) with a stack of
    what each opcode pushes, without unpickling; a stream it cannot follow is left to torch's loader.
    """
    try:
        with _pickles(p) as (f, count):
            for _ in range(count):
                called = _called_in_pickle(f)
                if called:
                    return called
    except (*_ZIP_ERRORS, KeyError, IndexError):
        return None
    return None


_MARK = object()
_INT, _INTS = object(), object()  # an integer, and a tuple holding one (the size of an allocation)
_INT_OPS = ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4")
_ALLOCATES = "allocating:"
_TOO_DEEP = "too deep"
MAX_NESTING = 1000  # containers in containers: torch.save's deepest are a few per level of modules
_ALLOCATING = re.compile(r"torch\.((cuda\.)?(sparse\.)?[A-Za-z0-9]*Tensor|(storage\.|cuda\.)?[A-Za-z0-9_]*Storage)")
_TAKES = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}  # values the object below the stack's top takes in
_KEEPS = ("PROTO", "FRAME", "BINPERSID")  # no change to the depth of the stack (BINPERSID: id → object)


def _called_in_pickle(f) -> str | None:
    """One pickle from ``f`` (left after its STOP): the first REDUCE of a GLOBAL naming a layer
    class, or of an allocating call (see ``_called_layer``), ``_TOO_DEEP`` for objects nested
    more than ``MAX_NESTING`` deep (hashing such a tuple overflows the C stack), or None.

    Each stack entry is a cell ``[value, depth]`` (shared with the memo, so that filling a list or
    dict after it was memoised deepens what the memo holds too)."""
    stack: list = []
    memo: dict = {}

    def deepen(cell, items) -> None:
        cell[1] = max(cell[1], 1 + max((c[1] for c in items), default=0))

    for op, arg, _ in pickletools.genops(f):
        name = op.name
        if name == "GLOBAL":
            stack.append([arg.replace(" ", "."), 0])
        elif name == "MARK":
            stack.append([_MARK, 0])
        elif name in ("TUPLE", "APPENDS", "SETITEMS", "POP_MARK"):
            items = []
            while (item := stack.pop())[0] is not _MARK:
                items.append(item)
            if name == "TUPLE":
                stack.append([_INTS if any(c[0] is _INT for c in items) else None, 0])
                deepen(stack[-1], items)
            elif name != "POP_MARK":  # the list or dict below takes the items
                deepen(stack[-1], items)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = stack[len(stack) - int(name[-1]):]
            del stack[len(stack) - int(name[-1]):]
            stack.append([_INTS if any(c[0] is _INT for c in items) else None, 0])
            deepen(stack[-1], items)
        elif name in _INT_OPS:
            stack.append([_INT, 0])
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo.get(arg) or [None, 0])
        elif name in ("REDUCE", "NEWOBJ"):
            args = stack.pop()
            func = stack.pop()[0]
            if isinstance(func, str) and (_ALLOCATING.fullmatch(func) and (name == "REDUCE" or args[0] is _INTS)
                                          or _canonical(func) == "builtins.bytearray" and args[0] is _INTS):
                return _ALLOCATES + _canonical(func)
            if name == "REDUCE" and isinstance(func, str):
                obj = _allowed_global(func)
                if isinstance(obj, type) and issubclass(obj, nn.Module):
                    return _canonical(func)
            stack.append([None, 0])
            deepen(stack[-1], [args])
        elif name in _TAKES:  # the object below takes the item(s) or state
            n = _TAKES[name]
            items = stack[len(stack) - n:]
            del stack[len(stack) - n:]
            deepen(stack[-1], items)
        elif name == "POP":
            stack.pop()
        elif name == "STOP":
            return None
        elif name not in _KEEPS:
            stack.append([None, 0])  # every other opcode torch's loader reads pushes one value
        if stack and stack[-1][1] > MAX_NESTING:
            return _TOO_DEEP
    return None


def _unsafe_globals(p: Path) -> list[str] | None:
    """Globals the file needs beyond torch's defaults, read without unpickling; None when this
    torch cannot tell (before 2.5, or the legacy non-zip format)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:
        return None
    try:
        return list(scan(str(p)))
    except ValueError:  # "Expected input to be a checkpoint returned by torch.save": legacy format
        return None


def _load_iteratively(p: Path):
    """Fallback for torch < 2.5 and legacy files: load, and on each refused global check it against
    the allowlist, allow it and retry. A refused global is refused before anything calls it."""
    allowed: list = []
    for _ in range(_MAX_GLOBALS):
        try:
            return _load_allowing(p, allowed)
        except pickle.UnpicklingError as e:
            name = _refused_global(e)
            if name is None and "persistent_load" in str(e):
                raise _legacy_module(p) from e
            if name is None:
                raise
            obj = _allowed_global(name)
            if obj is None:
                raise _unsafe(p, [name]) from e
            if any(obj is a for a in allowed):  # allowed yet refused again: give up, not loop
                raise
            allowed.append(obj)
    raise ModelLoadError(f"{p} needs more than {_MAX_GLOBALS} distinct classes; it is not a model file")


def _legacy_module(p: Path) -> UnsafeModelError:
    # The legacy format stores a full module's source code beside it, which torch's restricted
    # unpickler refuses; only an unrestricted load (which may run code) reads such a file.
    return UnsafeModelError(
        f"{p} is a full module in the legacy (non-zip) torch.save format, which cannot be read "
        f"safely; re-save it with a current torch.save, or {_HINT_TRUST}"
    )


def _refused_global(e: BaseException) -> str | None:
    # "Unsupported global: GLOBAL a.b.C was not ..." / "unsupported GLOBAL posix.system whose ..."
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return m.group(1) if m else None


def _load_allowing(p: Path, allowed: list):
    with _safe_globals(allowed), _memory_capped(p):  # under load_model's _LOAD_LOCK
        return load_weights_only(p)


LOAD_MEMORY = (2, 4096, 512 << 20)  # bytes per byte of file, per zip record (a tensor's storage), and more
LEGACY_PER_BYTE = 32  # the legacy format lists no records: its small tensors cost this much per byte
_LOAD_LOCK = threading.Lock()  # the allowlist and the cap are the process's: one load at a time


@contextlib.contextmanager
def _memory_capped(p: Path) -> Iterator[None]:
    """While torch's safe loader reads ``p`` (Linux; elsewhere no cap): the process's address space
    may grow by at most 2 bytes per byte of file, 4 KiB per record of the archive (each tensor's
    storage comes with a few KiB of bookkeeping) and 512 MiB (``LOAD_MEMORY``). The calls that
    loader allows can still build large objects from small arguments (a nested
    ``_codecs.encode``, a ``set`` over an expanded view); past the cap an allocation fails, and
    the failure becomes one line. The limit is the whole process's, so such loads take turns; a
    lower limit already in force is kept as it is (the caller holds ``_LOAD_LOCK``)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        yield
        return
    per_byte, per_record, extra = LOAD_MEMORY
    size = p.stat().st_size
    try:
        with zipfile.ZipFile(p) as z:
            growth = per_byte * size + per_record * len(z.infolist()) + extra
    except (zipfile.BadZipFile, OSError):
        growth = LEGACY_PER_BYTE * size + extra
    cap = mapped + growth
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft <= cap or hard != resource.RLIM_INFINITY and hard < cap:
        yield
        return
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        yield
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "alloc" not in str(e).lower():
            raise
        raise ModelLoadError(
            f"{p} needs more than {_size(growth)} of memory to unpickle, more than a model file of its size and "
            f"number of tensors holds; it may be damaged or built to fill the memory: save the model again with "
            f"torch.save, or {_HINT_TRUST} (it then loads without this limit)") from e
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def load_weights_only(p):
    """``torch.load(p, weights_only=True)`` onto the CPU, without torch's two-line warning that a
    plain pickle of another protocol may not load: the refusal or the load that follows says what
    matters (model files and training checkpoints)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
        return torch.load(p, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def _safe_globals(objs: list) -> Iterator[None]:
    """Allow ``objs`` for one load, then take back only what this call added. (torch's own
    ``safe_globals`` context manager is 2.5+ and, on exit, also drops entries the caller had
    added before; get/clear/add exist since 2.4. torch itself may add entries meanwhile, e.g.
    when a lazily imported torch.distributed module registers DTensor: those stay.)"""
    ser = torch.serialization
    before = ser.get_safe_globals()
    added = [obj for obj in objs if obj not in before]
    ser.add_safe_globals(added)
    try:
        yield
    finally:
        keep = [g for g in ser.get_safe_globals() if not any(g is a for a in added)]
        ser.clear_safe_globals()
        ser.add_safe_globals(keep)


def _allowed_global(name: str):
    """The object ``name`` refers to if it is on the allowlist, else None. Imports nothing."""
    name = _canonical(name)
    if name in _HELPERS:
        return _HELPERS[name]
    for cls in zoo.classes():
        if _full_name(cls) == name:
            return cls
    return _nn_layer_class(name)


def _canonical(name: str) -> str:
    # Protocol-2 pickles say "__builtin__.set"; torch >= 2.6 writes builtins without the module.
    if name.startswith("__builtin__."):
        return "builtins." + name[len("__builtin__."):]
    return name if "." in name else "builtins." + name


def _nn_layer_class(name: str):
    module, _, attr = name.rpartition(".")
    if not module.startswith(_NN_PREFIX):
        return None
    # Every torch.nn.modules submodule is imported by `import torch`; look, don't import.
    mod = sys.modules.get(module)
    if mod is None:
        return None
    obj = inspect.getattr_static(mod, attr, None)  # no module __getattr__ hook can run
    is_layer = isinstance(obj, type) and issubclass(obj, nn.Module)
    # Defined there, not re-exported from elsewhere: the name must be the class's own.
    return obj if is_layer and _full_name(obj) == name else None


def _unsafe(p: Path, names: list[str]) -> UnsafeModelError:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return UnsafeModelError(
        f"{p} needs {_canonical(names[0])}{more}, which is not on the safe-loading allowlist "
        f"(torch.nn layers and ternarize zoo models), so loading it could run code from the file; "
        f"{_HINT_TRUST}"
    )


# ---------------------------------------------------------------------------------------------
# What the file held: a module, or a state_dict for an architecture


def _check_tensors(model: nn.Module, p: Path) -> None:
    """Refuse a parameter or buffer (or a tensor in a layer's attributes, where one could shadow
    its registered weight) without data (``meta``), whose elements overlap in memory, or a sparse
    or nested parameter, before anything copies it: a few bytes of file could otherwise stand for
    gigabytes. (A state_dict's tensors are copied into the architecture's own, whose sizes the file
    does not set.) Lazy modules' uninitialised parameters are left to their first forward."""
    items = [*model.named_parameters(), *model.named_buffers()]
    for path, m in model.named_modules():
        items += [(f"{path}.{k}" if path else k, v) for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    for name, t in items:
        if isinstance(t, nn.parameter.UninitializedParameter):
            continue
        if t.is_meta:
            raise ModelLoadError(f"{p}: tensor {printable(name)} has no data (it is on the meta device); save the "
                                 "model after its weights are materialised (e.g. after to_empty() and loading them)")
        if isinstance(t, nn.Parameter) and (t.layout != torch.strided or t.is_nested):
            raise ModelLoadError(f"{p}: parameter {printable(name)} is a {'nested' if t.is_nested else 'sparse'} "
                                 "tensor, which cannot be retrained here; save the model with dense weights "
                                 "(.to_dense())")
        if _overlaps(t):
            raise ModelLoadError(f"{p}: tensor {printable(name)} of shape {list(t.shape)} has elements that share "
                                 f"memory (strides {list(t.stride())}), as an expanded view does: training writes "
                                 "into a model's tensors, which such a view cannot take; save the model with "
                                 "each one made .contiguous()")


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of a dense tensor certainly share memory: a stride of 0 over more than
    one element, a storage too small for its elements, or what torch itself finds (sparse and
    nested tensors have no strides and are left alone)."""
    if t.layout != torch.strided or t.is_nested or t.numel() <= 1:
        return False
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return True
    if t.untyped_storage().nbytes() < t.numel() * t.element_size():
        return True
    internal = getattr(torch, "_debug_has_internal_overlap", None)  # 0 no, 1 yes, 2 too hard to tell
    try:
        return internal is not None and internal(t) == 1
    except RuntimeError:
        return False


def _to_module(obj, p: Path, arch: str | None) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    state = _find_state_dict(obj)
    if state is None:
        inner = obj.get("model") if isinstance(obj, Mapping) else None
        if isinstance(inner, nn.Module):  # a checkpoint dict holding the full module
            return inner
        raise ModelLoadError(
            f"{p} holds {_describe(obj)}, not a model or a state_dict; save the model with "
            f"torch.save(model) or torch.save(model.state_dict())"
        )
    if arch is None:
        raise ModelLoadError(
            f"{p} holds a state_dict ({len(state)} tensors); pass --arch NAME (a zoo model: "
            f"{', '.join(zoo.names())}) or --arch package.module:factory"
        )
    return _fill(parse_arch(arch)(), state, p, arch)


def _find_state_dict(obj) -> Mapping | None:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _fill(model: nn.Module, state: Mapping, p: Path, arch: str) -> nn.Module:
    expected = model.state_dict()
    state = _strip_wrapper_prefix(state, expected)
    problem = _mismatch(state, expected)
    if problem:
        raise ModelLoadError(
            f"the state_dict in {p} does not match arch {arch!r}: {problem}; check the architecture "
            f"and its arguments (width, depth, in_shape, num_classes)"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # keys and shapes matched, so this is rare (e.g. a dtype it cannot copy)
        raise ModelLoadError(f"cannot load the state_dict in {p} into arch {arch!r}: {_one_line(e)}") from e
    return model


def _strip_wrapper_prefix(state: Mapping, expected: Mapping) -> Mapping:
    # Weights saved from a DDP- or torch.compile-wrapped model carry the wrapper's prefix.
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _mismatch(state: Mapping, expected: Mapping) -> str:
    """A short summary of how ``state`` differs from ``expected``; '' when keys and shapes agree."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k!r} is {tuple(state[k].shape)} in the file but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing key {missing[0]!r}{_and_more(missing)}")
    if unexpected:
        parts.append(f"unexpected key {unexpected[0]!r}{_and_more(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {shapes[0]}{_and_more(shapes)}")
    return ", ".join(parts)


def _and_more(items: list) -> str:
    return f" (+{len(items) - 1} more)" if len(items) > 1 else ""


def _describe(obj) -> str:
    """A few words saying what ``obj`` is, for messages."""
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        if not obj:
            return "an empty dict"
        keys = ", ".join(repr(k)[:40] for k in list(obj)[:4])
        return f"a dict with {len(obj)} entries (keys {keys}{', ...' if len(obj) > 4 else ''})"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    if obj is None:
        return "None"
    return f"an object of type {type(obj).__name__}"


# ---------------------------------------------------------------------------------------------
# Architecture specs


def _split_spec(spec) -> tuple[str, dict]:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"arch must be a non-empty string; {_SPEC_FORMS}")
    if len(spec) > _MAX_SPEC:
        raise ModelLoadError(f"arch spec is {len(spec)} characters long (at most {_MAX_SPEC}); {_SPEC_FORMS}")
    m = _SPEC_RE.fullmatch(spec.strip())
    if m is None:
        raise _bad_spec(spec, "not a name, a call or package.module:factory")
    call = m.group("call")
    return m.group("target"), (_parse_kwargs(spec, call) if call else {})


def _parse_kwargs(spec: str, call: str) -> dict:
    """Keyword arguments of ``(k=v, ...)``, each value an ast literal; nothing is evaluated."""
    try:
        node = ast.parse("f" + call, mode="eval").body
    except SyntaxError as e:
        raise _bad_spec(spec, f"invalid argument syntax ({e.msg})") from None
    except (ValueError, MemoryError, RecursionError):
        raise _bad_spec(spec, "the arguments cannot be parsed") from None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise _bad_spec(spec, "one argument list allowed")
    if node.args:
        raise _bad_spec(spec, "pass arguments by keyword, e.g. mlp(width=256)")
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise _bad_spec(spec, "**kwargs is not allowed")
        kwargs[kw.arg] = _literal(spec, kw)
    return kwargs


def _literal(spec: str, kw: ast.keyword):
    try:
        return ast.literal_eval(kw.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise _bad_spec(
            spec,
            f"the value of {kw.arg}= must be a literal (number, string, tuple, list, dict, "
            f"True/False/None), not {_node_kind(kw.value)}; nothing was evaluated",
        ) from None


def _node_kind(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        return "a call"
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Attribute):
        return "an attribute lookup"
    return f"a {type(node).__name__} expression"


def _bad_spec(spec: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"cannot parse arch {spec!r}: {why}; {_SPEC_FORMS}")


def _import_factory(spec: str, target: str) -> Callable:
    modname, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        raise ModelLoadError(
            f"cannot import module {modname!r} named by arch {spec!r} ({e}); check the spelling "
            f"and that its folder is on PYTHONPATH"
        ) from e
    except Exception as e:  # the module's own code failed while importing
        raise ModelLoadError(
            f"importing module {modname!r} named by arch {spec!r} failed: {type(e).__name__}: {_one_line(e)}"
        ) from e
    for part in attr.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            raise ModelLoadError(
                f"module {modname!r} has no attribute {attr!r} (arch {spec!r}); check the factory name"
            )
    if not callable(obj):
        raise ModelLoadError(
            f"{modname}:{attr} is a {type(obj).__name__}, not callable; arch must name a function "
            f"or class that builds the model"
        )
    return obj


_MISSING = object()


def _build(spec: str, fn: Callable, kwargs: dict) -> nn.Module:
    try:
        model = fn(**kwargs)
    except Error as e:
        raise ModelLoadError(f"arch {spec!r}: {e}") from e
    except Exception as e:  # the factory is user code; report it in one line
        raise ModelLoadError(f"arch {spec!r} failed to build: {type(e).__name__}: {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"arch {spec!r} returned {_describe(model)}, not a torch.nn.Module; the factory must "
            f"build and return the model"
        )
    return model
