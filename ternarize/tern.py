"""The .tern file: write, load, read and verify (numpy only; never imports torch).

This module mirrors formats/TERN.md section by section: §2 prelude, §3 header (§3.2 tensor table,
§3.4 graph), §4 data section, §5 encodings (in :mod:`ternarize.pack`) and the reader's checks of
§6. Layout::

    prelude (20 bytes) | header: header_len bytes of canonical JSON, or of its length and deflate stream
    | zero padding to a multiple of 64 | tensor 0 | zero padding to 64 | tensor 1 | ... | tensor n-1 (the end)

Example::

    info = write(graph, "model.tern")          # atomic, deterministic bytes
    f = load("model.tern")                      # every check of TERN.md, no dense decoding
    f.raw("fc1.weight")                         # zero-copy memoryview of the encoded bytes
    g = f.graph()                               # decoded Graph (int8 codes, float32 floats)
    for check, ok, message in verify("model.tern"): ...

A file is hostile until proven otherwise: every field is checked against the file before use, no
allocation is sized from an unchecked field, and every defect raises
:class:`~ternarize.errors.TernFormatError` naming the field and the offending value.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import pack
from ._io import atomic_write
from ._version import __version__
from .errors import ConfigError, GraphError, TernFormatError
from .graph import KINDS, MAX_DIM, MAX_ELEMENTS, Const, ConstSpec, Graph

MAGIC = b"\x89TERN\r\n\x1a"
VERSION = 1
PRELUDE = struct.Struct("<8sHHII")  # magic, version, flags, header_len, header CRC32: 20 bytes
FLAG_DEFLATE = 0x0001  # the header is stored deflated (§3.5)
KNOWN_FLAGS = FLAG_DEFLATE
ALIGN = 64
MAX_HEADER = 16 << 20
MAX_INFLATE = 64  # a deflated header's JSON is at most 64 times its stream (§3.5): real ones are 2-5 times
DEFLATE_LEVEL, DEFLATE_WBITS, DEFLATE_MEMLEVEL = 9, -15, 9  # raw deflate, 32 KiB window (§7)
MAX_JSON_DEPTH = 64
DOUBLE_DIGITS = 309  # the largest double is below 10^309: a longer integer overflows (and int() may refuse it)
TOP_FIELDS = ("graph", "metadata", "tensors")
ENTRY_FIELDS = ("name", "kind", "encoding", "shape", "offset", "nbytes", "crc32", "params")

Check = tuple[str, "bool | None", str]  # (check, passed: True, False, or None when not run, message)


def align(n: int) -> int:
    """The first multiple of 64 at or after n: ``align(0) == 0``, ``align(65) == 128``."""
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table: where a tensor's encoded bytes are and how to read them."""

    name: str
    kind: str
    encoding: str
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    nbytes: int
    crc32: int
    params: dict

    @property
    def count(self) -> int:
        """Number of elements: the product of the shape."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.count

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "encoding": self.encoding,
                "shape": list(self.shape), "offset": self.offset, "nbytes": self.nbytes, "crc32": self.crc32,
                "params": dict(self.params)}


@dataclass(frozen=True)
class WriteInfo:
    """What ``write`` produced: the file size, where the data starts and the tensor table."""

    path: str
    size: int
    header_len: int
    data_start: int
    tensors: list[TensorEntry]


# ====================================================================== §2 prelude


def _other_format(buf: bytes) -> str | None:
    """What a file that is not a .tern file looks like, by its first bytes (None: unknown)."""
    if buf[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "a zip archive (a PyTorch model saved with torch.save is one)"
    if buf[:1] == b"\x80" and 2 <= buf[1] <= 5:
        return "a Python pickle (a PyTorch model saved with torch.save is one)"
    if buf[:6] == b"\x93NUMPY":
        return "a NumPy .npy array"
    if buf[:2] == b"\x1f\x8b":
        return "a gzip file"
    if buf[0] == 0x08 and 3 <= buf[1] <= 30 and buf[2] in (0x12, 0x1a, 0x22, 0x28, 0x32, 0x3a, 0x42):
        return "an ONNX model"  # ModelProto: ir_version, then producer, domain, graph, ... fields
    return None


def _read_prelude(buf: bytes) -> tuple[int, int]:
    """Check magic, version, flags and header_len (bounds); return (header_len, flags)."""
    if len(buf) < PRELUDE.size:
        raise TernFormatError(f"the file is {len(buf)} bytes, shorter than the {PRELUDE.size}-byte prelude")
    magic, version, flags, header_len, _ = PRELUDE.unpack_from(buf)
    if magic != MAGIC:
        other = _other_format(buf)
        if other:
            raise TernFormatError(f"magic is {magic.hex(' ')}, expected {MAGIC.hex(' ')}: this is {other}, not a "
                                  ".tern file", "give the model.tern that ternarize compress wrote")
        raise TernFormatError(f"magic is {magic.hex(' ')}, expected {MAGIC.hex(' ')}: not a .tern file, "
                              "or it was mangled by a text-mode transfer")
    if version != VERSION:
        raise TernFormatError(f"version is {version}; this reader knows version {VERSION} only",
                              "a newer ternarize wrote it: upgrade ternarize to read it" if version > VERSION else None)
    if flags & ~KNOWN_FLAGS:
        raise TernFormatError(f"flags is 0x{flags:04x}, expected 0 or 0x0001 (bit 0: the header is deflated; "
                              "every other bit is reserved)")
    if header_len > MAX_HEADER:
        raise TernFormatError(f"header_len is {header_len}, more than the limit {MAX_HEADER} (16 MiB)")
    if PRELUDE.size + header_len > len(buf):
        raise TernFormatError(f"header_len is {header_len}, beyond the end of the {len(buf)}-byte file")
    return header_len, flags


# ====================================================================== §3 header


def canonical_json(obj: Any) -> bytes:
    """The canonical header bytes: sorted keys, no spaces, ASCII only, no NaN/Infinity."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=_json_default)
    return text.encode("ascii")


def _json_default(value):
    """numpy scalars (common in attributes and metadata) serialize as the Python numbers they hold."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON")


def _read_header(buf: bytes, header_len: int, flags: int = 0) -> tuple[dict, bytes]:
    """CRC, inflation (§3.5), UTF-8 and JSON (no duplicate keys, no NaN/Infinity, depth <= 64) of
    the header; return the object and the JSON text."""
    raw = buf[PRELUDE.size:PRELUDE.size + header_len]
    stored = PRELUDE.unpack_from(buf)[4]
    if zlib.crc32(raw) != stored:
        raise TernFormatError(f"header CRC32 is 0x{stored:08x}, computed 0x{zlib.crc32(raw):08x}")
    if flags & FLAG_DEFLATE:
        raw = _inflate(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TernFormatError(f"header is not valid UTF-8: byte 0x{raw[e.start]:02x} "
                              f"at header offset {e.start}") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                         parse_float=_finite_float, parse_int=_double_int)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        raise TernFormatError(f"header is not valid JSON: {str(e)[:120]}") from None
    _check_depth(raw)
    if not isinstance(obj, dict):
        raise TernFormatError(f"header must be a JSON object, got {type(obj).__name__}")
    return obj, raw


def _inflate(stored: bytes) -> bytes:
    """The JSON text of a deflated header: a u32 length, then one raw deflate stream (RFC 1951)
    that inflates to exactly that many bytes and ends exactly at the header's end. The length is
    checked against the limits before anything is inflated, and at most one byte more than it is
    ever produced (the one that shows a stream inflating to more)."""
    if len(stored) < 6:
        raise TernFormatError(f"header is {len(stored)} bytes, too short for a deflated header (a 4-byte length "
                              "and a deflate stream of at least 2 bytes)")
    n = int.from_bytes(stored[:4], "little")
    if stored[:1] == b"{" and n > MAX_INFLATE * (len(stored) - 4):
        raise TernFormatError(f"flags say the header is deflated, but it starts like plain JSON ({stored[:8]!r}): "
                              "flags bit 0 may be damaged")
    if n < 2:
        raise TernFormatError(f"deflated header's length is {n}, less than the 2 bytes of the shortest JSON object")
    if n > MAX_HEADER:
        raise TernFormatError(f"deflated header's length is {n}, more than the limit {MAX_HEADER} (16 MiB)")
    if n > MAX_INFLATE * (len(stored) - 4):
        raise TernFormatError(f"deflated header's length is {n}, more than {MAX_INFLATE} times its "
                              f"{len(stored) - 4}-byte deflate stream")
    d = zlib.decompressobj(DEFLATE_WBITS)
    try:
        text = d.decompress(stored[4:], n + 1)  # max_length > 0: zlib's 0 would mean no limit at all
    except zlib.error as e:
        raise TernFormatError(f"deflated header is not a valid deflate stream ({e})") from None
    if len(text) > n:
        raise TernFormatError(f"deflated header inflates to more than its length of {n} bytes")
    if not d.eof:
        raise TernFormatError("deflated header's deflate stream is cut short: it ends before its final block does")
    if d.unused_data:
        raise TernFormatError(f"deflated header has {len(d.unused_data)} bytes after the end of its deflate stream")
    if len(text) != n:
        raise TernFormatError(f"deflated header inflates to {len(text)} bytes, but its length is {n}")
    return text


def _unique_keys(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise TernFormatError(f"header has duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constant(name: str):
    raise TernFormatError(f"header holds {name}, which JSON does not allow")


def _finite_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise TernFormatError(f"header number {text[:40]} is not finite")
    return value


def _double_int(text: str) -> int:
    if len(text.lstrip("-")) > DOUBLE_DIGITS or not _fits_double(value := int(text)):
        raise TernFormatError(f"header integer of {len(text.lstrip('-'))} digits overflows a double")
    return value


def _fits_double(value: int) -> bool:
    """Whether an integer is within a double's range (a reader in another language parses it as one)."""
    try:
        float(value)
    except OverflowError:
        return False
    return True


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[{]}")))


def _check_depth(raw: bytes) -> None:
    """Reject nesting deeper than 64 in valid JSON text: C-speed, memory O(1 MiB) beyond the text.

    String literals are removed first (brackets inside them do not nest), then the depth is the
    maximum running sum of +1 per opening and -1 per closing bracket.
    """
    steps = np.frombuffer(_JSON_STRING.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS), np.int8)
    depth = 0
    for i in range(0, steps.size, 1 << 20):  # chunks bound the int32 temporaries
        running = depth + np.cumsum(steps[i:i + (1 << 20)], dtype=np.int32)
        if running.max() > MAX_JSON_DEPTH:
            raise TernFormatError(f"header nests deeper than {MAX_JSON_DEPTH} levels")
        depth = int(running[-1])


def _check_top(obj: dict) -> tuple[dict, dict, list]:
    """The top-level schema: exactly graph (object), metadata (object with producer), tensors (list)."""
    for key in obj:
        if key not in TOP_FIELDS:
            raise TernFormatError(f"header has unknown field {_short(key)}")
    for key, typ in (("graph", dict), ("metadata", dict), ("tensors", list)):
        if key not in obj:
            raise TernFormatError(f"header lacks field {key!r}")
        _expect(obj[key], typ, key)
    _expect(obj["metadata"].get("producer"), str, "metadata.producer")
    return obj["graph"], obj["metadata"], obj["tensors"]


def _expect(value, typ, where: str):
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise TernFormatError(f"{where} must be {_TYPE_NAMES[typ]}, got {_short(value)}")
    return value


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ====================================================================== §3.2 tensor table


def _read_entry(i: int, obj) -> TensorEntry:
    """One tensor entry: fields, types, kind/encoding, shape, params and the size formula."""
    where = f"tensors[{i}]"
    _expect(obj, dict, where)
    for key in obj:
        if key not in ENTRY_FIELDS:
            raise TernFormatError(f"{where} has unknown field {_short(key)}")
    for key in ENTRY_FIELDS:
        if key not in obj:
            raise TernFormatError(f"{where} lacks field {key!r}")
    name = _expect(obj["name"], str, f"{where}.name")
    kind = _expect(obj["kind"], str, f"{where}.kind")
    encoding = _expect(obj["encoding"], str, f"{where}.encoding")
    if not name:
        raise TernFormatError(f"{where}.name is empty")
    if kind not in KINDS:
        raise TernFormatError(f"{where}.kind is {_short(kind)}, expected one of {', '.join(KINDS)}")
    if encoding not in pack.ENCODINGS:
        raise TernFormatError(f"{where}.encoding is {_short(encoding)}, "
                              f"expected one of {', '.join(pack.ENCODINGS)}")
    if encoding not in pack.KIND_ENCODINGS[kind]:
        raise TernFormatError(f"{where}.encoding is {encoding!r}, which cannot store kind {kind} "
                              f"(allowed: {', '.join(pack.KIND_ENCODINGS[kind])})")
    shape = _read_shape(obj["shape"], f"{where}.shape")
    offset = _int_field(obj["offset"], 0, None, f"{where}.offset")
    nbytes = _int_field(obj["nbytes"], 0, None, f"{where}.nbytes")
    crc = _int_field(obj["crc32"], 0, 0xFFFFFFFF, f"{where}.crc32")
    try:
        params = pack.check_params(encoding, shape, obj["params"])
    except TernFormatError as e:
        raise TernFormatError(f"{where}.{e}") from None
    entry = TensorEntry(name, kind, encoding, shape, offset, nbytes, crc, params)
    _check_nbytes(where, entry)
    return entry


def _read_shape(value, where: str) -> tuple[int, ...]:
    """1..8 integer dims in [1, 2^31 - 1] with at most 2^31 elements."""
    _expect(value, list, where)
    if not 1 <= len(value) <= pack.MAX_RANK:
        raise TernFormatError(f"{where} has {len(value)} dimensions, expected 1..{pack.MAX_RANK}")
    dims = tuple(_int_field(d, 1, MAX_DIM, f"{where}[{j}]") for j, d in enumerate(value))
    count = 1
    for d in dims:
        count *= d
    if count > MAX_ELEMENTS:
        raise TernFormatError(f"{where} {list(dims)} has {count} elements, more than {MAX_ELEMENTS}")
    return dims


def _int_field(value, lo: int, hi: int | None, where: str) -> int:
    _expect(value, int, where)
    if value < lo or (hi is not None and value > hi):
        bounds = f"outside [{lo}, {hi}]" if hi is not None else f"expected at least {lo}"
        raise TernFormatError(f"{where} is {_short(value)}, {bounds}")
    return value


def _check_nbytes(where: str, e: TensorEntry) -> None:
    """nbytes equals the size formula (t2, b1, f32, f16) or obeys the ts weights-per-byte bound."""
    if e.encoding == "ts":
        if e.count > pack.TS_MAX_WEIGHTS_PER_BYTE * e.nbytes:
            raise TernFormatError(f"{where}.nbytes is {e.nbytes}, too small for ts shape {list(e.shape)}: "
                                  f"at most {pack.TS_MAX_WEIGHTS_PER_BYTE} weights per byte")
        return
    want = pack.dense_size(e.encoding, e.shape)
    if e.nbytes != want:
        raise TernFormatError(f"{where}.nbytes is {e.nbytes}, expected {want} "
                              f"({e.encoding}: {_FORMULAS[e.encoding]} for shape {list(e.shape)})")


_FORMULAS = {"t2": "R·ceil(K/4)", "b1": "R·ceil(K/8)", "f32": "4·n", "f16": "2·n"}


def _read_table(tensors: list) -> list[TensorEntry]:
    entries = [_read_entry(i, t) for i, t in enumerate(tensors)]
    first = {}
    for i, e in enumerate(entries):
        if e.name in first:
            raise TernFormatError(f"tensors[{i}].name {e.name!r} repeats tensors[{first[e.name]}].name")
        first[e.name] = i
    return entries


# ====================================================================== §4 data section


def _check_layout(buf: bytes, header_end: int, entries: list[TensorEntry]) -> int:
    """Offsets packed in order at 64-byte alignment, zero padding, no trailing bytes; return data_start."""
    data_start = align(header_end)
    _zero_padding(buf, header_end, min(data_start, len(buf)), "after the header")
    expected, end = 0, data_start
    for i, e in enumerate(entries):
        if e.offset != expected:
            raise TernFormatError(f"tensors[{i}].offset is {e.offset}, expected {expected}")
        start = data_start + e.offset
        if start + e.nbytes > len(buf):
            raise TernFormatError(f"tensors[{i}] ({e.name!r}) ends at byte {start + e.nbytes}, beyond the "
                                  f"end of the {len(buf)}-byte file")
        _zero_padding(buf, end, start, f"before tensors[{i}]")
        end = start + e.nbytes
        expected = align(e.offset + e.nbytes)
    if len(buf) != end:
        what = "trailing bytes after the last tensor" if len(buf) > end else "missing bytes"
        raise TernFormatError(f"the file is {len(buf)} bytes, expected {end}: {abs(len(buf) - end)} {what}")
    return data_start


def _zero_padding(buf: bytes, a: int, b: int, where: str) -> None:
    pad = buf[a:b]  # at most 63 bytes
    if pad.strip(b"\0"):
        j = a + next(n for n, byte in enumerate(pad) if byte)
        raise TernFormatError(f"padding byte at file offset {j} ({where}) is 0x{buf[j]:02x}, expected 0")


def _check_crc(i: int, e: TensorEntry, data: memoryview) -> None:
    actual = zlib.crc32(data)
    if actual != e.crc32:
        raise TernFormatError(f"tensors[{i}] ({e.name!r}) CRC32 is 0x{e.crc32:08x} in the table, "
                              f"computed 0x{actual:08x}")


# ====================================================================== §5 encodings (see pack.py)


def _check_data(i: int, e: TensorEntry, data: memoryview) -> None:
    try:
        pack.check(data, e.kind, e.encoding, e.shape, e.params)
    except TernFormatError as err:
        raise TernFormatError(f"tensors[{i}] ({e.name!r}, {e.encoding}): {err}") from None


# ====================================================================== §3.4 graph


def _check_graph(graph_obj: dict, metadata: dict, entries: list[TensorEntry]) -> None:
    """Graph.from_json + validate, every tensor used, table in the order of first use by the nodes."""
    stubs = {e.name: ConstSpec(e.kind, e.shape) for e in entries}
    with _graph_errors():
        graph = Graph.from_json(graph_obj, stubs, metadata)
        order = first_use(graph)
        used = set(order)
        for i, e in enumerate(entries):
            if e.name not in used:
                raise TernFormatError(f"tensors[{i}] ({e.name!r}) is not used by the graph")
        graph.validate()
    for i, (e, name) in enumerate(zip(entries, order)):
        if e.name != name:
            raise TernFormatError(f"tensors[{i}].name is {e.name!r}, expected {name!r} "
                                  "(tensors are stored in the order the nodes first use them)")


@contextlib.contextmanager
def _graph_errors():
    """GraphError becomes TernFormatError; so do OverflowError and RecursionError, should a huge
    number or a deep value reach the graph's checks (the header checks reject both first)."""
    try:
        yield
    except (GraphError, OverflowError, RecursionError) as e:
        raise TernFormatError(f"graph: {e}") from None


def first_use(graph: Graph) -> list[str]:
    """Constant names in the order the graph's nodes first use them (the tensor table order)."""
    order: dict[str, None] = {}
    for node in graph.nodes:
        for name in node.inputs:
            if name in graph.consts:
                order.setdefault(name, None)
    return list(order)


# ====================================================================== reading


class _Reader:
    """The checks of TERN.md, one method per group, in order; each returns a one-line summary."""

    def __init__(self, buf: bytes):
        self.buf = buf
        self.view = memoryview(buf)

    def prelude(self) -> str:
        self.header_len, self.flags = _read_prelude(self.buf)
        return f"magic, version {VERSION}, flags 0x{self.flags:04x}, header_len {self.header_len}"

    def header(self) -> str:
        self.obj, self.header_bytes = _read_header(self.buf, self.header_len, self.flags)
        self.graph_obj, self.metadata, tensors = _check_top(self.obj)
        self.tensor_objs = tensors
        stored = (f"{self.header_len} bytes deflated from {len(self.header_bytes)} bytes of JSON"
                  if self.flags & FLAG_DEFLATE else f"{self.header_len} bytes of JSON")
        return f"{stored}, CRC32 ok, producer {self.metadata['producer']!r}"

    def table(self) -> str:
        self.entries = _read_table(self.tensor_objs)
        return f"{len(self.entries)} tensors"

    def layout(self) -> str:
        self.data_start = _check_layout(self.buf, PRELUDE.size + self.header_len, self.entries)
        return f"data at {self.data_start}, {len(self.buf)} bytes in all, no holes, zero padding"

    def data(self, i: int) -> memoryview:
        e = self.entries[i]
        return self.view[self.data_start + e.offset:self.data_start + e.offset + e.nbytes]

    def crc(self, i: int) -> str:
        _check_crc(i, self.entries[i], self.data(i))
        return f"0x{self.entries[i].crc32:08x}"

    def encoded(self, i: int) -> str:
        e = self.entries[i]
        _check_data(i, e, self.data(i))
        return f"{e.kind} {e.encoding} {list(e.shape)}: {e.bits_per_weight:.3f} bits per weight"

    def graph(self) -> str:
        _check_graph(self.graph_obj, self.metadata, self.entries)
        return f"{len(self.graph_obj['nodes'])} nodes valid"


class TernFile:
    """A checked .tern file held in memory: header, tensor table and zero-copy encoded bytes.

    The runtime keeps weights encoded: ``raw(name)`` gives a tensor's bytes without copying, and
    :mod:`ternarize.pack` decodes them a block of rows at a time. ``graph()`` decodes everything.
    """

    def __init__(self, reader: _Reader, source: str):
        self.source = source
        self.version = VERSION
        self.header: dict = reader.obj
        self.metadata: dict = reader.metadata
        self.tensors: list[TensorEntry] = reader.entries
        self.data_start: int = reader.data_start
        self.size = len(reader.buf)
        self.header_len: int = reader.header_len  # as stored (deflated or not)
        self.json_len: int = len(reader.header_bytes)  # of the JSON text
        self.deflated: bool = bool(reader.flags & FLAG_DEFLATE)
        self._reader = reader
        self._index = {e.name: i for i, e in enumerate(self.tensors)}

    def entry(self, name: str) -> TensorEntry:
        if name not in self._index:
            raise KeyError(f"{self.source} has no tensor {name!r}")
        return self.tensors[self._index[name]]

    @property
    def sha256(self) -> str:
        """SHA-256 of the file's bytes as read (hex)."""
        return hashlib.sha256(self._reader.buf).hexdigest()

    def raw(self, name: str) -> memoryview:
        """The encoded bytes of tensor ``name``, zero-copy (a read-only view of the file)."""
        self.entry(name)
        return self._reader.data(self._index[name])

    def decode(self, name: str) -> np.ndarray:
        """The dense tensor: int8 codes (ternary/binary) or float32, shape from the table."""
        e = self.entry(name)
        try:
            return pack.decode(self.raw(name), e.kind, e.encoding, e.shape, e.params)
        except TernFormatError as err:
            raise TernFormatError(f"tensors[{self._index[name]}] ({name!r}): {err}") from None

    @property
    def dense_nbytes(self) -> int:
        """Bytes ``graph()`` allocates for the decoded tensors (1 per code, 4 per float)."""
        return sum(e.count * (4 if e.kind == "float32" else 1) for e in self.tensors)

    def graph(self) -> Graph:
        """Decode every tensor and rebuild the validated Graph (metadata included)."""
        consts = {e.name: Const(e.kind, self.decode(e.name)) for e in self.tensors}
        fresh = json.loads(self._reader.header_bytes)  # the graph gets objects of its own, not the header's
        with _graph_errors():
            graph = Graph.from_json(fresh["graph"], consts, fresh["metadata"])
            graph.validate()
        return graph

    def __repr__(self) -> str:
        return f"TernFile({self.source!r}, {len(self.tensors)} tensors, {self.size} bytes)"


def parse(buf: bytes, source: str = "<bytes>") -> TernFile:
    """Run every check of TERN.md on the bytes of a file (no dense decoding); return a TernFile."""
    buf = bytes(buf)
    r = _Reader(buf)
    r.prelude()
    r.header()
    r.table()
    r.layout()
    for i in range(len(r.entries)):
        r.crc(i)
    for i in range(len(r.entries)):
        r.encoded(i)
    r.graph()
    return TernFile(r, source)


def _read_file(path) -> bytes:
    """The whole file, read once; a FIFO or device could block or stream forever: regular files only.
    A path that cannot be opened is a TernFormatError too (``verify`` reports it as its read check)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TernFormatError(f"the path of a .tern file must be a file name, not {type(path).__name__}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise TernFormatError(f"{os.fsdecode(path)}: cannot be opened ({getattr(e, 'strerror', None) or e})",
                              "check the path") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "is a folder" if stat.S_ISDIR(mode) else "is not a regular file"
        raise TernFormatError(f"{os.fsdecode(path)} {what}", "give a .tern file")
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read()
        except OSError as e:
            raise TernFormatError(f"{os.fsdecode(path)}: cannot be read ({e.strerror or e})",
                                  "check the disk or copy the file again") from None


def load(path) -> TernFile:
    """Read the file once into memory and check it (see ``parse``). Format errors name the file."""
    buf = _read_file(path)
    try:
        return parse(buf, str(path))
    except TernFormatError as e:
        err = TernFormatError(f"{path}: {e}")  # the message holds the advice already
        err.advice = e.advice
        raise err from None


def read(path) -> Graph:
    """The decoded, validated Graph stored in ``path``."""
    return load(path).graph()


def verify(path) -> list[Check]:
    """Run every check and report ``(check, ok, message)``; format problems never raise.

    ``ok`` is True (passed), False (failed) or None (not run). A failed prelude, header, table or
    layout check stops the checks that depend on it; they are listed as not run, as is the final
    decode after any failure. The file is sound when every check passed.
    """
    try:
        r = _Reader(_read_file(path))
    except TernFormatError as e:
        return [("read", False, str(e))]
    results: list[Check] = []
    for name, step in (("prelude", r.prelude), ("header", r.header), ("tensor table", r.table),
                       ("layout", r.layout)):
        results.append((name, *_attempt(step)))
        if not results[-1][1]:
            results.append(("remaining checks", None, f"not run: the {name} check failed"))
            return results
    for i, e in enumerate(r.entries):
        results.append((f"tensors[{i}] {e.name!r} crc32", *_attempt(lambda i=i: r.crc(i))))
        results.append((f"tensors[{i}] {e.name!r} data", *_attempt(lambda i=i: r.encoded(i))))
    results.append(("graph", *_attempt(r.graph)))
    if all(ok for _, ok, _ in results):
        results.append(("decode", *_attempt(lambda: f"{TernFile(r, str(path)).graph()!r}")))
    else:
        results.append(("decode", None, "not run: a check above failed"))
    return results


def _attempt(step) -> tuple[bool, str]:
    try:
        return True, step()
    except TernFormatError as e:
        return False, str(e)


# ====================================================================== writing


def dumps(graph: Graph, encodings: dict[str, str] | None = None, allow_lossy: bool = False, *,
          producer: str | None = None, deflate: bool = True) -> tuple[bytes, WriteInfo]:
    """The bytes of the .tern file for ``graph`` (deterministic) and what they hold.

    Each tensor takes ``encodings[name]`` if given, else ``pack.choose`` (the smallest lossless
    encoding; f16 for floats only with ``allow_lossy``). ``producer`` overrides "ternarize <version>"
    (the golden files pin it so that their bytes do not change with the version). The header is
    stored deflated when that moves the data section forward (TERN.md §7); ``deflate`` False
    keeps it plain JSON, for readers without an inflater.
    """
    if not isinstance(graph, Graph):
        raise GraphError(f"a .tern file holds a Graph (ternarize.lower(model, x)), got {type(graph).__name__}")
    if encodings is not None and not isinstance(encodings, dict):
        raise ConfigError(f"encodings must map constant names to encodings, got {type(encodings).__name__}")
    graph.validate()
    encodings = dict(encodings or {})
    unknown = sorted(set(encodings) - set(graph.consts))
    if unknown:
        raise ConfigError(f"encodings names {unknown[0]!r}, which is not a constant of the graph")
    entries, blobs, offset = [], [], 0
    for name in first_use(graph):
        blob, entry = _encode_tensor(graph, name, encodings.get(name), allow_lossy, offset)
        entries.append(entry)
        blobs.append(blob)
        offset = align(offset + entry.nbytes)
    metadata = {**graph.metadata, "producer": producer or f"ternarize {__version__}"}
    header, flags = _stored_header(_header_bytes(graph, metadata, entries), deflate)
    data_start = align(PRELUDE.size + len(header))
    out = bytearray(PRELUDE.pack(MAGIC, VERSION, flags, len(header), zlib.crc32(header)) + header)
    for entry, blob in zip(entries, blobs):
        out += bytes(data_start + entry.offset - len(out)) + blob  # zero padding, then the tensor
    out += bytes(data_start - len(out)) if not entries else b""
    buf = bytes(out)
    parse(buf)  # the writer's output must pass the reader: a failure here is a writer bug
    return buf, WriteInfo("", len(buf), len(header), data_start, entries)


def _encode_tensor(graph: Graph, name: str, encoding: str | None, allow_lossy: bool, offset: int):
    const = graph.consts[name]
    const.check_values(name)
    encoding = encoding or pack.choose(const.data, const.kind, allow_lossy)
    if encoding not in pack.KIND_ENCODINGS[const.kind]:
        raise ConfigError(f"encoding {encoding!r} cannot store {name!r} of kind {const.kind}; "
                          f"use one of {', '.join(pack.KIND_ENCODINGS[const.kind])}")
    if encoding == "f16" and not allow_lossy:
        raise ConfigError(f"f16 for {name!r} loses precision; pass allow_lossy=True to accept that")
    try:
        blob, params = pack.encode(const.data, const.kind, encoding)
    except ValueError as e:
        raise ConfigError(f"cannot encode {name!r} as {encoding}: {e}") from None
    entry = TensorEntry(name, const.kind, encoding, const.shape, offset, len(blob), zlib.crc32(blob), params)
    return blob, entry


def _header_bytes(graph: Graph, metadata: dict, entries: list[TensorEntry]) -> bytes:
    obj = {"graph": graph.to_json(), "metadata": metadata, "tensors": [e.to_json() for e in entries]}
    try:
        header = canonical_json(obj)  # first: it rejects circular references
        _string_keys(obj)
        _check_depth(header)
    except (TypeError, ValueError, TernFormatError) as e:
        raise GraphError(f"the graph or its metadata cannot be stored as canonical JSON: {e}") from None
    if len(header) > MAX_HEADER:
        raise GraphError(f"the header would be {len(header)} bytes, more than the limit {MAX_HEADER}")
    return header


def _stored_header(text: bytes, deflate: bool) -> tuple[bytes, int]:
    """(header bytes as stored, flags): the JSON ``text``, or with ``deflate`` its length and raw
    deflate stream (§3.5) when that makes ``data_start`` smaller (and the text is at most
    ``MAX_INFLATE`` times the stream, as readers require)."""
    if not deflate:
        return text, 0
    z = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, DEFLATE_WBITS, DEFLATE_MEMLEVEL, zlib.Z_DEFAULT_STRATEGY)
    stored = len(text).to_bytes(4, "little") + z.compress(text) + z.flush()
    smaller = align(PRELUDE.size + len(stored)) < align(PRELUDE.size + len(text))
    if smaller and len(text) <= MAX_INFLATE * (len(stored) - 4):  # a reader refuses a higher ratio
        return stored, FLAG_DEFLATE
    return text, 0


def _string_keys(obj: Any) -> None:
    """json.dumps would turn a key 1 into "1" silently: the file would not hold what was given. An
    integer beyond a double's range would give a header that readers must reject (§3)."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise TypeError(f"key {bad[0]!r} is not a string")
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, (int, np.integer)) and not _fits_double(int(value)):
            raise ValueError(f"an integer of {int(value).bit_length()} bits overflows a double")


def write(graph: Graph, path, encodings: dict[str, str] | None = None, allow_lossy: bool = False, *,
          producer: str | None = None, deflate: bool = True) -> WriteInfo:
    """Write ``graph`` to ``path`` atomically; the same graph always gives the same bytes.

    The bytes go to a temporary file in the same directory, which is fsynced and then renamed
    over ``path``; on any failure the temporary file is removed and ``path`` is left as it was.
    """
    buf, info = dumps(graph, encodings, allow_lossy, producer=producer, deflate=deflate)
    atomic_write(path, buf)
    return WriteInfo(os.fspath(path), info.size, info.header_len, info.data_start, info.tensors)
