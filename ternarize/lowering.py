"""Lowering: a trained torch model → :class:`ternarize.graph.Graph`.

The model is traced with ``torch.fx`` and its shapes propagated with an example input; every call
becomes one IR node (see the op table in :mod:`ternarize.graph`). Then:

* **Discrete weights** of Linear/Conv2d layers are split into codes θ and a per-output-channel
  scale s with W = s_c·θ exactly (bit for bit); anything else raises :class:`LoweringError`.
  Which weights are discrete is given by ``discrete`` (parameter name → "ternary"/"binary", as the
  trainer reports it) or, when omitted, detected: a weight whose every row holds only 0 and ±s_c.
* **BatchNorm** (eval statistics) folds into the preceding Linear/Conv2d: with m = γ/√(σ²+ε),
  s' = s·m and b' = (b − μ)·m + β; a row whose s' < 0 has θ and s' negated, so scales stay ≥ 0.
  It also folds through a max-pool when every m ≥ 0 (max commutes with x ↦ m·x + c for m ≥ 0),
  which is the paper's conv → max-pool → BN block. Otherwise it becomes a ``channel_affine`` node.
* Dropout, Identity and other no-ops disappear; ``view``/``reshape`` that keep the batch become
  ``flatten`` or ``reshape``.

Example::

    graph = ternarize.lower(model, torch.zeros(1, 1, 28, 28))
    graph.validate()
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import LoweringError
from .graph import Const, Graph, Node, Value


def lower(model: nn.Module, example_input: torch.Tensor, discrete: dict[str, str] | None = None) -> Graph:
    """Lower ``model`` (evaluated in eval mode, on CPU) to a validated Graph.

    ``example_input``: one input of the right shape; its batch size does not matter.
    ``discrete``: parameter name (``"features.0.weight"``) → ``"ternary"`` | ``"binary"``; None
    detects discrete weights by their values.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise LoweringError("TorchScript models cannot be lowered: load the original nn.Module "
                            "(torch.save(model) or a state_dict with --arch) instead")
    if not isinstance(model, torch.nn.Module):
        raise LoweringError(f"lower needs a torch nn.Module, got {type(model).__name__}")
    if discrete is not None:
        if not isinstance(discrete, dict):
            raise LoweringError(f"discrete must map parameter names to 'ternary' or 'binary', got "
                                f"{type(discrete).__name__}")
        names = dict(model.named_parameters())
        unknown = sorted(set(discrete) - set(names))
        if unknown:
            raise LoweringError(f"discrete names {unknown[0]!r}, which is not a parameter of the model "
                                f"(parameters: {', '.join(list(names)[:4])}{' ...' if len(names) > 4 else ''})")
    sample = torch.as_tensor(example_input, dtype=torch.float32).cpu()
    sample = sample[:1].expand(2, *sample.shape[1:]).contiguous()  # batch 2: a reshape that mixes batch shows
    was_training = model.training
    model.eval()  # before tracing: fx bakes `if self.training:` branches into the graph
    try:
        traced = _trace(model)
        inputs = [n.name for n in traced.graph.nodes if n.op == "placeholder"]
        if len(inputs) > 1:
            raise LoweringError(f"{type(model).__name__}.forward takes {len(inputs)} inputs ({', '.join(inputs)}); "
                                "only models of one input tensor are supported")
        with torch.no_grad():
            traced_out = _propagate(traced, sample.clone())
            builder = _Builder(traced, dict(traced.named_modules()), discrete, model)
            graph = builder.build()  # an unsupported operation is named first
            _check_trace(model, traced_out, sample)
    finally:
        model.train(was_training)
    _fold_batchnorms(graph)
    _prune(graph)
    graph.validate()
    return graph


# ---------------------------------------------------------------------- tracing


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoweringError(f"{type(model).__name__} cannot be traced by torch.fx ({first}); "
                            "models with data-dependent control flow are not supported") from e


def _propagate(gm: fx.GraphModule, sample: torch.Tensor):
    """Run the traced model once, recording each node's output in node.meta['value']; return its output."""

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            plain = None
            if n.op == "call_module":  # hooks run here but are not lowered: do they change the result?
                m = self.fetch_attr(n.target)
                if m._forward_hooks or m._forward_pre_hooks:
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
                    plain = m.forward(*map(clone, args), **{k: clone(v) for k, v in kwargs.items()})
            out = super().run_node(n)
            n.meta["value"] = out
            if isinstance(out, torch.Tensor):
                n.meta["storage"] = out.untyped_storage().data_ptr()
            if plain is not None and not _same(plain, out):
                n.meta["hooked"] = True
            return out

    try:
        return _Recorder(gm).run(sample)
    except Exception as e:
        raise LoweringError(f"the model fails on an input of shape {list(sample.shape[1:])} "
                            f"(batch excluded): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            ) from e


def _check_trace(model: nn.Module, traced_out, sample: torch.Tensor) -> None:
    """Refuse a trace that computes something else than the model: fx records ``y += x`` as
    ``y + x``, so a tensor that an in-place update overwrote would be read unchanged; and it skips
    the model's own forward hooks. A model whose eval outputs are random is refused as such."""
    eager = model(sample.clone())
    if not _same(eager, model(sample.clone())):
        raise LoweringError(f"{type(model).__name__} gives different outputs for the same input in eval mode "
                            "(a random operation such as F.dropout without training=self.training, or "
                            "torch.randn); make its eval forward deterministic")
    if not _same(traced_out, eager):
        raise LoweringError(f"{type(model).__name__}: the graph torch.fx traces computes other values than the "
                            "model: fx skips the model's own forward hooks, and traces an in-place `y += x` as "
                            "`y + x` (a tensor it overwrote is then read unchanged; write `y = y + x`)")


def _same(a, b) -> bool:
    """Whether two outputs (tensors, or tuples/lists of them) agree; other values are not compared."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))
    return True


# ---------------------------------------------------------------------- building


@dataclass
class _BN:
    """A BatchNorm waiting to be folded: y = x·mult[c] + shift[c]."""

    mult: np.ndarray
    shift: np.ndarray


_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", F.hardtanh: "hardtanh",
    F.relu6: "relu6", torch.flatten: "flatten", operator.add: "add", torch.add: "add",
    operator.iadd: "add", torch.cat: "concat", torch.concat: "concat", torch.concatenate: "concat",
    torch.reshape: "reshape", torch.relu_: "relu", F.softmax: "softmax",
    torch.softmax: "softmax", F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    F.max_pool2d: "maxpool2d", F.avg_pool2d: "avgpool2d", F.adaptive_avg_pool2d: "adaptive_avgpool",
    F.dropout: "identity", F.linear: "linear_fn", F.conv2d: "conv2d_fn",
}
_METHODS = {"view": "reshape", "reshape": "reshape", "flatten": "flatten", "relu": "relu", "relu_": "relu",
            "add": "add", "add_": "add", "softmax": "softmax", "log_softmax": "log_softmax", "contiguous": "identity"}
# in-place calls: later reads of the tensor they overwrite must see their result
_INPLACE_FUNCTIONS = {torch.relu_: None, operator.iadd: None, F.relu: 1, F.relu6: 1, F.leaky_relu: 2, F.hardtanh: 3}
_INPLACE_METHODS = ("relu_", "add_")
_NOOP_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)


class _Builder:
    def __init__(self, gm: fx.GraphModule, modules: dict[str, nn.Module], discrete, model: nn.Module | None = None):
        self.gm, self.modules, self.discrete = gm, modules, discrete
        # each parameter's name in the model's named_parameters(), which names a tied one once
        self.param_names: dict[int, str] = {}
        for name, p in (model or gm).named_parameters():
            self.param_names.setdefault(id(p), name)
        self.alias: dict[str, str] = {}   # fx node name -> IR value name
        self.nodes: list[Node] = []
        self.consts: dict[str, Const] = {}
        self.inputs: list[Value] = []
        self.outputs: list[str] = []
        self.node_names: set[str] = set()

    def build(self) -> Graph:
        self.order = {n: i for i, n in enumerate(self.gm.graph.nodes)}  # for _overwrite
        for n in self.gm.graph.nodes:
            self._lower_node(n)
        return Graph(self.inputs, self.outputs, self.nodes, self.consts)

    # -- dispatch
    def _lower_node(self, n: fx.Node) -> None:
        if n.op == "placeholder":
            if self.inputs:
                raise LoweringError(f"the model takes more than one input ({n.name}); only one is supported")
            shape = tuple(n.meta["value"].shape)
            self.inputs.append(Value("input", (None, *shape[1:])))
            self.alias[n.name] = "input"
        elif n.op == "output":
            self._lower_output(n)
        elif n.op == "get_attr":
            pass  # parameters are read where they are used
        elif n.op == "call_module":
            self._lower_module(n, self.modules[n.target])
        elif n.op == "call_function" and getattr(n.target, "__name__", "") == "max_pool2d_with_indices":
            raise LoweringError(f"F.max_pool2d at {n.name!r}{_in_module(n)} {_RETURN_INDICES}")
        elif n.op in ("call_function", "call_method") and not isinstance(n.meta.get("value"), torch.Tensor):
            return  # x.shape, x.size(0), ...: only feed a reshape's target, which reads the traced shape
        elif n.op == "call_function":
            self._lower_call(n, _FUNCTIONS.get(n.target), _fn_name(n.target))
        elif n.op == "call_method":
            self._lower_call(n, _METHODS.get(n.target), f".{n.target}()")
        else:  # pragma: no cover - fx has no other node kinds
            raise LoweringError(f"unexpected fx node {n.op} {n.name}")
        if self._inplace(n) and isinstance(n.args[0], fx.Node) and n.name in self.alias:
            self._overwrite(n, n.args[0])

    def _overwrite(self, n: fx.Node, target: fx.Node) -> None:
        """``n`` overwrote ``target`` in place: later reads of it, and of what shares its storage as
        the same value, see the result. A view of it under another shape, or a copy that the lowering
        took for the same value (an adaptive pool to the input size), read later is refused."""
        old, new, storage = self.alias[target.name], self.alias[n.name], target.meta.get("storage")
        order = self.order
        for v in self.gm.graph.nodes:
            if order[v] >= order[n]:
                break
            if v.name not in self.alias or v is target:
                continue
            same_value, shares = self.alias[v.name] == old, storage is not None and v.meta.get("storage") == storage
            if same_value and shares:
                self.alias[v.name] = new
            elif same_value != shares and any(order[u] > order[n] for u in v.users):
                what = "a view of it" if shares else "a copy of it"
                raise LoweringError(f"{_fn_name(n.target) if n.op == 'call_function' else n.target} at {n.name!r}"
                                    f"{_in_module(n)} overwrites {target.name!r} in place, and {what} ({v.name!r}) "
                                    "is read later; use the out-of-place form (inplace=False, relu, add)")
        self.alias[target.name] = new

    def _inplace(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            m = self.modules[n.target]
            return isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Hardtanh)) and bool(m.inplace)
        if n.op == "call_method":
            return n.target in _INPLACE_METHODS
        if n.op == "call_function" and n.target in _INPLACE_FUNCTIONS:
            i = _INPLACE_FUNCTIONS[n.target]
            return i is None or bool(_arg(n, i, "inplace", False))
        return False

    def _lower_output(self, n: fx.Node) -> None:
        outs = n.args[0]
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        for i, o in enumerate(outs):
            if not isinstance(o, fx.Node) or not isinstance(o.meta.get("value"), torch.Tensor):
                raise LoweringError("the model must return a tensor or a tuple of tensors")
            name = "output" if len(outs) == 1 else f"output_{i}"
            if self.alias[o.name] in self.outputs:
                raise LoweringError(f"the model returns the same tensor twice (outputs "
                                    f"{self.outputs.index(self.alias[o.name])} and {i}); return it once")
            self._rename(self.alias[o.name], name)
            self.outputs.append(name)

    def _rename(self, old: str, new: str) -> None:
        if old == "input":  # an identity model: keep input, add nothing
            raise LoweringError("the model returns its input unchanged; there is nothing to lower")
        for node in self.nodes:
            node.outputs = [new if o == old else o for o in node.outputs]
            node.inputs = [new if o == old else o for o in node.inputs]
        self.alias = {k: (new if v == old else v) for k, v in self.alias.items()}

    # -- helpers
    def _x(self, arg) -> str:
        if not isinstance(arg, fx.Node) or arg.name not in self.alias:
            raise LoweringError(f"an operand {arg!r} is not a tensor computed from the input")
        return self.alias[arg.name]

    def _emit(self, n: fx.Node, op: str, inputs: list[str], attrs=None, name=None) -> None:
        out, name = n.name, name or n.name
        if name in self.node_names:  # a module called twice: its second node gets a suffix
            name = next(f"{name}:{k}" for k in range(2, 1 << 20) if f"{name}:{k}" not in self.node_names)
        self.node_names.add(name)
        self.nodes.append(Node(op, name, inputs, [out], attrs or {}))
        self.alias[n.name] = out

    def _const(self, name: str, kind: str, data) -> str:
        if name == "input" or re.fullmatch(r"output(_\d+)?", name):  # the graph's own names (a parameter's)
            name += ".param"
        self.consts[name] = Const(kind, np.asarray(data))
        return name

    def _shape(self, n: fx.Node) -> tuple:
        v = n.meta.get("value")
        return tuple(v.shape) if isinstance(v, torch.Tensor) else ()

    # -- modules
    def _lower_module(self, n: fx.Node, m: nn.Module) -> None:
        path = n.target
        x = lambda: self._x(n.args[0])  # noqa: E731 - read lazily: some modules take no tensor
        if n.meta.get("hooked"):
            raise LoweringError(f"{type(m).__name__} at {path!r} has a forward hook or pre-hook that changes what "
                                "it computes, which is not lowered; remove it (or move it into forward)")
        if isinstance(m, _NOOP_MODULES):
            self.alias[n.name] = x()
        elif isinstance(m, nn.Linear):
            self._weighted(n, "linear", path, m.weight, m.bias, x(), {})
        elif isinstance(m, nn.Conv2d):
            self._weighted(n, "conv2d", path, m.weight, m.bias, x(), _conv_attrs(m, path))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self._batchnorm(n, m, path, x())
        elif isinstance(m, nn.ReLU):
            self._emit(n, "relu", [x()], name=path)
        elif isinstance(m, nn.ReLU6):
            self._emit(n, "hardtanh", [x()], {"min_val": 0.0, "max_val": 6.0}, name=path)
        elif isinstance(m, nn.LeakyReLU):
            self._emit(n, "leaky_relu", [x()], {"alpha": float(m.negative_slope)}, name=path)
        elif isinstance(m, nn.Hardtanh):
            self._hardtanh(n, f"Hardtanh at {path!r}", x(), m.min_val, m.max_val, name=path)
        elif isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise LoweringError(f"MaxPool2d at {path!r} {_RETURN_INDICES}")
            self._pool(n, "maxpool2d", path, x(), m.kernel_size, m.stride, m.padding, m.ceil_mode, m.dilation)
        elif isinstance(m, nn.AvgPool2d):
            if m.divisor_override:
                raise LoweringError(f"AvgPool2d at {path!r} uses divisor_override, which is not supported")
            self._pool(n, "avgpool2d", path, x(), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                       count_include_pad=m.count_include_pad)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self._adaptive(n, f"AdaptiveAvgPool2d at {path!r}", path, x())
        elif isinstance(m, nn.Flatten):
            self._reshape(n, f"Flatten at {path!r}", x(), path)
        elif isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            op = "softmax" if isinstance(m, nn.Softmax) else "log_softmax"
            self._softmax(n, f"{type(m).__name__} at {path!r}", op, path, x(), m.dim)
        else:
            raise LoweringError(f"unsupported module {type(m).__name__} at {path!r}; supported: Linear, "
                                "Conv2d, BatchNorm1d/2d, ReLU, ReLU6, LeakyReLU, Hardtanh, MaxPool2d, AvgPool2d, "
                                "AdaptiveAvgPool2d(1), Flatten, Dropout, Identity, Softmax, LogSoftmax")

    def _weighted(self, n, op, path, weight, bias, x, attrs, pname=None, bname=None) -> None:
        pname = pname or self.param_names.get(id(weight)) or (f"{path}.weight" if path else "weight")
        where = f"{'Linear' if op == 'linear' else 'Conv2d'} at {path!r}"
        where += _in_module(n) if n.op != "call_module" else ""
        if weight.numel() == 0:
            raise LoweringError(f"{where} has a weight of shape {tuple(weight.shape)}, which holds no weights; "
                                "remove the layer or give it inputs and outputs")
        rank = len(self._shape(n.args[0])) if op == "linear" and isinstance(n.args[0], fx.Node) else 2
        if rank not in (0, 2):  # 0: no recorded value (the graph's own check then applies)
            raise LoweringError(f"{where} takes an input of rank {rank}; only (batch, features) inputs are "
                                "supported: flatten first")
        kind = self._kind(pname, weight)
        w = weight.detach().cpu().to(torch.float32).numpy()
        inputs = [x]
        if kind == "float32":
            inputs += [self._const(pname, "float32", w), ""]
        else:
            theta, scale = split_discrete(w, kind, pname)
            inputs += [self._const(pname, kind, theta), self._const(f"{path}.scale", "float32", scale)]
        if bias is not None:
            inputs.append(self._const(bname or f"{path}.bias", "float32", bias.detach().cpu().float().numpy()))
        else:
            inputs.append("")
        self._emit(n, op, inputs, attrs, name=path)

    def _kind(self, pname: str, weight: torch.Tensor) -> str:
        if self.discrete is not None:
            kind = self.discrete.get(pname, "float32")
            if kind not in ("float32", "ternary", "binary"):
                raise LoweringError(f"discrete[{pname!r}] is {kind!r}; expected ternary, binary or float32")
            return kind
        return detect_kind(weight.detach().cpu().float().numpy())

    def _batchnorm(self, n, m, path, x) -> None:
        if m.running_mean is None or m.running_var is None:
            raise LoweringError(f"BatchNorm at {path!r} has no running statistics (track_running_stats=False); "
                                "it cannot be folded for inference")
        var = m.running_var.detach().double().cpu().numpy()
        mean = m.running_mean.detach().double().cpu().numpy()
        gamma = m.weight.detach().double().cpu().numpy() if m.weight is not None else np.ones_like(var)
        beta = m.bias.detach().double().cpu().numpy() if m.bias is not None else np.zeros_like(var)
        mult = gamma / np.sqrt(var + m.eps)
        shift = beta - mean * mult
        scale_name = self._const(f"{path}.bn_scale", "float32", mult)
        shift_name = self._const(f"{path}.bn_shift", "float32", shift)
        self._emit(n, "channel_affine", [x, scale_name, shift_name], name=path)
        self.nodes[-1]._bn = _BN(mult, shift)  # folded into the layer before it, where exact

    def _pool(self, n, op, path, x, k, s, p, ceil_mode, dilation=1, count_include_pad=None) -> None:
        attrs = {"kernel": _pair(k), "strides": _pair(s if s is not None else k), "pads": _pair(p),
                 "ceil_mode": bool(ceil_mode)}
        if op == "maxpool2d":
            attrs["dilations"] = _pair(dilation)
        else:
            attrs["count_include_pad"] = bool(count_include_pad)
        self._emit(n, op, [x], attrs, name=path)

    def _hardtanh(self, n, where, x, lo, hi, name=None) -> None:
        if not float(lo) < float(hi):
            raise LoweringError(f"{where} clamps to [{lo}, {hi}]: min_val must be below max_val (an output that "
                                "is one constant is not supported)")
        self._emit(n, "hardtanh", [x], {"min_val": float(lo), "max_val": float(hi)}, name=name)

    def _adaptive(self, n, where, path, x) -> None:
        """From the traced shapes (the output size may be an int, a pair with None, or a traced shape)."""
        src, dst = self._shape(n.args[0]), self._shape(n)
        if len(src) == 4 and dst[2:] == src[2:]:
            self.alias[n.name] = x  # adaptive pool to the input size is the identity
            return
        if len(src) != 4 or dst[2:] != (1, 1):
            raise LoweringError(f"{where} has output size {list(dst[2:])}; only 1 (or the input's size) is "
                                "supported")
        self._emit(n, "global_avgpool", [x], name=path)

    def _reshape(self, n, where, x, path) -> None:
        src, dst = self._shape(n.args[0]), self._shape(n)
        if not dst or dst[0] != src[0]:
            raise LoweringError(f"{where}: a reshape from {list(src)} to {list(dst)} changes the batch "
                                "dimension; keep dimension 0 as the batch")
        if len(dst) == 2:
            self._emit(n, "flatten", [x], name=path)
        elif dst == src:
            self.alias[n.name] = x
        else:
            self._emit(n, "reshape", [x], {"shape": [int(d) for d in dst[1:]]}, name=path)

    def _softmax(self, n, where, op, path, x, dim) -> None:
        rank = len(self._shape(n))
        if dim is None:
            raise LoweringError(f"{where}: {op} without an explicit dim is not supported; pass dim=1 (or -1)")
        axis = dim % rank if rank else dim
        if axis == 0:
            raise LoweringError(f"{where}: {op} over the batch dimension is not supported")
        self._emit(n, op, [x], {"axis": int(axis)}, name=path)

    # -- functions and methods
    def _lower_call(self, n: fx.Node, kind: str | None, what: str) -> None:
        path = n.name
        where = f"{what} at {n.name!r}{_in_module(n)}"
        if kind is None:
            raise LoweringError(f"unsupported operation {where}")
        x = self._x(n.args[0]) if kind not in ("concat",) else None
        if n.target is F.dropout and _arg(n, 2, "training", True) and _arg(n, 1, "p", 0.5) != 0:
            raise LoweringError(f"F.dropout at {n.name!r}{_in_module(n)} has training=True, so it drops values at "
                                "random in eval mode too; pass training=self.training")
        if kind == "identity":
            self.alias[n.name] = x
        elif kind in ("relu",):
            self._emit(n, "relu", [x])
        elif kind == "relu6":
            self._emit(n, "hardtanh", [x], {"min_val": 0.0, "max_val": 6.0})
        elif kind == "leaky_relu":
            alpha = _arg(n, 1, "negative_slope", 0.01)
            self._emit(n, "leaky_relu", [x], {"alpha": float(alpha)})
        elif kind == "hardtanh":
            self._hardtanh(n, where, x, _arg(n, 1, "min_val", -1.0), _arg(n, 2, "max_val", 1.0))
        elif kind in ("flatten", "reshape"):
            self._reshape(n, where, x, path)
        elif kind == "add":
            self._add(n, what)
        elif kind == "concat":
            self._concat(n, where)
        elif kind in ("softmax", "log_softmax"):
            self._softmax(n, where, kind, path, x, _arg(n, 1, "dim", None))
        elif kind == "maxpool2d":
            k = _arg(n, 1, "kernel_size", None)
            self._pool(n, "maxpool2d", path, x, k, _arg(n, 2, "stride", None) or k, _arg(n, 3, "padding", 0),
                       _arg(n, 5, "ceil_mode", False), _arg(n, 4, "dilation", 1))
        elif kind == "avgpool2d":
            k = _arg(n, 1, "kernel_size", None)
            if _arg(n, 6, "divisor_override", None):
                raise LoweringError(f"{where} uses divisor_override, which is not supported")
            self._pool(n, "avgpool2d", path, x, k, _arg(n, 2, "stride", None) or k, _arg(n, 3, "padding", 0),
                       _arg(n, 4, "ceil_mode", False), count_include_pad=_arg(n, 5, "count_include_pad", True))
        elif kind == "adaptive_avgpool":
            self._adaptive(n, where, path, x)
        else:  # linear_fn / conv2d_fn with parameters read through get_attr
            self._functional_weighted(n, where, kind, x)

    def _add(self, n, what) -> None:
        a, b = n.args[0], n.args[1]
        if not all(isinstance(v, fx.Node) and v.name in self.alias for v in (a, b)) or n.kwargs.get("alpha", 1) != 1:
            raise LoweringError(f"unsupported operation {what} at {n.name!r}{_in_module(n)}: only the sum of "
                                "two tensors computed from the input is supported")
        if self._shape(a) != self._shape(b):
            raise LoweringError(f"unsupported broadcasting add at {n.name!r}{_in_module(n)}: shapes "
                                f"{list(self._shape(a))} and {list(self._shape(b))}")
        self._emit(n, "add", [self._x(a), self._x(b)])

    def _concat(self, n, where) -> None:
        tensors = n.args[0]
        dim = _arg(n, 1, "dim", 0)
        rank = len(self._shape(n))
        axis = dim % rank
        if axis == 0:
            raise LoweringError(f"{where} concatenates along the batch dimension, which is not supported")
        self._emit(n, "concat", [self._x(t) for t in tensors], {"axis": int(axis)})

    def _functional_weighted(self, n, where, kind, x) -> None:
        wnode = _arg(n, 1, "weight", None)
        bnode = _arg(n, 2, "bias", None)
        for role, v in (("weight", wnode), ("bias", bnode)):
            if (v is not None or role == "weight") and (not isinstance(v, fx.Node) or v.op != "get_attr"):
                raise LoweringError(f"{where}: the {role} of a functional linear/conv must be "
                                    "a module parameter or buffer")
        # constants are named after the parameters (``layer.w1``; ``fc.weight`` keeps the path ``fc``)
        pname = wnode.target
        path = pname[:-len(".weight")] if pname.endswith(".weight") else pname
        weight = self._attr(wnode.target)
        bias = self._attr(bnode.target) if bnode is not None else None
        names = {"pname": pname, "bname": bnode.target if bnode is not None else None}
        if kind == "linear_fn":
            self._weighted(n, "linear", path, weight, bias, x, {}, **names)
            return
        stride, padding = _arg(n, 3, "stride", 1), _arg(n, 4, "padding", 0)
        dilation, groups = _arg(n, 5, "dilation", 1), _arg(n, 6, "groups", 1)
        if isinstance(padding, str):
            raise LoweringError(f"{where}: string padding in F.conv2d is not supported; use numbers")
        attrs = {"strides": _pair(stride), "pads": _pair(padding), "dilations": _pair(dilation), "groups": int(groups)}
        self._weighted(n, "conv2d", path, weight, bias, x, attrs, **names)

    def _attr(self, target: str) -> torch.Tensor:
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj


_RETURN_INDICES = "has return_indices=True, which is not supported; use return_indices=False (the indices only " \
    "serve MaxUnpool)"


def _fn_name(fn) -> str:
    name, module = getattr(fn, "__name__", None), getattr(fn, "__module__", None)
    if name and module in ("torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "_operator"):
        return {"torch": "torch.", "torch.functional": "torch.", "_operator": "operator."}.get(module, "F.") + name
    return getattr(fn, "__qualname__", None) or name or repr(fn)


def _in_module(n: fx.Node) -> str:
    """" in module 'block.0'": where a traced call sits (fx's nn_module_stack), or "" at the top."""
    stack = list((n.meta.get("nn_module_stack") or {}).values())
    path = stack[-1][0] if stack and isinstance(stack[-1], tuple) else ""
    return f" in module {path!r}" if path else ""


def _arg(n: fx.Node, i: int, name: str, default):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _pair(v) -> list[int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return [int(v[0]), int(v[0])]
        return [int(v[0]), int(v[1])]
    return [int(v), int(v)]


def _conv_attrs(m: nn.Conv2d, path: str) -> dict:
    if m.padding_mode != "zeros":
        raise LoweringError(f"Conv2d at {path!r} uses padding_mode={m.padding_mode!r}; only 'zeros' is supported")
    pads = m.padding
    if isinstance(pads, str):
        if pads == "valid":
            pads = (0, 0)
        else:  # 'same': torch pads (d·(k−1))//2 left and the rest right; symmetric only when even
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            if any(t % 2 for t in total):
                raise LoweringError(f"Conv2d at {path!r} uses padding='same' with an even kernel, which pads "
                                    "asymmetrically; use explicit padding")
            pads = tuple(t // 2 for t in total)
    return {"strides": _pair(m.stride), "pads": _pair(pads), "dilations": _pair(m.dilation), "groups": int(m.groups)}


# ---------------------------------------------------------------------- discrete weights


def detect_kind(w: np.ndarray) -> str:
    """'ternary', 'binary' or 'float32': whether every row of ``w`` holds only 0 and ±s_row.

    A row of one weight always looks so: a tensor of such rows (``Linear(1, N)``, a 1×1 depthwise
    convolution) counts as discrete only when its non-zero weights share one magnitude. An
    all-zero or empty tensor carries no evidence either way: float32. E-MSA takes a weight for
    already discrete by the same rule (``ternarize.train.msa``)."""
    if w.size == 0:
        return "float32"
    rows = w.reshape(w.shape[0], -1)
    a = np.abs(rows)
    s = a.max(axis=1, keepdims=True)
    if not np.all((a == s) | (a == 0)) or not np.any(s > 0):
        return "float32"
    if rows.shape[1] == 1 and np.any((s != 0) & (s != s.max())):
        return "float32"
    return "binary" if np.all(a == s) and np.all(s > 0) else "ternary"  # an all-zero row is ternary


def split_discrete(w: np.ndarray, kind: str, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Split W into int8 codes θ and float32 per-row scales with s[:, None]·θ == W exactly.

    >>> split_discrete(np.array([[0.5, 0, -0.5]], np.float32), "ternary")
    (array([[ 1,  0, -1]], dtype=int8), array([0.5], dtype=float32))
    """
    rows = np.asarray(w, dtype=np.float32).reshape(w.shape[0], -1)
    s = np.abs(rows).max(axis=1)
    theta = np.sign(rows).astype(np.int8)
    scale = np.where(s > 0, s, 1.0).astype(np.float32)
    if kind == "binary" and np.any(theta == 0):
        r, c = (int(v[0]) for v in np.nonzero(theta == 0))
        raise LoweringError(f"weight {name!r} should be binary but holds 0 at row {r} column {c}")
    if not np.array_equal(scale[:, None] * theta, rows):
        bad = np.argwhere(scale[:, None] * theta != rows)[0]
        raise LoweringError(f"weight {name!r} is not {kind}: row {bad[0]} holds {rows[bad[0], bad[1]]!r} next to "
                            f"scale {scale[bad[0]]!r} (each row must hold only 0 and ±one value)")
    return theta.reshape(w.shape), scale


# ---------------------------------------------------------------------- BatchNorm folding


def _fold_batchnorms(graph: Graph) -> None:
    """Fold each channel_affine made from a BatchNorm into the layer before it, where exact."""
    for bn_node in [n for n in graph.nodes if getattr(n, "_bn", None) is not None]:
        bn = bn_node._bn
        x = bn_node.inputs[0]
        producer = graph.producer().get(x)
        through_pool = None
        if producer is not None and producer.op == "maxpool2d" and _single_use(graph, x):
            through_pool, x = producer, producer.inputs[0]
            producer = graph.producer().get(x)
        if producer is None or producer.op not in ("linear", "conv2d") or not _single_use(graph, x):
            continue
        if any(c and len(graph.consumers(c)) > 1 for c in producer.inputs[1:]):
            continue  # a layer called twice shares its weight: folding would change its other calls
        if through_pool is not None and np.any(bn.mult < 0):
            continue
        _fold_into(graph, producer, bn, allow_flip=through_pool is None)
        _bypass(graph, bn_node)


def _single_use(graph: Graph, name: str) -> bool:
    return name not in graph.outputs and len(graph.consumers(name)) == 1


def _fold_into(graph: Graph, layer: Node, bn: _BN, allow_flip: bool) -> None:
    """s' = s·m, b' = b·m + shift; float weights absorb m directly. Negative s' flips θ's row."""
    inputs = list(layer.inputs) + [""] * (4 - len(layer.inputs))
    _, wname, sname, bname = inputs
    w = graph.consts[wname]
    bias = graph.consts[bname].data.astype(np.float64) if bname else np.zeros(len(bn.mult))
    new_bias = bias * bn.mult + bn.shift
    if w.kind == "float32":
        shape = (-1,) + (1,) * (w.data.ndim - 1)
        w.data = (w.data.astype(np.float64) * bn.mult.reshape(shape)).astype(np.float32)
        if sname:
            raise LoweringError(f"layer {layer.name!r}: a float weight with a separate scale cannot be folded")
    else:
        scale = graph.consts[sname].data.astype(np.float64) * bn.mult
        if allow_flip and np.any(scale < 0):
            neg = scale < 0
            w.data = w.data.copy()
            w.data[neg] = -w.data[neg]
            scale = np.abs(scale)
        graph.consts[sname].data = scale.astype(np.float32)
    bname = bname or f"{layer.name}.bias"
    graph.consts[bname] = Const("float32", new_bias.astype(np.float32))
    layer.inputs = [inputs[0], wname, sname, bname]


def _bypass(graph: Graph, node: Node) -> None:
    """Remove ``node`` (one input, one output), pointing its consumers at its input."""
    src, dst = node.inputs[0], node.outputs[0]
    graph.nodes.remove(node)
    for n in graph.nodes:
        n.inputs = [src if i == dst else i for i in n.inputs]
    if dst in graph.outputs:
        # the folded value is a graph output: rename the producer's output instead
        producer = graph.producer()[src]
        producer.outputs = [dst]
        for n in graph.nodes:
            n.inputs = [dst if i == src else i for i in n.inputs]
    for name in node.inputs[1:]:
        if name and not graph.consumers(name):
            graph.consts.pop(name, None)


def _prune(graph: Graph) -> None:
    """Drop nodes and constants that no output depends on."""
    needed = set(graph.outputs)
    keep = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs):
            keep.append(node)
            needed.update(i for i in node.inputs if i)
    graph.nodes = list(reversed(keep))
    graph.consts = {k: v for k, v in graph.consts.items() if k in needed}
