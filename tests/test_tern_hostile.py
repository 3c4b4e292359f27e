"""Hostile .tern files: a table of hand-built malformed files, then a seeded mutation fuzz.

Each table case edits one thing in a valid file (re-computing the header CRC, and a tensor's CRC
when its data is edited), so that it tests exactly one defect, and expects TernFormatError with a
specific message. The fuzz checks that any mutation is either read or rejected with
TernFormatError, quickly and without large allocations.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import struct
import time
import tracemalloc
import zlib
from functools import cache

import numpy as np
import pytest

from ternarize import pack, tern
from ternarize.errors import TernFormatError
from ternarize.graph import Const, Graph, Node, Value

# ---------------------------------------------------------------------- a valid file and how to edit it

T2, S1, B1, S2, TS, S3, BIAS = range(7)  # tensor indices in the table (order of first use)


def base_graph() -> Graph:
    """30 → 20 (t2, K = 30) → 12 (b1, K = 20) → 10 (ts, 4 blocks of 3 rows): every encoding but f16."""
    rng = np.random.default_rng(123)
    t2 = rng.choice(np.array([-1, 0, 1]), (20, 30))
    ts = np.where(rng.random((10, 12)) < 0.3, rng.choice(np.array([-1, 1]), (10, 12)), 0)
    consts = {
        "l1.w": Const("ternary", t2), "l1.s": Const("float32", rng.random(20)),
        "l2.w": Const("binary", rng.choice(np.array([-1, 1]), (12, 20))), "l2.s": Const("float32", rng.random(12)),
        "l3.w": Const("ternary", ts), "l3.s": Const("float32", rng.random(10)),
        "l3.b": Const("float32", rng.standard_normal(10)),
    }
    nodes = [
        Node("linear", "l1", ["x", "l1.w", "l1.s"], ["h1"]), Node("relu", "r1", ["h1"], ["a1"]),
        Node("linear", "l2", ["a1", "l2.w", "l2.s"], ["h2"]),
        Node("hardtanh", "t", ["h2"], ["a2"], {"min_val": -1.0, "max_val": 1.0}),
        Node("linear", "l3", ["a2", "l3.w", "l3.s", "l3.b"], ["h3"]),
        Node("log_softmax", "out", ["h3"], ["y"], {"axis": 1}),
    ]
    return Graph([Value("x", (None, 30))], ["y"], nodes, consts, {"accuracy": 0.5})


@cache
def base() -> bytes:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pack, "TS_BLOCK_CELLS", 32)  # 3 rows of 12 per block: several ts blocks
        buf, info = tern.dumps(base_graph(), encodings={"l1.w": "t2", "l3.w": "ts"}, deflate=False)
    assert [e.encoding for e in info.tensors] == ["t2", "f32", "b1", "f32", "ts", "f32", "f32"]
    assert info.tensors[TS].params == {"block_rows": 3, "k": info.tensors[TS].params["k"]}
    return buf


@cache
def deflated_base() -> bytes:
    """The base file as the writer stores it by default: the same tensors, the header deflated."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pack, "TS_BLOCK_CELLS", 32)
        buf, _ = tern.dumps(base_graph(), encodings={"l1.w": "t2", "l3.w": "ts"})
    assert struct.unpack_from("<H", buf, 10)[0] == tern.FLAG_DEFLATE
    return buf


def deflate(text: bytes) -> bytes:
    """A raw deflate stream of ``text`` (RFC 1951), as the writer makes it."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return z.compress(text) + z.flush()


def with_stored(stored: bytes) -> bytes:
    """The base file's tensors behind a header stored as ``stored`` with the deflate flag (CRC right)."""
    return assemble(None, split(base())[1], text=stored, flags=tern.FLAG_DEFLATE)


def deflated_header(text: bytes | None = None, *, length: int | None = None, stream: bytes | None = None,
                    tail: bytes = b"") -> bytes:
    """A file whose deflated header holds ``text`` (default: the base header) with its length field and
    stream replaced where given."""
    text = header_text().encode() if text is None else text
    stream = deflate(text) if stream is None else stream
    return with_stored(struct.pack("<I", len(text) if length is None else length) + stream + tail)


def split(buf: bytes) -> tuple[dict, list[bytes]]:
    """The header object and the tensors' bytes of a valid file."""
    header_len = struct.unpack_from("<I", buf, 12)[0]
    header = json.loads(buf[20:20 + header_len])
    start = tern.align(20 + header_len)
    blobs = [buf[start + t["offset"]:start + t["offset"] + t["nbytes"]] for t in header["tensors"]]
    return header, blobs


def assemble(header, blobs, *, text: bytes | None = None, magic=tern.MAGIC, version=1, flags=0,
             header_len=None, crc=None) -> bytes:
    """A file with the standard layout of ``blobs``, whatever the header's offsets say."""
    text = tern.canonical_json(header) if text is None else text
    out = bytearray(struct.pack("<8sHHII", magic, version, flags, len(text) if header_len is None else header_len,
                                zlib.crc32(text) if crc is None else crc) + text)
    start, offset = tern.align(len(out)), 0
    for blob in blobs:
        out += bytes(start + offset - len(out)) + blob
        offset = tern.align(offset + len(blob))
    return bytes(out + bytes(max(0, start - len(out))))


def edit(change) -> bytes:
    """Apply change(header) to a copy of the base header; same data."""
    header, blobs = split(base())
    header = copy.deepcopy(header)
    change(header)
    return assemble(header, blobs)


def with_blob(i: int, blob: bytes, *, fix_crc=True) -> bytes:
    """Replace tensor i's bytes, keeping the table consistent (nbytes, offsets and CRC)."""
    header, blobs = split(base())
    blobs[i] = blob
    offset = 0
    for t, b in zip(header["tensors"], blobs):
        t["offset"], t["nbytes"] = offset, len(b)
        t["crc32"] = zlib.crc32(b) if fix_crc or t is not header["tensors"][i] else t["crc32"]
        offset = tern.align(offset + len(b))
    return assemble(header, blobs)


def patch(buf: bytes, at: int, new: bytes) -> bytes:
    return buf[:at] + new + buf[at + len(new):]


def raw_header(text: bytes) -> bytes:
    return assemble(None, split(base())[1], text=text)


def header_text() -> str:
    return tern.canonical_json(split(base())[0]).decode()


def ts_parts() -> tuple[list[bytes], int]:
    """The ts tensor's blocks (bytes each) and its k."""
    header, blobs = split(base())
    blob, k = blobs[TS], header["tensors"][TS]["params"]["k"]
    blocks, at = [], 0
    while at < len(blob):
        n, n_unary = struct.unpack_from("<II", blob, at)
        size = 8 + n_unary + math.ceil(n * k / 8) + math.ceil(n / 8)
        blocks.append(blob[at:at + size])
        at += size
    return blocks, k


def ts_edit(change) -> bytes:
    blocks, k = ts_parts()
    change(blocks, k)
    return with_blob(TS, b"".join(blocks))


def _set(path, value):
    def change(h):
        obj = h
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return change


def _flip_t2_code(blob: bytes) -> bytes:
    return patch(blob, 0, bytes([(blob[0] & 0b11110011) | 0b00001000]))  # row 0, column 1: 0b10


def _ts_wrong_n_events(blocks, k):
    n, n_unary = struct.unpack_from("<II", blocks[0])
    blocks[0] = struct.pack("<II", n - 1, n_unary) + blocks[0][8:]


def _ts_event_beyond_block(blocks, k):
    blocks[-1] = pack._ts_block_bytes(np.array([12]), np.array([False]), k)  # last block: 1 row of 12


def _ts_not_minimal(blocks, k):
    n, n_unary = struct.unpack_from("<II", blocks[1])
    blocks[1] = struct.pack("<II", n, n_unary + 1) + blocks[1][8:8 + n_unary] + b"\x00" + blocks[1][8 + n_unary:]


def _ts_sign_padding(blocks, k):
    i = next(i for i, b in enumerate(blocks) if struct.unpack_from("<I", b)[0] % 8)
    blocks[i] = blocks[i][:-1] + bytes([blocks[i][-1] | 0x80])


def _binary_zero() -> bytes:
    """l2.w stored as t2 (allowed for binary) but holding one 0 code."""
    header, blobs = split(base())
    codes = base_graph().consts["l2.w"].data.copy()
    codes[3, 4] = 0
    header["tensors"][B1]["encoding"] = "t2"
    blob = pack.encode(codes, "ternary", "t2")[0]
    header["tensors"][B1]["nbytes"] = len(blob)
    blobs[B1] = blob
    offset = 0
    for t, b in zip(header["tensors"], blobs):
        t["offset"], t["crc32"] = offset, zlib.crc32(b)
        offset = tern.align(offset + len(b))
    return assemble(header, blobs)


def _swap_table_order() -> bytes:
    header, blobs = split(base())
    header["tensors"][S1], header["tensors"][T2] = header["tensors"][T2], header["tensors"][S1]
    blobs[S1], blobs[T2] = blobs[T2], blobs[S1]
    offset = 0
    for t, b in zip(header["tensors"], blobs):
        t["offset"] = offset
        offset = tern.align(offset + len(b))
    return assemble(header, blobs)


def _nested(depth: int):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def _non_zero_padding(where: str) -> bytes:
    buf = base()
    f = tern.parse(buf)
    header_end = 20 + struct.unpack_from("<I", buf, 12)[0]
    assert header_end < f.data_start
    at = header_end if where == "header" else f.data_start + f.tensors[T2].nbytes
    return patch(buf, at, b"\x01")


CASES = [
    # 1. prelude
    ("short file", lambda: base()[:19], r"19 bytes, shorter than the 20-byte prelude"),
    ("bad magic", lambda: patch(base(), 0, b"\x89TERN\n\x1a\x00"), r"magic is 89 54 45 52 4e 0a 1a 00"),
    ("unknown version", lambda: patch(base(), 8, b"\x02\x00"), r"version is 2; this reader knows version 1"),
    ("unknown flags", lambda: patch(base(), 10, b"\x02\x00"), r"flags is 0x0002, expected 0 or 0x0001"),
    ("header beyond the file", lambda: patch(base(), 12, struct.pack("<I", len(base()))),
     r"header_len is \d+, beyond the end of the \d+-byte file"),
    ("absurd header length", lambda: patch(base(), 12, b"\xff\xff\xff\xff"),
     r"header_len is 4294967295, more than the limit"),
    # 2. header
    ("bad header CRC", lambda: patch(base(), 16, b"\x00\x00\x00\x00"), r"header CRC32 is 0x00000000, computed 0x"),
    ("invalid JSON", lambda: raw_header(b'{"graph":'), r"header is not valid JSON"),
    ("invalid UTF-8", lambda: raw_header(b'{"a":"\xff"}'), r"not valid UTF-8: byte 0xff"),
    ("duplicate key", lambda: raw_header(header_text().replace('{"graph"', '{"metadata":{},"graph"').encode()),
     r"duplicate key 'metadata'"),
    ("NaN literal", lambda: raw_header(header_text().replace('"accuracy":0.5', '"accuracy":NaN').encode()),
     r"header holds NaN"),
    ("overflowing number", lambda: raw_header(header_text().replace('"accuracy":0.5', '"accuracy":1e999').encode()),
     r"header number 1e999 is not finite"),
    ("overflowing integer",
     lambda: raw_header(header_text().replace('"accuracy":0.5', '"accuracy":' + "9" * 400).encode()),
     r"header integer of 400 digits overflows a double"),
    ("overflowing negative integer",
     lambda: raw_header(header_text().replace('"accuracy":0.5', '"accuracy":-' + "1" + "0" * 309).encode()),
     r"header integer of 310 digits overflows a double"),
    ("integer longer than int() converts",  # refused by its length, whatever the interpreter's digit limit
     lambda: raw_header(header_text().replace('"accuracy":0.5', '"accuracy":' + "7" * 5000).encode()),
     r"header integer of 5000 digits overflows a double"),
    ("too deep", lambda: edit(_set(["metadata", "deep"], _nested(80))), r"nests deeper than 64"),
    ("not an object", lambda: raw_header(b"[]"), r"header must be a JSON object, got list"),
    ("unknown top-level field", lambda: edit(_set(["extra"], 1)), r"header has unknown field 'extra'"),
    ("missing tensors", lambda: edit(lambda h: h.pop("tensors")), r"header lacks field 'tensors'"),
    ("wrong type", lambda: edit(_set(["tensors"], {})), r"tensors must be a list, got \{\}"),
    ("no producer", lambda: edit(lambda h: h["metadata"].pop("producer")), r"metadata.producer must be a string"),
    # 3. tensor table
    ("unknown entry field", lambda: edit(_set(["tensors", 1, "dtype"], "f")),
     r"tensors\[1\] has unknown field 'dtype'"),
    ("missing entry field", lambda: edit(lambda h: h["tensors"][2].pop("crc32")), r"tensors\[2\] lacks field 'crc32'"),
    ("unknown encoding", lambda: edit(_set(["tensors", 0, "encoding"], "t3")),
     r"tensors\[0\]\.encoding is 't3', expected one of"),
    ("unknown kind", lambda: edit(_set(["tensors", 0, "kind"], "int4")), r"tensors\[0\]\.kind is 'int4'"),
    ("ts for float32", lambda: edit(_set(["tensors", S1, "encoding"], "ts")),
     r"tensors\[1\]\.encoding is 'ts', which cannot store kind float32"),
    ("b1 for ternary", lambda: edit(_set(["tensors", T2, "encoding"], "b1")),
     r"tensors\[0\]\.encoding is 'b1', which cannot store kind ternary"),
    ("negative dim", lambda: edit(_set(["tensors", T2, "shape"], [-20, 30])),
     r"tensors\[0\]\.shape\[0\] is -20, outside \[1, 2147483647\]"),
    ("zero dim", lambda: edit(_set(["tensors", T2, "shape"], [20, 0])), r"tensors\[0\]\.shape\[1\] is 0"),
    ("overflowing dim", lambda: edit(_set(["tensors", T2, "shape"], [20, 2**31])),
     r"tensors\[0\]\.shape\[1\] is 2147483648, outside"),
    ("too many elements", lambda: edit(_set(["tensors", T2, "shape"], [65536, 65536])),
     r"has 4294967296 elements, more than 2147483648"),
    ("bool dim", lambda: edit(_set(["tensors", T2, "shape"], [True, 30])), r"shape\[0\] must be an integer, got True"),
    ("float dim", lambda: edit(_set(["tensors", T2, "shape"], [20.0, 30])), r"shape\[0\] must be an integer, got 20.0"),
    ("no dims", lambda: edit(_set(["tensors", S1, "shape"], [])), r"shape has 0 dimensions, expected 1..8"),
    ("negative offset", lambda: edit(_set(["tensors", 0, "offset"], -64)), r"tensors\[0\]\.offset is -64"),
    ("crc out of range", lambda: edit(_set(["tensors", 0, "crc32"], 2**32)), r"tensors\[0\]\.crc32 is 4294967296"),
    ("byte count is not the formula", lambda: edit(_set(["tensors", T2, "nbytes"], 161)),
     r"tensors\[0\]\.nbytes is 161, expected 160 \(t2: R·ceil\(K/4\) for shape \[20, 30\]\)"),
    ("b1 byte count", lambda: edit(_set(["tensors", B1, "nbytes"], 24)), r"tensors\[2\]\.nbytes is 24, expected 36"),
    ("ts shape its bytes cannot hold", lambda: edit(_set(["tensors", TS, "shape"], [10, 10**6])),
     r"tensors\[4\]\.nbytes is \d+, too small for ts shape \[10, 1000000\]"),
    ("ts params", lambda: edit(_set(["tensors", TS, "params"], {"block_rows": 3, "k": 21})),
     r"tensors\[4\]\.params\.k is 21, outside \[0, 20\]"),
    ("params on t2", lambda: edit(_set(["tensors", T2, "params"], {"k": 1})),
     r"tensors\[0\]\.params has unknown field"),
    ("duplicate name", lambda: edit(_set(["tensors", S2, "name"], "l1.s")),
     r"tensors\[3\]\.name 'l1.s' repeats tensors\[1\]\.name"),
    # 4. data section
    ("overlapping offsets", lambda: edit(_set(["tensors", S1, "offset"], 64)),
     r"tensors\[1\]\.offset is 64, expected 192"),
    ("out-of-order offsets", lambda: edit(_set(["tensors", B1, "offset"], 0)),
     r"tensors\[2\]\.offset is 0, expected 320"),
    ("hole", lambda: edit(_set(["tensors", S1, "offset"], 256)), r"tensors\[1\]\.offset is 256, expected 192"),
    ("trailing bytes", lambda: base() + b"\x00", r"1 trailing bytes after the last tensor"),
    ("truncated tensor", lambda: base()[:-1], r"tensors\[6\] \('l3.b'\) ends at byte \d+, beyond the end"),
    ("padding after the header", lambda: _non_zero_padding("header"),
     r"padding byte at file offset \d+ \(after the header\) is 0x01"),
    ("padding between tensors", lambda: _non_zero_padding("tensors"),
     r"padding byte at file offset \d+ \(before tensors\[1\]\) is 0x01"),
    ("bad tensor CRC", lambda: with_blob(S2, b"\x00" * 48, fix_crc=False),
     r"tensors\[3\] \('l2.s'\) CRC32 is 0x[0-9a-f]{8} in the table, computed 0x[0-9a-f]{8}"),
    # 5. encodings
    ("code 0b10", lambda: with_blob(T2, _flip_t2_code(split(base())[1][T2])),
     r"tensors\[0\] \('l1.w', t2\): code 0b10 at row 0 column 1$"),
    ("t2 padding bits", lambda: with_blob(T2, patch(split(base())[1][T2], 7, b"\x40")),
     r"tensors\[0\] \('l1.w', t2\): non-zero padding bits in row 0"),
    ("b1 padding bits", lambda: with_blob(B1, patch(split(base())[1][B1], 2, b"\x80")),
     r"tensors\[2\] \('l2.w', b1\): non-zero padding bits in row 0"),
    ("zero in a binary tensor", _binary_zero, r"code 0b00 \(zero\) at row 3 column 4 of a binary tensor"),
    ("NaN weight", lambda: with_blob(S1, patch(split(base())[1][S1], 8, b"\x00\x00\xc0\x7f")),
     r"tensors\[1\] \('l1.s', f32\): non-finite value nan at index 2"),
    ("ts wrong n_events", lambda: ts_edit(_ts_wrong_n_events),
     r"ts block 0: unary stream has \d+ one bits, n_events is"),
    ("ts event beyond its block", lambda: ts_edit(_ts_event_beyond_block),
     r"ts block 3: event 0 lies at weight 12, beyond the block's 12"),
    ("ts unary not minimal", lambda: ts_edit(_ts_not_minimal), r"ts block 1: n_unary_bytes is \d+, not minimal"),
    ("ts sign padding", lambda: ts_edit(_ts_sign_padding), r"sign stream: non-zero padding bits"),
    ("ts missing block", lambda: ts_edit(lambda b, k: b.pop()), r"ts block 3: needs an 8-byte block header, 0 bytes"),
    ("ts trailing bytes", lambda: ts_edit(lambda b, k: b.append(b"\x00")), r"1 trailing bytes after the last ts block"),
    # 6. graph
    ("missing tensor", lambda: edit(_set(["graph", "nodes", 0, "inputs"], ["x", "l1.w", "l1.s", "ghost"])),
     r"graph: node 'l1' \(linear\) names missing tensor 'ghost'"),
    ("cycle", lambda: edit(_set(["graph", "nodes", 0, "inputs", 0], "a2")),
     r"graph: node 'l1' \(linear\) uses 'a2', which is produced by node 't' at or after it"),
    ("shape mismatch", lambda: edit(_set(["graph", "inputs", 0, "shape"], [None, 31])),
     r"graph: node 'l1' \(linear\): weight 'l1.w' has shape \[20, 30\]; input has 31 features"),
    ("unknown op", lambda: edit(_set(["graph", "nodes", 1, "op"], "gelu")), r"graph: node 'r1' \(gelu\): unknown op"),
    ("unused tensor", lambda: edit(_set(["graph", "nodes", 4, "inputs"], ["a2", "l3.w", "l3.s"])),
     r"tensors\[6\] \('l3.b'\) is not used by the graph"),
    ("table out of order", _swap_table_order,
     r"tensors\[0\]\.name is 'l1.s', expected 'l1.w' \(tensors are stored in the order the nodes first use"),
    ("graph field type", lambda: edit(_set(["graph", "nodes"], {})), r"graph: graph.nodes must be list"),
    ("huge integer attribute", lambda: edit(_set(["graph", "nodes", 3, "attrs", "max_val"], 10**400)),
     r"header integer of 401 digits overflows a double"),
    # 2b. a deflated header (flags bit 0)
    ("plain JSON flagged as deflated", lambda: patch(base(), 10, b"\x01\x00"),
     r"flags say the header is deflated, but it starts like plain JSON \(b'\{\"graph\"'\): flags bit 0 may be "
     r"damaged"),
    ("deflated header too short", lambda: with_stored(b"\x05\x00\x00\x00\x03"),
     r"header is 5 bytes, too short for a deflated header"),
    ("deflated length over the limit", lambda: deflated_header(length=(16 << 20) + 1),
     r"deflated header's length is 16777217, more than the limit"),
    ("deflated length beyond the stream", lambda: deflated_header(b"{}", length=64 * len(deflate(b"{}")) + 1),
     r"deflated header's length is 257, more than 64 times its 4-byte deflate stream"),
    ("deflated length 0", lambda: deflated_header(b"{}", length=0), r"deflated header's length is 0, less than the 2"),
    ("not a deflate stream", lambda: deflated_header(stream=b"\xff" * 64),
     r"deflated header is not a valid deflate stream"),
    ("deflate stream cut short", lambda: deflated_header(stream=deflate(header_text().encode())[:-4]),
     r"deflate stream is cut short|not a valid deflate stream"),
    ("bytes after the deflate stream", lambda: deflated_header(tail=b"\x00\x00"),
     r"deflated header has 2 bytes after the end of its deflate stream"),
    ("deflated header longer than its length", lambda: deflated_header(length=len(header_text()) - 1),
     r"deflated header inflates to more than its length of \d+ bytes"),
    ("deflated header shorter than its length", lambda: deflated_header(length=len(header_text()) + 1),
     r"deflated header inflates to \d+ bytes, but its length is \d+"),
    ("deflated invalid JSON", lambda: deflated_header(b'{"graph":'), r"header is not valid JSON"),
    ("deflated header, bad CRC", lambda: patch(deflated_base(), 16, b"\x00\x00\x00\x00"),
     r"header CRC32 is 0x00000000, computed 0x"),
]


def test_the_base_file_is_valid():
    f = tern.parse(base())
    assert len(f.graph().nodes) == 6
    assert tern.parse(deflated_header()).header == f.header  # the helper's deflated header is sound too
    deflated = tern.parse(deflated_base())
    assert deflated.deflated and not f.deflated and deflated.header == f.header
    assert deflated.data_start < f.data_start and deflated.json_len == f.json_len == f.header_len
    blocks, _ = ts_parts()
    assert len(blocks) == 4 and struct.unpack_from("<I", blocks[0])[0] > 0


@pytest.mark.parametrize("name,build,message", CASES, ids=[c[0] for c in CASES])
def test_hostile_file(name, build, message):
    buf = build()
    with pytest.raises(TernFormatError, match=message):
        tern.parse(buf).graph()


def test_an_integer_that_rounds_to_the_largest_double_is_read():
    big = int(np.finfo(np.float64).max) + 1  # rounds down to the largest double: in range (TERN.md §3)
    f = tern.parse(raw_header(header_text().replace('"accuracy":0.5', f'"accuracy":0.5,"big":{big}').encode()))
    assert f.metadata["big"] == big
    with pytest.raises(TernFormatError, match="header integer of 309 digits overflows a double"):
        tern.parse(raw_header(header_text().replace('"accuracy":0.5', f'"accuracy":{2 ** 1024}').encode()))


def test_table_size():
    assert len(CASES) >= 40


def test_hostile_files_through_load_and_verify(tmp_path):
    for i, (name, build, message) in enumerate(CASES):
        path = tmp_path / f"{i}.tern"
        path.write_bytes(build())
        with pytest.raises(TernFormatError, match=rf"^{re.escape(str(path))}: "):
            tern.load(path).graph()
        results = tern.verify(path)
        assert not all(ok for _, ok, _ in results), name
        assert any(re.search(message, text) for _, ok, text in results if not ok), (name, results)


# ---------------------------------------------------------------------- mutation fuzz

_VALUES = [0, 1, -1, 2, 3, 7, 63, 64, 65, 2**31 - 1, 2**31, 2**32, 2**63, -(2**31), 10**30, 10**400, 1.5, -0.0,
           1e300, True, False, None, "", "t2", "ts", "b1", "f32", "f16", "ternary", "binary", "float32", "linear",
           "l1.w", "x", [], [1], [None, 5], [3, 3], [65536, 65536, 2], {}, {"block_rows": 1, "k": 0}, {"a": 1}]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _random_value(rng: random.Random, old):
    if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.5:
        return old + rng.choice([-65, -64, -1, 1, 64, 65, 2**20])
    return copy.deepcopy(rng.choice(_VALUES))


def _header_edit(rng: random.Random, buf: bytes) -> bytes:
    header, blobs = split(buf)
    path = rng.choice([p for p in _paths(header) if p])
    obj = header
    for key in path[:-1]:
        obj = obj[key]
    if rng.random() < 0.1 and isinstance(obj, dict):
        del obj[path[-1]]
    else:
        obj[path[-1]] = _random_value(rng, obj[path[-1]])
    return assemble(header, blobs)


def _data_edit(rng: random.Random, buf: bytes) -> bytes:
    """Flip bits in one tensor and fix its CRC, so that the decoders see the damage."""
    header, blobs = split(buf)
    i = rng.randrange(len(blobs))
    blob = bytearray(blobs[i])
    for _ in range(rng.randint(1, 3)):
        blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
    blobs[i] = bytes(blob)
    header["tensors"][i]["crc32"] = zlib.crc32(blob)
    return assemble(header, blobs)


def _mutate(rng: random.Random, buf: bytes) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # byte flips anywhere
        out = bytearray(buf)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:  # truncation
        return buf[:rng.randrange(len(buf))]
    if kind == 2:  # insertion
        at = rng.randrange(len(buf) + 1)
        return buf[:at] + rng.randbytes(rng.randint(1, 80)) + buf[at:]
    if kind == 3:
        return _data_edit(rng, buf)
    return _header_edit(rng, buf)  # the most fruitful: twice as likely


def test_mutation_fuzz():
    rng = random.Random(20240601)
    buf = base()
    outcomes = {"read": 0, "rejected": 0}
    tracemalloc.start()
    try:
        for case in range(1500):
            mutated = _mutate(rng, buf)
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            start = time.process_time()  # CPU time: a preempted case is not a slow one
            try:
                tern.parse(mutated).graph()
                outcomes["read"] += 1
            except TernFormatError:
                outcomes["rejected"] += 1
            except Exception as e:  # any other exception type is a reader bug
                raise AssertionError(f"case {case}: {type(e).__name__}: {e}") from e
            elapsed = time.process_time() - start
            peak = tracemalloc.get_traced_memory()[1] - before
            assert elapsed < 1.0, f"case {case} took {elapsed:.2f} s"
            assert peak < 64 << 20, f"case {case} allocated {peak >> 20} MiB"
    finally:
        tracemalloc.stop()
    assert outcomes["rejected"] > 1000 and outcomes["read"] > 0, outcomes


def _stored_edit(rng: random.Random, buf: bytes) -> bytes:
    """Damage a deflated header behind a correct CRC, so that the inflater sees it: flip bits in the
    stream, change the length field, or cut or extend the stream (the header's length follows)."""
    header_len = struct.unpack_from("<I", buf, 12)[0]
    stored = bytearray(buf[20:20 + header_len])
    kind = rng.randrange(3)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            stored[rng.randrange(4, len(stored))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        stored[:4] = struct.pack("<I", rng.choice([0, 1, len(stored), rng.randrange(1 << 32), 16 << 20,
                                                    struct.unpack_from("<I", stored)[0] + rng.choice([-1, 1])]))
    else:
        cut = rng.random() < 0.5
        stored = stored[:rng.randrange(len(stored))] if cut else stored + rng.randbytes(rng.randint(1, 9))
    return assemble(None, split(base())[1], text=bytes(stored), flags=tern.FLAG_DEFLATE)


def test_mutation_fuzz_of_a_deflated_header():
    rng = random.Random(20261128)
    buf = deflated_base()
    outcomes = {"read": 0, "rejected": 0}
    messages = set()
    tracemalloc.start()
    try:
        for case in range(800):
            kind = rng.randrange(4)
            mutated = (_stored_edit(rng, buf) if kind < 2 else buf[:rng.randrange(len(buf))] if kind == 2
                       else patch(buf, rng.randrange(len(buf)), bytes([rng.randrange(256)])))
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            start = time.process_time()
            try:
                tern.parse(mutated).graph()
                outcomes["read"] += 1
            except TernFormatError as e:
                outcomes["rejected"] += 1
                messages.add(re.sub(r"\d+", "N", str(e))[:60])
            except Exception as e:  # any other exception type is a reader bug
                raise AssertionError(f"case {case}: {type(e).__name__}: {e}") from e
            assert time.process_time() - start < 1.0, f"case {case} was slow"
            peak = tracemalloc.get_traced_memory()[1] - before
            assert peak < 64 << 20, f"case {case} allocated {peak >> 20} MiB"
    finally:
        tracemalloc.stop()
    assert outcomes["rejected"] > 600, outcomes
    # the inflater's own checks were reached, not only the CRC's
    reached = [m for m in messages if m.startswith("deflated header")]
    assert len(reached) >= 4, sorted(messages)


@pytest.mark.parametrize("length", [0, 1, 2, 64 * 97_000])
def test_a_deflate_bomb_is_refused_without_inflating_it(length):
    """100 MB of zeros deflate to about 97 KB: whatever the length field says, the reader stops at
    one byte past it (or refuses the field first) and never holds the bomb's output."""
    stream = deflate(bytes(100_000_000))
    buf = deflated_header(length=length, stream=stream)
    tracemalloc.start()
    start = time.process_time()
    try:
        with pytest.raises(TernFormatError, match=r"deflated header's length is [01], less than|inflates to more than"):
            tern.parse(buf)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - start < 1.0
    assert peak < 3 * len(buf) + 2 * min(length + 1, 64 * len(stream)) + (1 << 20), peak
