"""Regenerate the golden .tern files and the annotated hex dump shown in formats/TERN.md.

    python formats/golden/make_golden.py            # rewrite the *.tern files next to this script
    python formats/golden/make_golden.py --check    # exit 1 if a file differs from what it would write
    python formats/golden/make_golden.py --dump tiny.tern   # the annotated hex dump of TERN.md

The weights come from a fixed integer generator (not numpy's RNG, whose streams may change), and
the producer is pinned to "ternarize golden" so that the bytes do not change with the version.
tests/test_tern.py checks that the committed files equal what this script writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ternarize import pack, tern
from ternarize.graph import Const, Graph, Node, Value

HERE = Path(__file__).resolve().parent
PRODUCER = "ternarize golden"


def _stream(seed: int, n: int) -> np.ndarray:
    """n pseudo-random integers in [0, 2^31) from a 64-bit LCG (Knuth's MMIX constants)."""
    out, state = np.empty(n, np.int64), seed
    for i in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out[i] = state >> 33
    return out


def _ternary(seed: int, shape: tuple, nonzero_per_mille: int) -> np.ndarray:
    u = _stream(seed, int(np.prod(shape)))
    sign = np.where(u & 1, -1, 1)
    return np.where((u >> 1) % 1000 < nonzero_per_mille, sign, 0).astype(np.int8).reshape(shape)


def _binary(seed: int, shape: tuple) -> np.ndarray:
    return np.where(_stream(seed, int(np.prod(shape))) & 1, 1, -1).astype(np.int8).reshape(shape)


def _floats(seed: int, shape: tuple) -> np.ndarray:
    """Multiples of 1/64 in [-2, 2): exact in float32 and float16 alike."""
    return ((_stream(seed, int(np.prod(shape))) % 256 - 128) / 64).astype(np.float32).reshape(shape)


def tiny() -> Graph:
    """y = relu((x · wᵀ) · s): one ternary linear layer 5 → 3 with a per-row scale (the spec's example)."""
    w = np.array([[1, 0, -1, 1, -1], [0, 0, 1, 0, 0], [-1, -1, 0, 1, 1]], np.int8)
    s = np.array([0.5, 1.0, 0.25], np.float32)
    nodes = [Node("linear", "fc", ["x", "w", "s"], ["h"]), Node("relu", "act", ["h"], ["y"])]
    return Graph([Value("x", (None, 5))], ["y"], nodes, {"w": Const("ternary", w), "s": Const("float32", s)})


def mixed() -> Graph:
    """An MLP 64 → 48 (ts, 5 % non-zero) → 32 (b1) → 16 (t2) → 10 (float, f32): all encodings but f16."""
    consts = {
        "fc1.w": Const("ternary", _ternary(1, (48, 64), 50)), "fc1.s": Const("float32", _floats(2, (48,))),
        "fc2.w": Const("binary", _binary(3, (32, 48))), "fc2.s": Const("float32", _floats(4, (32,))),
        "fc3.w": Const("ternary", _ternary(5, (16, 32), 600)), "fc3.s": Const("float32", _floats(6, (16,))),
        "fc3.b": Const("float32", _floats(7, (16,))),
        "head.w": Const("float32", _floats(8, (10, 16))), "head.b": Const("float32", _floats(9, (10,))),
    }
    nodes = [
        Node("linear", "fc1", ["x", "fc1.w", "fc1.s"], ["h1"]), Node("relu", "r1", ["h1"], ["a1"]),
        Node("linear", "fc2", ["a1", "fc2.w", "fc2.s"], ["h2"]),
        Node("hardtanh", "t2", ["h2"], ["a2"], {"min_val": -1.0, "max_val": 1.0}),
        Node("linear", "fc3", ["a2", "fc3.w", "fc3.s", "fc3.b"], ["h3"]), Node("relu", "r3", ["h3"], ["a3"]),
        Node("linear", "head", ["a3", "head.w", "", "head.b"], ["logits"]),
        Node("log_softmax", "out", ["logits"], ["y"], {"axis": 1}),
    ]
    meta = {"source_sha256": "0" * 64, "training": {"method": "msa", "epochs": 3}, "accuracy": 0.5}
    return Graph([Value("x", (None, 64))], ["y"], nodes, consts, meta)


def conv() -> Graph:
    """conv 3×3 (ternary) → relu → maxpool → flatten → linear (ternary) → softmax; the bias in f16."""
    consts = {
        "conv.w": Const("ternary", _ternary(11, (4, 1, 3, 3), 400)),
        "conv.s": Const("float32", _floats(12, (4,))), "conv.b": Const("float32", _floats(13, (4,))),
        "fc.w": Const("ternary", _ternary(14, (10, 64), 100)), "fc.s": Const("float32", _floats(15, (10,))),
    }
    pair = {"strides": [1, 1], "pads": [1, 1], "dilations": [1, 1]}
    nodes = [
        Node("conv2d", "conv", ["x", "conv.w", "conv.s", "conv.b"], ["c"], {**pair, "groups": 1}),
        Node("relu", "relu", ["c"], ["r"]),
        Node("maxpool2d", "pool", ["r"], ["p"], {"kernel": [2, 2], "strides": [2, 2], "pads": [0, 0],
                                                 "dilations": [1, 1], "ceil_mode": False}),
        Node("flatten", "flat", ["p"], ["f"]),
        Node("linear", "fc", ["f", "fc.w", "fc.s"], ["logits"]),
        Node("softmax", "prob", ["logits"], ["y"], {"axis": 1}),
    ]
    return Graph([Value("x", (None, 1, 8, 8))], ["y"], nodes, consts)


def no_weights() -> Graph:
    """A graph without constants: the file ends at data_start."""
    return Graph([Value("x", (None, 4))], ["y"], [Node("relu", "act", ["x"], ["y"])], {})


# name -> (graph builder, write options); all but deflated.tern keep a plain JSON header (readable in
# a hex dump, and bytes that no deflate implementation changes)
GOLDEN = {
    "tiny.tern": (tiny, {"deflate": False}),
    "mixed.tern": (mixed, {"encodings": {"fc3.w": "t2"}, "deflate": False}),  # t2 although ts would be smaller
    "conv.tern": (conv, {"encodings": {"conv.b": "f16"}, "allow_lossy": True, "deflate": False}),
    "no_weights.tern": (no_weights, {"deflate": False}),
    "deflated.tern": (mixed, {"encodings": {"fc3.w": "t2"}}),  # mixed.tern as the writer stores it by default
}


def build(name: str) -> bytes:
    builder, options = GOLDEN[name]
    buf, _ = tern.dumps(builder(), producer=PRODUCER, **options)
    return buf


# ---------------------------------------------------------------------- the annotated dump


def _hex(chunk: bytes) -> str:
    return " ".join(f"{b:02x}" for b in chunk)


def _line(offset: int, chunk: bytes, note: str = "") -> str:
    return f"{offset:08x}  {_hex(chunk):<47}  {note}".rstrip()


def _ascii(chunk: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)


def _tensor_lines(e: tern.TensorEntry, values: np.ndarray, buf: bytes, start: int) -> list[str]:
    """One line per row (t2, b1) or per value (f32, f16); ts in plain 16-byte lines."""
    if e.encoding == "ts":
        end = start + e.nbytes
        return [_line(at, buf[at:min(at + 16, end)]) for at in range(start, end, 16)]
    step = {"f32": 4, "f16": 2}.get(e.encoding) or pack.dense_size(e.encoding, (1, *e.shape[1:]))
    return [_line(at, buf[at:at + step], _rows_note(e, values, row))
            for row, at in enumerate(range(start, start + e.nbytes, step))]


def _rows_note(e: tern.TensorEntry, values: np.ndarray, row: int) -> str:
    if e.kind == "float32":
        return f"{e.name}[{row}] = {values.reshape(-1)[row]:g}"
    text = " ".join(f"{v:+d}" if v else "0" for v in values.reshape(e.shape[0], -1)[row])
    return f"{e.name} row {row}: {text}"


def dump(buf: bytes) -> str:
    """xxd-style dump of a whole file, one region per paragraph, each line annotated."""
    f = tern.parse(buf)
    header_len = int.from_bytes(buf[12:16], "little")
    crc = int.from_bytes(buf[16:20], "little")
    flags = "flags = 1 (the header is deflated)" if f.deflated else "flags = 0"
    out = ["# prelude (20 bytes)",
           _line(0, buf[0:8], 'magic "\\x89TERN\\r\\n\\x1a"'), _line(8, buf[8:10], "version = 1"),
           _line(10, buf[10:12], flags), _line(12, buf[12:16], f"header_len = {header_len}"),
           _line(16, buf[16:20], f"header CRC32 = 0x{crc:08x}")]
    end = 20 + header_len
    if f.deflated:
        out += [f"# header ({header_len} bytes: json_len, then a raw deflate stream of the canonical JSON)",
                _line(20, buf[20:24], f"json_len = {f.json_len}")]
        out += [_line(at, buf[at:min(at + 16, end)]) for at in range(24, end, 16)]
    else:
        out.append(f"# header ({header_len} bytes of canonical JSON)")
        for at in range(20, end, 16):
            out.append(_line(at, buf[at:min(at + 16, end)], _ascii(buf[at:min(at + 16, end)])))
    out += _padding(end, f.data_start, "after the header")
    for i, e in enumerate(f.tensors):
        start = f.data_start + e.offset
        out.append(f"# tensors[{i}] {e.name!r}: {e.kind} {e.encoding} shape {list(e.shape)}, "
                   f"{e.nbytes} bytes at data_start + {e.offset}")
        out += _tensor_lines(e, f.decode(e.name), buf, start)
        if i + 1 < len(f.tensors):
            out += _padding(start + e.nbytes, f.data_start + f.tensors[i + 1].offset, f"after tensors[{i}]")
    out.append(f"# end of file at {len(buf)} bytes")
    return "\n".join(out)


def _padding(a: int, b: int, where: str) -> list[str]:
    return [f"# {b - a} zero bytes of padding {where}, up to offset {b} (0x{b:x})"] if b > a else []


# ---------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--dump", metavar="NAME", help="print the annotated hex dump of one golden file")
    args = parser.parse_args(argv)
    if args.dump:
        print(dump(build(args.dump)))
        return 0
    stale = []
    for name in GOLDEN:
        buf, path = build(name), HERE / name
        if args.check:
            if not path.exists() or path.read_bytes() != buf:
                stale.append(name)
        else:
            path.write_bytes(buf)
            print(f"wrote {path} ({len(buf)} bytes)")
    for name in stale:
        print(f"{name} differs from what make_golden.py writes", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
