"""Liveness of activations: when each can be freed, and the peak of what is live (numpy only).

An activation is live from the node that produces it (or from the start, for a graph input) to
its last use; graph outputs live to the end. ``flatten`` and ``reshape`` return views, so their
output shares the buffer of their input: a buffer is live while any of its names is. The runtime
frees a name after its last use, and the peak estimate walks the same schedule. :func:`temp_bytes`
bounds what a kernel allocates beyond its input and output, so that ``Runtime.run`` can refuse a
run too large for the machine before it starts.

Example::

    last = last_uses(graph)                  # name -> index of the last node that reads it
    peak = peak_bytes(graph, shapes, batch=1)
    temps = temp_bytes(graph, shapes, batch=1)     # what one kernel allocates beside them
"""

from __future__ import annotations

import math

from .kernels import PATCH_BYTES, out_size

VIEW_OPS = ("flatten", "reshape")
FLOAT_BYTES = 4


def last_uses(graph) -> dict[str, int]:
    """Index of the last node reading each activation; graph outputs get len(nodes)."""
    last: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for name in node.inputs:
            if name and name not in graph.consts:
                last[name] = i
    for name in graph.outputs:
        last[name] = len(graph.nodes)
    return last


def buffers(graph) -> dict[str, str]:
    """Activation name → the name of the buffer holding it (its own, or its view source's)."""
    owner = {v.name: v.name for v in graph.inputs}
    for node in graph.nodes:
        out = node.outputs[0]
        owner[out] = owner[node.inputs[0]] if node.op in VIEW_OPS else out
    return owner


def peak_bytes(graph, shapes: dict, batch: int = 1) -> int:
    """Largest total of simultaneously live activation buffers over the schedule (float32).

    While node i runs, its inputs and its output are live; buffers whose last use was before i
    are freed. A buffer's life ends at the last use of any of its names.
    """
    owner = buffers(graph)
    last = last_uses(graph)
    end: dict[str, int] = {}
    for name, buf in owner.items():
        end[buf] = max(end.get(buf, -1), last.get(name, -1))
    size = {buf: batch * math.prod(shapes[buf][1:]) * FLOAT_BYTES for buf in end}
    live = {v.name for v in graph.inputs}
    peak = sum(size[b] for b in live)
    for i, node in enumerate(graph.nodes):
        live.add(owner[node.outputs[0]])
        peak = max(peak, sum(size[b] for b in live))
        live = {b for b in live if end[b] > i}
    return peak


def temp_bytes(graph, shapes: dict, batch: int = 1) -> int:
    """The largest temporaries one kernel allocates beyond its input and output for a batch: a
    convolution's padded input and one chunk of its im2col patches (``PATCH_BYTES`` of them, one
    input's at least, as ``kernels.conv2d`` takes them) with their product; a pooling's padded
    input."""
    most = 0
    for node in graph.nodes:
        if node.op not in ("conv2d", "maxpool2d", "avgpool2d"):
            continue
        c, h, w = shapes[node.inputs[0]][1:]
        a = node.attrs
        pads = a["pads"]
        if node.op == "conv2d":
            o, _, kh, kw = graph.consts[node.inputs[1]].shape
            padded = c * (h + 2 * pads[0]) * (w + 2 * pads[1]) if pads[0] or pads[1] else 0
            oh = out_size(h, kh, a["strides"][0], pads[0], a["dilations"][0], False)
            ow = out_size(w, kw, a["strides"][1], pads[1], a["dilations"][1], False)
            patches = FLOAT_BYTES * c * kh * kw * oh * ow  # one input's
            chunk = min(batch, max(1, PATCH_BYTES // max(1, patches)))
            most = max(most, batch * FLOAT_BYTES * padded
                       + chunk * (patches + FLOAT_BYTES * (1 + 2 * o) * oh * ow))  # + the zero row, product
        else:  # padded on the left, and on the right as far as the last window reaches
            k, st, d = a["kernel"], a["strides"], a.get("dilations", [1, 1])
            ceil = a["ceil_mode"]
            span = [max(size + p, (out_size(size, k[i], st[i], p, d[i], ceil) - 1) * st[i] + d[i] * (k[i] - 1) + 1)
                    for i, (size, p) in enumerate(((h, pads[0]), (w, pads[1])))]
            most = max(most, batch * FLOAT_BYTES * c * span[0] * span[1])
    return most
