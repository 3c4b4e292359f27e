"""Atomic file output: a reader sees the old file or the complete new one, never a half-written one.

Standard library only, so the numpy-only modules can use it. A target that exists but is not a
regular file (a folder, a FIFO, a device, a link loop) is refused; a link is written through to
the file it points to. A failure of the operating system (missing or read-only folder, full disk)
becomes one :class:`~ternarize.errors.OutputError` line naming the path; the temp file is removed
either way. :func:`check_output`, for the command line before any work, also refuses an output
that is one of the job's input files, whose folder is missing or not writable, or whose name is
too long. :func:`input_problem` says why an input path is not a readable regular file.
:func:`folder_lock` keeps two runs from writing one output folder at once. :func:`free_memory`
says how much memory is free, for the checks before large allocations.

Example::

    with atomic_path("out/model.onnx") as tmp:   # a temp name in the same folder
        save_somehow(tmp)                        # renamed over the target only if this succeeds
    atomic_write("out/model.tern", data)
    check_output("preds.npy", inputs=["x.npy"])  # before any work: OutputError for the cases above
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import threading
import time

from .errors import OutputError

_TEMP = re.compile(r"\.(?P<base>.+)\.tmp\.[0-9a-f]{12}(?:\.[A-Za-z0-9]+)?")


NAME_MAX = 255  # bytes in a file name on common file systems


def temp_name(base: str, suffix: str = "") -> str:
    """The name of a temp file for the final name ``base`` (see :func:`is_temp_of`); a generic one
    when ``base`` is too long to carry along."""
    name = f".{base}.tmp.{secrets.token_hex(6)}{suffix}"
    return name if len(os.fsencode(name)) <= NAME_MAX else f".ternarize.tmp.{secrets.token_hex(6)}{suffix}"


def is_temp_of(name: str, bases) -> bool:
    """Whether ``name`` is a temp file :func:`atomic_path` makes for one of the final names ``bases``."""
    m = _TEMP.fullmatch(name)
    return bool(m) and m.group("base") in bases


def check_output(path, inputs=()) -> str:
    """Refuse, before any work, an output ``path`` that cannot be written: an empty path or one
    ending in a separator, one that exists and is not a regular file (or a link to one), one that
    is the same file as one of ``inputs``, or one whose folder is missing or not a folder. Returns
    the path."""
    text = os.fspath(path)
    _check_name(text)
    check_target(text)
    if _is_std_stream(text):
        raise OutputError(f"the output {text} is this command's standard input, output or error, not a file: "
                          "replacing it would lose what is printed; give a file name")
    for source in inputs:
        if same_file(source, text):
            raise OutputError(f"the output {text} is the input file {os.fspath(source)}; choose another output path")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise OutputError(f"cannot write {text}: {directory} is a file, not a folder; choose another path")
        raise OutputError(f"cannot write {text}: the folder {directory} does not exist; create it or choose "
                          "another path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {text}: the folder {directory} is not writable; choose another path")
    if len(os.fsencode(os.path.basename(text))) > NAME_MAX:
        raise OutputError(f"cannot write {text}: the file name is longer than {NAME_MAX} bytes; choose a shorter one")
    return text


def _is_std_stream(path: str) -> bool:
    """Whether ``path`` (such as /dev/stdout redirected to a file) is the file of fd 0, 1 or 2."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    for fd in (0, 1, 2):
        try:
            other = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino):
            return True
    return False


def _check_name(path: str) -> None:
    if not path:
        raise OutputError("the output path is empty; give a file name")
    if "\0" in path:
        raise OutputError(f"the output path {path!r} holds a NUL character; give a file name")
    if path.endswith(("/", os.sep)):
        raise OutputError(f"the output path {path} ends with a folder separator; give a file name")
    if os.path.islink(path) and os.path.islink(os.path.realpath(path)):
        raise OutputError(f"the output {path} is a link that leads to no file (a loop); remove it or choose "
                          "another path")


def check_target(path: str) -> None:
    """Refuse ``path`` as an output file when something other than a regular file is there: a
    folder, a device, a FIFO or a socket (a link counts as what it points to)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # nothing there (or unreachable: the write itself will say why)
    if stat.S_ISDIR(mode):
        raise OutputError(f"{path} is a folder; give a file name for the output")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path} exists and is not a regular file (a device, FIFO or socket); "
                          "choose another output path")


def same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` both exist and are the same file (False for anything else)."""
    if not isinstance(a, (str, bytes, os.PathLike)) or not isinstance(b, (str, bytes, os.PathLike)):
        return False
    with contextlib.suppress(OSError, ValueError):
        return os.path.samefile(a, b)
    return False


def missing_folders(path) -> list[str]:
    """The folders of ``path`` (itself included) that do not exist yet, deepest first: what
    ``os.makedirs(path)`` would create, for :func:`remove_empty` to take back after a failure."""
    missing, here = [], os.path.abspath(os.fspath(path))
    while not os.path.lexists(here):
        missing.append(here)
        here = os.path.dirname(here)
    return missing


def remove_empty(folders) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; leave the others."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


_HINTS = {errno.ENOSPC: "free some disk space or write elsewhere",
          getattr(errno, "EDQUOT", errno.ENOSPC): "free some disk space or write elsewhere",
          errno.EACCES: "check the permissions or choose another path",
          errno.EPERM: "check the permissions or choose another path",
          errno.EROFS: "choose a place on a writable file system",
          errno.ENOENT: "check the path; create a missing folder first",
          errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
          errno.EISDIR: "it is a folder; give a file name"}


def os_hint(e: OSError) -> str:
    """What to do about an operating-system failure, by its errno."""
    return _HINTS.get(e.errno, "check the path and try again")


def os_error_line(e: OSError) -> str:
    """Any operating-system failure as one line: '<cause>: <path>; <what to do>'."""
    where = "".join(f": {name}" for name in (e.filename, e.filename2) if name is not None)
    return f"{e.strerror or e}{where}; {os_hint(e)}"


def describe(e: OSError, path) -> str:
    """One line for an operating-system failure to write ``path``, with what to do."""
    return f"cannot write {os.fspath(path)}: {e.strerror or e}; {os_hint(e)}"


@contextlib.contextmanager
def atomic_path(path, suffix: str = "", create: bool = False):
    """Yield a fresh temp path beside ``path``; on success fsync it and rename it over ``path``,
    on any failure remove it. ``suffix`` keeps an extension some writers insist on (".npy").
    ``create``: the file must not exist at the end either (another program may have written it
    meanwhile): it is linked into place, which fails rather than replace anything.

    Raises :class:`OutputError` when ``path`` is empty, ends in a separator or is a folder or
    another non-regular file, and when the operating system refuses a step (the writer's own
    OSError included). A link to a regular file is written through: the file it points to is
    replaced and the link stays. A replaced file's permissions pass to the new one."""
    shown = os.fspath(path)
    _check_name(shown)
    check_target(shown)
    # a link is written through: its target is replaced, the link stays (and /dev/stdout, a link
    # to a terminal or pipe, was refused above as not a regular file)
    path = os.path.realpath(shown)
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, temp_name(base, suffix))
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed it unsynced
            os.fsync(f.fileno())
        check_target(path)  # appeared meanwhile?
        if create:
            _link_new(tmp, path, shown)
        else:
            _keep_mode(path, tmp)
            os.replace(tmp, path)
    except BaseException as e:
        with signals_deferred(), contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(describe(e, shown)) from e
        raise
    _sync_directory(directory)


def _link_new(tmp: str, path: str, shown: str) -> None:
    """Put ``tmp`` in place as ``path``, which must not exist: a hard link fails if it does (then
    the temp file is removed by the caller). Where hard links are not supported, a check and a
    rename."""
    appeared = OutputError(f"{shown} appeared while this command ran (another program wrote it); pass --force "
                           "to overwrite it, or choose another path")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise appeared from None
    except OSError:  # no hard links here (FAT, some network shares): each reports it its own way
        if os.path.lexists(path):
            raise appeared from None
        os.replace(tmp, path)
        return
    with contextlib.suppress(OSError):  # the output is in place; a stray link name is harmless
        os.unlink(tmp)


def _keep_mode(path: str, tmp: str) -> None:
    """Give ``tmp`` the permission bits of the file ``path`` it replaces (if there is one; not on
    Windows, whose only such bit, read-only, would stop the rename)."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):  # no file there, or a file system without permissions
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))


def atomic_write(path, data: bytes | memoryview | str, create: bool = False) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (``create``: as
    :func:`atomic_path`)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path, create=create) as tmp:
        # 0o666 lets the umask decide the final permissions, as for any newly created file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def input_problem(path) -> str | None:
    """Why ``path`` is not a regular file to read, as the end of a sentence about it ("does not
    exist; check the path"), or None when it is one (a link counts as the file it leads to)."""
    try:
        mode = os.stat(path).st_mode
    except PermissionError:
        return "cannot be reached: permission denied; check the permissions"
    except OSError:
        if os.path.islink(path):
            return "is a link that leads to no file (a broken link or a loop); fix the link or give the file itself"
        return "does not exist; check the path"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file; give the file inside it"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, FIFO or socket); give a file"
    return None


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl-C's KeyboardInterrupt is (by the command line's handler)."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


_DEFERRED = {"defer": 0, "pending": None}  # clean-ups running; a signal that came meanwhile


def stop_exception(signum: int) -> KeyboardInterrupt:
    """What a signal raises: KeyboardInterrupt for SIGINT, :class:`Stopped` for the others."""
    import signal

    return KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)


def stop_words(signum: int | None) -> str:
    """How a stop is named on its line: "stopped by SIGTERM" (or SIGHUP), or "interrupted" (Ctrl-C's
    SIGINT, or a KeyboardInterrupt without a signal)."""
    import signal

    return f"stopped by {signal.Signals(signum).name}" if signum and signum != signal.SIGINT else "interrupted"


def deferring_signals() -> bool:
    """Whether a clean-up is running (see :func:`signals_deferred`)."""
    return _DEFERRED["defer"] > 0


def defer_signal(signum: int) -> None:
    """Keep ``signum`` for the end of the running clean-up (the first one counts)."""
    _DEFERRED["pending"] = _DEFERRED["pending"] or signum


@contextlib.contextmanager
def signals_deferred():
    """Run a clean-up (removing half-written outputs, putting previous ones back) to its end: the
    command line's signal handler keeps a signal that comes meanwhile, raised here afterwards,
    unless an exception is leaving the clean-up anyway. Outside the command line (no such
    handler) this changes nothing."""
    _DEFERRED["defer"] += 1
    try:
        yield
    except BaseException:
        _DEFERRED["defer"] -= 1
        if not _DEFERRED["defer"]:
            _DEFERRED["pending"] = None
        raise
    _DEFERRED["defer"] -= 1
    if not _DEFERRED["defer"] and _DEFERRED["pending"]:
        signum, _DEFERRED["pending"] = _DEFERRED["pending"], None
        raise stop_exception(signum)


LOCK = ".ternarize.lock"  # in an output folder while a run writes it
LOCK_TRIES, LOCK_WAIT = 20, 0.005  # a lock held for a moment (by busy()) is waited for: up to 0.1 s
_HELD: set[tuple] = set()  # (thread, folder) locked by this process


@contextlib.contextmanager
def folder_lock(folder: str):
    """Hold an exclusive lock on the output ``folder`` (a lock on the file ``LOCK`` inside it,
    removed on leaving): another process that asks for it meanwhile gets an :class:`OutputError`.
    The operating system drops the lock of a killed run, so a stale file does not block anyone.
    Where the platform offers no file locks, nothing is locked. Within one process the lock is
    re-entrant for the thread that holds it (the demo's folder holds a compress run): yields True
    when that thread held it already; another thread is refused as another process is."""
    key = (threading.get_ident(), os.path.realpath(folder))
    if key in _HELD:
        yield True
        return
    path = os.path.join(folder, LOCK)
    for _ in range(10):  # a holder may remove the file between our open and our lock: open it again
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(f"cannot write to the output folder {folder}: {e.strerror or e}; {os_hint(e)}") from e
        for _ in range(LOCK_TRIES):
            if _try_lock(fd):
                break
            time.sleep(LOCK_WAIT)
        else:
            os.close(fd)
            raise busy_error(folder)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise OutputError(f"cannot lock the output folder {folder}: other runs keep replacing {LOCK}; "
                          "wait for them to finish")
    _HELD.add(key)
    try:
        yield False
    finally:
        _HELD.discard(key)
        if os.name == "nt":  # an open file cannot be removed there
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)  # POSIX: before the lock goes, so a run that takes it sees a new file
        if os.name != "nt":
            os.close(fd)


def busy(folder: str) -> bool:
    """Whether another run holds ``folder``'s lock now (:func:`folder_lock`), asked without
    creating anything: a shared lock on the lock file, read-only, taken and let go at once when
    it is free (a run taking the lock meanwhile waits for that, see ``LOCK_TRIES``). False where
    there is no lock file or no file locks."""
    if (threading.get_ident(), os.path.realpath(folder)) in _HELD:
        return False
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY)
    except OSError:  # no lock file (or none this user may read): no run that could be asked
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks
        return False
    finally:
        os.close(fd)  # lets go of the lock, if taken
    return False


def busy_error(folder: str) -> OutputError:
    return OutputError(f"another ternarize run is writing to {folder}; wait for it to finish or choose "
                       "another output folder")


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file ``fd`` without waiting: False if another holds it
    (True where there are no file locks: a platform or file system without them)."""
    try:
        import fcntl
    except ImportError:  # Windows
        try:
            import msvcrt
        except ImportError:
            return True
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            return e.errno not in (errno.EACCES, errno.EDEADLK)  # others: a drive without locks
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # e.g. a network file system without locks
        return True
    return True


def _sync_directory(directory: str) -> None:
    """Make the rename durable where the platform allows opening a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def free_memory() -> int | None:
    """Bytes this process can still take: the kernel's MemAvailable, lowered to what a cgroup v2
    memory limit leaves (its page cache counted as free, as the kernel reclaims it); None where
    neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        with contextlib.suppress(OSError, ValueError), open("/sys/fs/cgroup/memory.stat") as f:
            for line in f:
                if line.startswith("inactive_file "):
                    used -= int(line.split()[1])
                    break
        if limit != "max":
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
