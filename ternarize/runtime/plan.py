"""Liveness of activations: when each can be freed, and the peak of what is live (numpy only).

An activation is live from the node that produces it (or from the start, for a graph input) to
its last use; graph outputs live to the end. ``flatten`` and ``reshape`` return views, so their
output shares the buffer of their input: a buffer is live while any of its names is. The runtime
frees a name after its last use, and the peak estimate walks the same schedule.
:func:`memory_bytes` adds what each kernel allocates beside them (:func:`node_temp_bytes`), so that
``Runtime.run`` can refuse a run too large for the machine before it starts.

Example::

    last = last_uses(graph)                  # name -> index of the last node that reads it
    peak = peak_bytes(graph, shapes, batch=1)
    need = memory_bytes(graph, shapes, batch=64)   # with the kernels' temporaries
"""

from __future__ import annotations

import math

from ..graph import out_size
from .kernels import samples_per_chunk

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
    return max(_live_per_node(graph, shapes, batch), default=0)


def memory_bytes(graph, shapes: dict, batch: int = 1) -> int:
    """Most a run of ``batch`` inputs allocates at once, estimated with room to spare: the live
    activations while each node runs plus that node's temporaries (:func:`node_temp_bytes`)."""
    live = _live_per_node(graph, shapes, batch)
    return max([live[0]] + [live[i + 1] + node_temp_bytes(graph, shapes, node, batch)
                            for i, node in enumerate(graph.nodes)])


def _live_per_node(graph, shapes: dict, batch: int) -> list:
    """Bytes of live activations before the first node, then while each node runs."""
    owner = buffers(graph)
    last = last_uses(graph)
    end: dict[str, int] = {}
    for name, buf in owner.items():
        end[buf] = max(end.get(buf, -1), last.get(name, -1))
    size = {buf: batch * math.prod(shapes[buf][1:]) * FLOAT_BYTES for buf in end}
    live = {v.name for v in graph.inputs}
    out = [sum(size[b] for b in live)]
    for i, node in enumerate(graph.nodes):
        live.add(owner[node.outputs[0]])
        out.append(sum(size[b] for b in live))
        live = {b for b in live if end[b] > i}
    return out


def node_temp_bytes(graph, shapes: dict, node, batch: int = 1) -> int:
    """What one kernel allocates beyond its input and output for a batch (an upper bound):

    * a weight op (linear, or a convolution's product): a copy of its input with a row per sign
      (the interleaved rows the sparse gathers read), and its product several times over (sums
      in the rows' order and put back, or the +1 and the −1 points of a split sparse weight summed
      as separate rows and subtracted, and the transposed or reshaped copy); a convolution takes
      its im2col patches ``PATCH_BYTES`` at a time (one input's at least, as ``kernels.conv2d``
      does) and pads its input first;
    * a pooling: its padded input;
    * any other op: a temporary of its output's size (softmax, concat).
    """
    out = batch * FLOAT_BYTES * math.prod(shapes[node.outputs[0]][1:])
    a = node.attrs
    if node.op == "linear":
        k = math.prod(shapes[node.inputs[0]][1:])
        return batch * FLOAT_BYTES * (2 * k + 1) + 4 * out
    if node.op == "conv2d":
        c, h, w = shapes[node.inputs[0]][1:]
        pads = a["pads"]
        o, _, kh, kw = graph.consts[node.inputs[1]].shape
        padded = c * (h + 2 * pads[0]) * (w + 2 * pads[1]) if pads[0] or pads[1] else 0
        oh = out_size(h, kh, a["strides"][0], pads[0], a["dilations"][0], False)
        ow = out_size(w, kw, a["strides"][1], pads[1], a["dilations"][1], False)
        patches = FLOAT_BYTES * (c * kh * kw + 1) * oh * ow  # one input's, with the zero row
        chunk = min(batch, samples_per_chunk(c, kh, kw, oh, ow))
        return batch * FLOAT_BYTES * padded + chunk * (patches + 3 * FLOAT_BYTES * o * oh * ow) + out
    if node.op in ("maxpool2d", "avgpool2d"):
        c, h, w = shapes[node.inputs[0]][1:]
        k, st, d, pads = a["kernel"], a["strides"], a.get("dilations", [1, 1]), a["pads"]
        span = [max(size + p, (out_size(size, k[i], st[i], p, d[i], a["ceil_mode"]) - 1) * st[i]
                    + d[i] * (k[i] - 1) + 1) for i, (size, p) in enumerate(((h, pads[0]), (w, pads[1])))]
        return batch * FLOAT_BYTES * c * span[0] * span[1] + out
    return 0 if node.op in VIEW_OPS else out
