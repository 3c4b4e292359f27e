"""The error family of ternarize.

Every error a user can cause derives from :class:`Error`. Its message is one line that says what
is wrong and what to do about it; the command line prints exactly that line and exits with code 2.
Anything else escaping from the library is a bug.

This module imports nothing beyond the standard library, so numpy-only modules can use it.
"""

from __future__ import annotations


class Error(Exception):
    """Base class: bad input or a condition the user can fix. The message is one line."""


class ConfigError(Error):
    """An option or argument has a value that cannot work."""


class DataError(Error):
    """A dataset is unknown, missing or malformed."""


class ModelLoadError(Error):
    """A model file cannot be read, or the architecture it needs cannot be built."""


class UnsafeModelError(ModelLoadError):
    """Loading the model would run code from the file; it needs an explicit trust flag."""


class GraphError(Error):
    """A graph (the intermediate representation) is malformed: missing tensor, cycle, bad shape."""


class LoweringError(Error):
    """A torch model uses something the graph cannot express (names the op and module path)."""


class TernFormatError(Error):
    """A .tern file is malformed. The message names the field and the offending value.

    ``advice``: what to do, where it is not what a damaged file needs (copy or write it again).
    """

    def __init__(self, message: str, advice: str | None = None):
        super().__init__(message if advice is None else f"{message}; {advice}")
        self.advice = advice


class ExportError(Error):
    """The ONNX exporter cannot express part of the graph."""


class TrainingError(Error):
    """Training cannot go on (for example, the loss became NaN or infinite)."""


class VerificationError(Error):
    """Two representations of the same model disagree beyond tolerance."""


class OutputError(Error):
    """An output cannot be written there (missing or read-only folder, full disk, not a regular
    file, the same file as an input)."""


__all__ = [
    "Error",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "UnsafeModelError",
    "GraphError",
    "LoweringError",
    "TernFormatError",
    "ExportError",
    "TrainingError",
    "VerificationError",
    "OutputError",
]
