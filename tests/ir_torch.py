"""A direct torch interpreter of the graph IR, used by tests as an independent second reading of
the op semantics in ternarize/graph.py (the runtime and the ONNX exporter are checked against the
torch model itself; this checks lowering alone)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _weight(graph, node):
    ins = list(node.inputs) + [""] * (4 - len(node.inputs))
    _, w, s, b = ins
    weight = torch.from_numpy(graph.consts[w].data.astype(np.float32))
    if s:
        scale = torch.from_numpy(graph.consts[s].data)
        weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = torch.from_numpy(graph.consts[b].data) if b else None
    return weight, bias


def _pool_args(a):
    return dict(kernel_size=a["kernel"], stride=a["strides"], padding=a["pads"], ceil_mode=a["ceil_mode"])


def run(graph, x) -> np.ndarray:
    env = {graph.inputs[0].name: torch.as_tensor(np.asarray(x, np.float32))}
    for node in graph.nodes:
        a = node.attrs
        xs = [env[i] for i in node.inputs if i in env]
        x0 = xs[0] if xs else None
        op = node.op
        if op == "linear":
            w, b = _weight(graph, node)
            y = F.linear(x0, w, b)
        elif op == "conv2d":
            w, b = _weight(graph, node)
            y = F.conv2d(x0, w, b, a["strides"], a["pads"], a["dilations"], a["groups"])
        elif op == "channel_affine":
            sc, sh = (torch.from_numpy(graph.consts[n].data) for n in node.inputs[1:])
            shape = (1, -1) + (1,) * (x0.dim() - 2)
            y = x0 * sc.reshape(shape) + sh.reshape(shape)
        elif op == "relu":
            y = F.relu(x0)
        elif op == "leaky_relu":
            y = F.leaky_relu(x0, a["alpha"])
        elif op == "hardtanh":
            y = F.hardtanh(x0, a["min_val"], a["max_val"])
        elif op == "maxpool2d":
            y = F.max_pool2d(x0, dilation=a["dilations"], **_pool_args(a))
        elif op == "avgpool2d":
            y = F.avg_pool2d(x0, count_include_pad=a["count_include_pad"], **_pool_args(a))
        elif op == "global_avgpool":
            y = x0.mean(dim=(2, 3), keepdim=True)
        elif op == "flatten":
            y = x0.reshape(x0.shape[0], -1)
        elif op == "reshape":
            y = x0.reshape(x0.shape[0], *a["shape"])
        elif op == "add":
            y = xs[0] + xs[1]
        elif op == "concat":
            y = torch.cat(xs, dim=a["axis"])
        elif op == "softmax":
            y = F.softmax(x0, dim=a["axis"])
        elif op == "log_softmax":
            y = F.log_softmax(x0, dim=a["axis"])
        else:
            raise NotImplementedError(op)
        env[node.outputs[0]] = y
    return env[graph.outputs[0]].numpy()
