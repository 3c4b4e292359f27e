"""Atomic file output: a reader sees the old file or the complete new one, never a half-written one.

Standard library only, so the numpy-only modules can use it.

Example::

    with atomic_path("out/model.onnx") as tmp:   # a temp name in the same folder
        save_somehow(tmp)                        # renamed over the target only if this succeeds
    atomic_write("out/model.tern", data)
"""

from __future__ import annotations

import contextlib
import os
import secrets


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a fresh temp path beside ``path``; on success fsync it and rename it over ``path``,
    on any failure remove it. ``suffix`` keeps an extension some writers insist on (".npy")."""
    path = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp.{secrets.token_hex(6)}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed it unsynced
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_directory(directory)


def atomic_write(path, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path) as tmp:
        # 0o666 lets the umask decide the final permissions, as for any newly created file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def _sync_directory(directory: str) -> None:
    """Make the rename durable where the platform allows opening a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
