"""Reports: per-layer size, sparsity and cost of a compressed model, as JSON, Markdown, a terminal
table and PNG plots (numpy, plus matplotlib for plots and rich for the terminal, both imported lazily).

The numbers come from the ``.tern`` file itself (so they are consistent with it by construction),
the ONNX file's size when there is one, the reference runtime's resident weights and activation
plan, and what the compressing run stored in the file's metadata (accuracy, training history).
The JSON fields are documented in ``formats/REPORT.md``.

Example::

    rep = build("out/model.tern", onnx_path="out/model.onnx")
    print(rep.to_markdown())
    rep.write("out")          # report.json, report.md, layers.png (and training.png when the
                              # history is known: build(training=...) or load("out"))
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field

import numpy as np

from . import pack, tern
from ._io import atomic_path, atomic_write, describe, input_problem, missing_folders, remove_empty
from ._text import byte_size, one_line, printable
from ._version import __version__
from .errors import ConfigError, OutputError
from .graph import ConstSpec, Graph

SCHEMA = "ternarize-report/1"
_WEIGHTED = ("linear", "conv2d")


@dataclass
class Report:
    layers: list[dict]
    totals: dict
    accuracy: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    # not in the JSON: the .tern file's metadata, and the plots beside a model.tern that belong to it
    # but that a report cannot draw again (compress's weights.png needs the float weights)
    metadata: dict = field(default_factory=dict, repr=False)
    kept: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "producer": f"ternarize {__version__}", "model": self.model,
                "layers": self.layers, "totals": self.totals, "accuracy": self.accuracy,
                "training": self.training, "plots": self.plots}

    # -- Markdown
    def to_markdown(self) -> str:
        t, m = self.totals, self.model
        lines = [f"# Compression report: {_md(m.get('name', 'model'))}", ""]
        if m:
            lines += [", ".join(f"**{k}**: {_md(v)}" for k, v in m.items() if k in ("dataset", "mode", "method")), ""]
        lines += ["| | |", "|---|---|"]
        lines += [f"| {label} | {value} |" for label, value in _total_rows(t, self.accuracy)]
        lines += ["", "## Layers", "", "| " + " | ".join(h for h, _ in _LAYER_COLUMNS) + " |",
                  "|" + "---|" * len(_LAYER_COLUMNS)]
        lines += ["| " + " | ".join(_md(fmt(row)) for _, fmt in _LAYER_COLUMNS) + " |" for row in self.layers]
        if self.plots:
            lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in self.plots]
        hist = self.training.get("history") or []
        settings = self.training.get("settings")
        if hist or isinstance(settings, dict) and settings:
            lines += ["", "## Training"]
        if isinstance(settings, dict) and settings:
            lines += ["", "| setting | value |", "|---|---|"]
            lines += [f"| {_md(key, 80)} | {_md(json.dumps(value, sort_keys=True), 80)} |"
                      for key, value in sorted(settings.items())]
        if hist:
            val = all(_number(h.get("val_acc")) for h in hist)  # a validation split was held out
            lines += ["", f"| epoch | loss | test acc |{' val acc |' if val else ''} non-zero | seconds |",
                      "|---|---|---|---|---|" + ("---|" if val else "")]
            lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {_pct(h.get('test_acc'))} | "
                      + (f"{_pct(h['val_acc'])} | " if val else "")
                      + f"{_pct(h.get('nonzero'))} | {h.get('seconds', 0):.1f} |" for h in hist]
        for epoch, what in _resume_changes(self.training):
            lines += ["", f"Resumed after epoch {epoch} with changed settings (the epochs before used "
                      f"the old values): {what}."]
        return "\n".join(lines) + "\n"

    # -- terminal
    def rich_tables(self):
        """(layers table, totals table) as rich Tables. Cells are Text (names come from the file: never
        read as markup) with control characters escaped."""
        from rich.table import Table
        from rich.text import Text

        layers = Table(title="layers", show_lines=False)
        for header, _ in _LAYER_COLUMNS:
            layers.add_column(header, justify="left" if header in ("layer", "shape", "kind", "encoding") else "right")
        for row in self.layers:
            layers.add_row(*(Text(printable(fmt(row))) for _, fmt in _LAYER_COLUMNS))
        totals = Table(title="totals", show_header=False)
        totals.add_column("what")
        totals.add_column("value", justify="right")
        for label, value in _total_rows(self.totals, self.accuracy):
            totals.add_row(Text(label), Text(value))
        return layers, totals

    def summary(self) -> str:
        t = self.totals
        text = (f"{_size(t['tern_bytes'])} .tern ({_ratio(t['compression_tern'])} than float32), "
                f"{_pct(t['nonzero_fraction'])} non-zero discrete weights, "
                f"{_bits(t['bits_per_discrete_weight'])} bits/weight "
                f"(entropy {_bits(t['entropy_bits_per_discrete_weight'])})")
        if self.accuracy.get("runtime") is not None:
            text += f", accuracy {_pct(self.accuracy['runtime'])}"
            if self.accuracy.get("float") is not None:
                text += f" (float {_pct(self.accuracy['float'])})"
        return text

    # -- files
    def file_names(self, float_weights: dict | None = None) -> list[str]:
        """The names of the files :meth:`write` writes into its folder."""
        plots = [name for name, drawn in (("layers.png", self.layers), ("training.png", self.training.get("history")),
                                          ("weights.png", float_weights)) if drawn]
        return plots + ["report.json", "report.md"]

    def write(self, folder: str, float_weights: dict | None = None, kept: tuple[str, ...] = ()) -> list[str]:
        """Write report.json, report.md and the plots into ``folder``; return the paths. ``kept``: plots
        already in ``folder`` that this call does not draw but the report lists (a compress folder's
        weights.png, which needs the float weights, when its report is written again). When a file
        cannot be written, the files this call wrote (and the folders it made) are removed and the
        error is raised."""
        created = missing_folders(folder)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise OutputError(describe(e, folder)) from e
        written: list[str] = []
        try:
            drawn = plot(self, folder, float_weights, written)
            self.plots = drawn + [name for name in kept
                                  if name not in drawn and os.path.isfile(os.path.join(folder, name))]
            for name, text in (("report.json", json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"),
                               ("report.md", self.to_markdown())):
                atomic_write(os.path.join(folder, name), text)
                written.append(name)
        except BaseException:
            for name in written:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
            remove_empty(created)
            raise
        return [os.path.join(folder, name) for name in written]


def build(tern_path: str, onnx_path: str | None = None, runtime=None, training: dict | None = None) -> Report:
    """Build the report of ``tern_path``; ``runtime`` (a loaded Runtime) saves loading it again;
    ``training`` (settings and per-epoch history) replaces the summary kept in the file's metadata."""
    tf = tern.load(tern_path)
    graph_json = tf.header["graph"]
    entries = {e.name: e for e in tf.tensors}
    shapes = _activation_shapes(tf)
    weighted = [node for node in graph_json["nodes"] if node["op"] in _WEIGHTED]
    layers = [_layer_row(tf, entries, node, shapes) for node in weighted]
    if runtime is None:
        from .runtime import Runtime

        runtime = Runtime.load(tern_path)
    totals = _totals(tf, layers, [node["inputs"][1] for node in weighted], onnx_path, runtime)
    meta = tf.metadata
    model = {k: meta[k] for k in ("name", "dataset", "mode", "method", "source", "source_sha256", "source_bytes")
             if k in meta}
    model["file"] = os.path.basename(tern_path)
    model["tern_sha256"] = tf.sha256
    half = meta.get("float16")  # from the file: taken only in the shape compress writes it
    if isinstance(half, dict) and isinstance(half.get("stored"), bool):
        numbers_ = {k: half.get(k) if _number(half.get(k)) else None for k in ("class_changed", "max_change")}
        model["float16"] = {"stored": half["stored"], **numbers_}
    accuracy = meta.get("accuracy")
    accuracy = {k: v for k, v in accuracy.items() if _number(v)} if isinstance(accuracy, dict) else {}
    return Report(layers, totals, accuracy, _usable_training(training or meta.get("training")), model,
                  metadata=meta)


def load(path: str, notes: list | None = None) -> Report:
    """A report for ``path``: a .tern file, or a folder holding model.tern. A model.tern (given or
    found) takes what is beside it when it belongs to this very file: the training history of the
    report.json that names it (``model.tern_sha256``; a report.json written before that field names
    it by its size, ``totals.tern_bytes``), and the size of a model.onnx exported from it (its
    metadata are the .tern file's, see :func:`ternarize.onnx.metadata_props`). A .tern file of
    another name is reported alone. ``notes``, a list, receives a sentence for each file beside
    model.tern that is left out because it belongs to another model."""
    if os.path.isdir(path):
        tern_path = os.path.join(path, "model.tern")
        if not os.path.isfile(tern_path):
            raise ConfigError(f"{path} holds no model.tern; give a .tern file or a folder made by compress")
    else:
        tern_path = path
    problem = input_problem(tern_path)
    if problem:
        raise ConfigError(f"{tern_path} {problem}")
    rep = build(tern_path)
    if os.path.basename(tern_path) != "model.tern":
        return rep
    notes = [] if notes is None else notes
    folder = os.path.dirname(os.path.abspath(tern_path))
    saved = _saved_report(folder)
    if saved is not None and not _names_model(saved, rep.model["tern_sha256"], rep.totals["tern_bytes"]):
        notes.append(f"{os.path.join(folder, 'report.json')} was written for another model.tern; "
                     "its training history is left out")
    elif saved is not None:
        training = _usable_training(saved.get("training"))
        if training.get("history"):
            rep.training = training
        plots = saved.get("plots")
        rep.kept = tuple(p for p in ("weights.png",) if isinstance(plots, list) and p in plots)
    onnx_path = os.path.join(folder, "model.onnx")
    if not input_problem(onnx_path):
        why = _onnx_mismatch(onnx_path, rep)
        if why:
            notes.append(f"{onnx_path} {why}; its size is left out")
        else:
            rep.totals.update(_onnx_totals(rep.totals["float32_bytes"], onnx_path))
    return rep


def _saved_report(folder: str) -> dict | None:
    """The report.json beside a model.tern (of this schema), or None when there is none or it is
    unreadable (see :func:`_usable_training` for its history)."""
    path = os.path.join(folder, "report.json")
    try:
        if input_problem(path) or os.path.getsize(path) > MAX_SAVED_BYTES:  # a FIFO would block, a device not end
            return None
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return saved if isinstance(saved, dict) and saved.get("schema") == SCHEMA else None
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly deep JSON
        return None


def _names_model(saved: dict, sha256: str, size: int) -> bool:
    """Whether a saved report was written for the .tern file of this SHA-256 (or, written before
    that field, of this size)."""
    recorded = _field(saved, "model", "tern_sha256")
    if recorded is not None:
        return str(recorded).lower() == sha256
    recorded = _field(saved, "totals", "tern_bytes")
    return isinstance(recorded, int) and not isinstance(recorded, bool) and recorded == size


def _onnx_mismatch(onnx_path: str, rep: Report) -> str | None:
    """None when the ONNX file was exported from the reported .tern file (its metadata_props are
    the ones the exporter writes for it, the producer aside), else why not."""
    from .errors import ExportError
    from .onnx import metadata_props, read_metadata_props

    try:
        have = read_metadata_props(onnx_path)
    except ExportError:
        return "cannot be read as an ONNX model"
    want = metadata_props(rep.metadata, rep.totals["nonzero_fraction"])
    have.pop("producer", None)
    want.pop("producer", None)
    return None if have == want else "was not exported from this model.tern (its metadata differ)"


def _field(obj: dict, section: str, key: str):
    part = obj.get(section)
    return part.get(key) if isinstance(part, dict) else None


_EPOCH_NUMBERS = ("epoch", "train_loss", "test_loss", "test_acc")  # what the plots and Markdown need
_EPOCH_OPTIONAL = ("nonzero", "seconds")


def _resume_changes(training: dict) -> list:
    """[(epoch, "lam 1e-07 → 1e-06, …"), …]: each resume that changed settings steering the updates
    (``training["resumed"]``, see ``TrainResult.resumed``); malformed entries are left out."""
    events = training.get("resumed")
    out = []
    for event in events if isinstance(events, list) else []:
        if not isinstance(event, dict) or not isinstance(event.get("changed"), dict):
            continue
        epoch = event.get("after_epoch")
        scalar = (str, int, float, type(None))
        pairs = [(k, v) for k, v in event["changed"].items()
                 if isinstance(v, list) and len(v) == 2 and all(isinstance(x, scalar) for x in v)]
        if isinstance(epoch, int) and not isinstance(epoch, bool) and pairs:
            out.append((epoch, ", ".join(one_line(f"{k} {json.dumps(old)} → {json.dumps(new)}")
                                         for k, (old, new) in pairs)))
    return out


def _usable_training(training) -> dict:
    """``training`` as a dict whose history, if any, the plots and Markdown can draw: a history that is
    not a list of objects with an integer epoch from 1 to ``MAX_EPOCH`` and numbers within ±``MAX_VALUE``
    for train_loss, test_loss and test_acc (and nonzero and seconds where present) is dropped, as if
    absent (a hand-edited report.json may hold anything)."""
    if not isinstance(training, dict):
        return {}
    hist = training.get("history")
    if hist is None or (isinstance(hist, list) and all(
            isinstance(h, dict) and all(_number(h.get(k)) for k in _EPOCH_NUMBERS)
            and all(_number(h[k]) for k in _EPOCH_OPTIONAL if k in h)
            and h["epoch"] == int(h["epoch"]) and 1 <= h["epoch"] <= MAX_EPOCH for h in hist)):
        return dict(training)
    return {k: v for k, v in training.items() if k != "history"}


MAX_EPOCH, MAX_VALUE = 10 ** 6, 1e30  # bounds of a drawable history
MAX_SAVED_BYTES = 1 << 30  # a larger report.json is not one compress wrote: it is left unread


def _number(v) -> bool:
    """A real number within ±MAX_VALUE (not a bool, NaN or infinity; a huge int is not either)."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v) and abs(v) <= MAX_VALUE
    except OverflowError:
        return False


# ---------------------------------------------------------------------- rows


def _activation_shapes(tf) -> dict:
    """Every activation's shape, from the header alone (no tensor is decoded)."""
    consts = {e.name: ConstSpec(e.kind, e.shape) for e in tf.tensors}
    return Graph.from_json(json.loads(json.dumps(tf.header["graph"])), consts).validate()


def _layer_row(tf, entries, node, shapes) -> dict:
    ins = list(node["inputs"]) + [""] * (4 - len(node["inputs"]))
    w = entries[ins[1]]
    codes = tf.decode(w.name) if w.kind != "float32" else None
    count = w.count
    out = shapes[node["outputs"][0]]
    spatial = math.prod(out[2:]) if len(out) > 2 else 1
    nbytes = sum(entries[n].nbytes for n in ins[1:] if n)
    row = {"name": node["name"], "op": node["op"], "shape": list(w.shape), "kind": w.kind, "encoding": w.encoding,
           "weights": count, "weight_bytes": w.nbytes, "bytes": nbytes, "bits_per_weight": 8 * w.nbytes / count,
           "macs": count * spatial, "outputs": math.prod(out[1:])}
    if codes is None:
        row.update(nonzero=count, nonzero_fraction=1.0, plus_fraction=None, minus_fraction=None,
                   entropy_bits=None, add_only_macs=0, multiplies=count * spatial)
        return row
    plus, minus = int(np.count_nonzero(codes > 0)), int(np.count_nonzero(codes < 0))
    row.update(nonzero=plus + minus, nonzero_fraction=(plus + minus) / count, plus_fraction=plus / count,
               minus_fraction=minus / count, entropy_bits=pack.entropy_bits(codes),
               add_only_macs=(plus + minus) * spatial, multiplies=w.shape[0] * spatial)
    return row


def _onnx_totals(float32_bytes: int, onnx_path: str | None) -> dict:
    onnx_bytes = os.path.getsize(onnx_path) if onnx_path else None
    return {"onnx_bytes": onnx_bytes, "compression_onnx": float32_bytes / onnx_bytes if onnx_bytes else None}


def _totals(tf, layers, weight_names, onnx_path, runtime) -> dict:
    """The totals of formats/REPORT.md. ``weight_names``: each layer's weight tensor. A tensor that
    several layers share (a module called twice) counts once in the sums over tensors, and once
    per call in the sums over layers (MACs)."""
    tensors = dict(zip(weight_names, layers))  # one row per weight tensor
    discrete = [r for r in tensors.values() if r["kind"] != "float32"]
    n_disc = sum(r["weights"] for r in discrete)
    disc_bytes = sum(r["weight_bytes"] for r in discrete)
    float32_bytes = 4 * sum(e.count for e in tf.tensors)
    weight_bytes, act_bytes = int(runtime.weight_bytes), int(runtime.activation_bytes(1))
    return {
        "layers": len(layers), "discrete_layers": sum(r["kind"] != "float32" for r in layers),
        "discrete_weights": n_disc,
        "float_weights": sum(e.count for e in tf.tensors) - n_disc,
        "nonzero_fraction": sum(r["nonzero"] for r in discrete) / n_disc if n_disc else None,
        "bits_per_discrete_weight": 8 * disc_bytes / n_disc if n_disc else None,
        "entropy_bits_per_discrete_weight": sum(r["entropy_bits"] * r["weights"] for r in discrete) / n_disc
        if n_disc else None,
        "float32_bytes": float32_bytes, "tern_bytes": tf.size,
        **_onnx_totals(float32_bytes, onnx_path),
        "compression_tern": float32_bytes / tf.size,
        "header_bytes": tf.data_start, "tensor_bytes": sum(e.nbytes for e in tf.tensors),
        "float_bytes": sum(e.nbytes for e in tf.tensors if e.kind == "float32"),
        "float_encodings": sorted({e.encoding for e in tf.tensors if e.kind == "float32"}),
        "macs": sum(r["macs"] for r in layers), "add_only_macs": sum(r["add_only_macs"] for r in layers),
        "multiplies": sum(r["multiplies"] for r in layers),
        "runtime_weight_bytes": weight_bytes, "runtime_activation_bytes": act_bytes,
        "peak_ram_bytes": weight_bytes + act_bytes,
    }


# ---------------------------------------------------------------------- formatting


_MARKUP = re.compile(r"([\\`*\[\]<>|!&])")  # what could make a link, an image, HTML or a new cell


def _md(text, limit: int | None = None) -> str:
    """Text from the file or a report.json as Markdown that shows it as it is: one line, control
    characters escaped, cut at ``limit`` characters, and a backslash before each character that
    could start markup."""
    text = one_line(text)
    if limit is not None and len(text) > limit:
        text = text[:limit - 1] + "…"
    return _MARKUP.sub(r"\\\1", text)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _size(n) -> str:
    return "-" if n is None else byte_size(n)


def _count(n) -> str:
    return "-" if n is None else f"{n:,}"


def _ratio(r: float) -> str:
    """float32 size ÷ file size in words: "30.6x smaller", or "1.7x larger" for a file larger
    than the float32 weights (a tiny model, whose header outweighs them)."""
    return f"{r:.1f}x smaller" if r >= 1 else f"{1 / r:.1f}x larger"


def _bits(v) -> str:
    return "-" if v is None else f"{v:.3f}"


_LAYER_COLUMNS = [
    ("layer", lambda r: r["name"]),
    ("shape", lambda r: "x".join(map(str, r["shape"]))),
    ("kind", lambda r: r["kind"]),
    ("encoding", lambda r: r["encoding"]),
    ("non-zero", lambda r: _pct(r["nonzero_fraction"])),
    ("+1/-1", lambda r: "-" if r["plus_fraction"] is None else
     f"{r['plus_fraction'] / max(1e-12, r['plus_fraction'] + r['minus_fraction']):.2f}/"
     f"{r['minus_fraction'] / max(1e-12, r['plus_fraction'] + r['minus_fraction']):.2f}"),
    ("bits/w", lambda r: _bits(r["bits_per_weight"])),
    ("entropy", lambda r: _bits(r["entropy_bits"])),
    ("bytes", lambda r: _size(r["bytes"])),
    ("MACs", lambda r: _count(r["macs"])),
    ("add-only", lambda r: _count(r["add_only_macs"])),
]


def _total_rows(t: dict, acc: dict) -> list[tuple[str, str]]:
    rows = [
        ("float32 size", _size(t["float32_bytes"])),
        (".tern size", f"{_size(t['tern_bytes'])} ({_ratio(t['compression_tern'])})"),
        ("ONNX size", "-" if t["onnx_bytes"] is None else
         f"{_size(t['onnx_bytes'])} ({_ratio(t['compression_onnx'])})"),
        ("discrete weights", f"{_count(t['discrete_weights'])} in {t['discrete_layers']} layers"),
        ("float values", f"{_count(t['float_weights'])} in {_size(t['float_bytes'])}"
                         + (f" ({', '.join(t['float_encodings'])})" if t["float_encodings"] else "")),
        ("non-zero", _pct(t["nonzero_fraction"])),
        ("bits per discrete weight", f"{_bits(t['bits_per_discrete_weight'])} "
                                     f"(entropy bound {_bits(t['entropy_bits_per_discrete_weight'])})"),
        ("MACs / add-only", f"{_count(t['macs'])} / {_count(t['add_only_macs'])}"),
        ("peak RAM (batch 1)", f"{_size(t['peak_ram_bytes'])} = {_size(t['runtime_weight_bytes'])} weights "
                               f"+ {_size(t['runtime_activation_bytes'])} activations"),
    ]
    for key, label in (("float", "float accuracy"), ("trained", "compressed accuracy (torch)"),
                       ("runtime", "compressed accuracy (runtime)"), ("onnx", "compressed accuracy (onnxruntime)")):
        if acc.get(key) is not None:
            rows.append((label, _pct(acc[key])))
    return rows


# ---------------------------------------------------------------------- plots


def plot(report: Report, folder: str, float_weights: dict | None = None, written: list | None = None) -> list[str]:
    """Draw the PNG plots into ``folder``; return their file names (relative to ``folder``).
    ``written``, a list, receives each name as soon as its file is written."""
    import matplotlib

    matplotlib.use("Agg")
    written = [] if written is None else written
    start = len(written)
    if report.layers:
        written.append(_plot_layers(report, folder))
    if report.training.get("history"):
        written.append(_plot_training(report, folder))
    if float_weights:
        written.append(_plot_weights(report, folder, float_weights))
    return written[start:]


def _save(fig, folder: str, name: str) -> str:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(os.path.join(folder, name), suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return name


def _plot_layers(report: Report, folder: str) -> str:
    import matplotlib.pyplot as plt

    rows = report.layers
    x = np.arange(len(rows))
    labels = [r["name"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(6, 0.7 * len(rows) + 3), 6), sharex=True)
    plus = [100 * (r["plus_fraction"] or 0) for r in rows]
    minus = [100 * (r["minus_fraction"] or 0) for r in rows]
    floats = [100 if r["kind"] == "float32" else 0 for r in rows]
    a.bar(x, plus, color="#4c72b0", label="+1")
    a.bar(x, minus, bottom=plus, color="#dd8452", label="-1")
    if any(floats):
        a.bar(x, floats, color="#bbbbbb", label="float (kept)")
    a.set_ylabel("non-zero weights (%)")
    a.set_title("Sparsity and storage per layer")
    a.set_ylim(0, 105 if any(floats) else max(5, 1.25 * max(p + m for p, m in zip(plus, minus))))
    a.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    a.grid(axis="y", alpha=0.3)
    b.bar(x - 0.2, [r["bits_per_weight"] if r["kind"] != "float32" else 0 for r in rows], width=0.4,
          color="#55a868", label="bits per weight (file)")
    b.bar(x + 0.2, [r["entropy_bits"] or 0 for r in rows], width=0.4, color="#8172b3", label="entropy bound")
    b.axhline(2.0, color="k", lw=0.8, ls="--", label="dense 2-bit")
    b.set_ylim(0, max(2.2, 1.1 * max(r["bits_per_weight"] if r["kind"] != "float32" else 0 for r in rows)))
    b.set_ylabel("bits per weight")
    b.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    b.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    b.grid(axis="y", alpha=0.3)
    return _save(fig, folder, "layers.png")


def _plot_training(report: Report, folder: str) -> str:
    import matplotlib.pyplot as plt

    hist = report.training["history"]
    ep = [h["epoch"] for h in hist]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(ep, [100 * h["test_acc"] for h in hist], "o-", label="compressed")
    if report.accuracy.get("float") is not None:
        axes[0].axhline(100 * report.accuracy["float"], color="k", ls="--", lw=0.8, label="float model")
    axes[0].set_title("test accuracy (%)")
    axes[0].legend(fontsize=8)
    axes[1].plot(ep, [h["train_loss"] for h in hist], "o-", label="train")
    axes[1].plot(ep, [h["test_loss"] for h in hist], "s-", label="test")
    axes[1].set_title("loss")
    axes[1].legend(fontsize=8)
    if all("nonzero" in h for h in hist):
        axes[2].plot(ep, [100 * h["nonzero"] for h in hist], "o-", color="#dd8452")
    axes[2].set_title("non-zero discrete weights (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, folder, "training.png")


def _plot_weights(report: Report, folder: str, float_weights: dict) -> str:
    """Histograms of the float weights of each discrete layer, with the TWN thresholds ±0.7·mean|W|
    marked and the final non-zero fraction of that layer in the title."""
    import matplotlib.pyplot as plt

    names = list(float_weights)[:8]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    final = {r["name"]: r for r in report.layers}
    for ax, name in zip(axes.ravel(), names):
        w = np.asarray(float_weights[name], dtype=np.float32).ravel()
        delta = 0.7 * float(np.abs(w).mean())
        ax.hist(w, bins=80, color="#4c72b0", alpha=0.85)
        for d in (-delta, delta):
            ax.axvline(d, color="#c44e52", ls="--", lw=1)
        layer = final.get(name.rsplit(".", 1)[0])
        nz = f", {_pct(layer['nonzero_fraction'])} non-zero now" if layer else ""
        ax.set_title(f"{name}{nz}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle("float weights before compression; dashed: TWN threshold ±0.7·mean|W|", fontsize=9)
    fig.tight_layout()
    return _save(fig, folder, "weights.png")
