"""Text from files and paths made safe to print (standard library only).

Names, metadata and paths come from files a user may not have made: printed as they are, an ESC
character would reach the terminal. ``printable`` shows every non-printable character as its
escape; ``one_line`` also joins lines (for one-line error messages); ``error_line`` names an
exception in one line; ``byte_size`` writes a byte count for people (``1.5 KiB``).

Example: ``printable("a\\x1b[31m") == "a\\\\x1b[31m"``.
"""

from __future__ import annotations


def printable(text) -> str:
    """``text`` with every non-printable character (ESC, newline, ...) shown as its escape, e.g. \\x1b."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def one_line(text) -> str:
    """``text`` on one line (runs of whitespace become one space), control characters escaped."""
    return printable(" ".join(str(text).split()))


def error_line(e: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"`` (the message cut at ``limit``), or the type alone."""
    first = str(e).strip().splitlines()[0][:limit] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def byte_size(n) -> str:
    """A byte count in B, KiB, MiB or GiB: ``byte_size(1536) == "1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
