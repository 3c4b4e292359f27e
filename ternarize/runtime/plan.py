"""Liveness of activations: when each can be freed, and the peak of what is live (numpy only).

An activation is live from the node that produces it (or from the start, for a graph input) to
its last use; graph outputs live to the end. ``flatten`` and ``reshape`` return views, so their
output shares the buffer of their input: a buffer is live while any of its names is. The runtime
frees a name after its last use, and the peak estimate walks the same schedule.

Example::

    last = last_uses(graph)                  # name -> index of the last node that reads it
    peak = peak_bytes(graph, shapes, batch=1)
"""

from __future__ import annotations

import math

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
