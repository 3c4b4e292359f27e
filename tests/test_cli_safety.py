"""The command line on mistaken and hostile input: one line, exit code 2, no traceback, nothing
half-written; text from a file printed as it is, never as rich markup or terminal control codes."""

import errno
import hashlib
import json
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner

from ternarize import report as reporting
from ternarize import tern
from ternarize.cli import cli
from ternarize.errors import OutputError
from ternarize.graph import Const, Graph, Node, Value

EVIL = "[/bold] evil\x1b[31m"  # closes a markup tag that is not open, and colours a terminal red
WIDE = {"COLUMNS": "400", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}  # rich: no wrapping, no styles
HISTORY = [{"epoch": 1, "train_loss": 0.9, "test_loss": 0.8, "test_acc": 0.7, "seconds": 1.5, "nonzero": 0.4},
           {"epoch": 2, "train_loss": 0.6, "test_loss": 0.5, "test_acc": 0.8, "seconds": 1.4, "nonzero": 0.3}]


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def one_line_error(result, pattern: str = "") -> str:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("ternarize: "), err
    assert "Traceback" not in result.output
    assert re.search(pattern, err), err
    return err


def graph(first: str = "l1", x: str = "x", y: str = "y", metadata: dict | None = None) -> Graph:
    """20 → 16 (ternary, ReLU) → 8 (binary); the names of the first layer, input and output can be chosen."""
    rng = np.random.default_rng(0)
    consts = {"l1.w": Const("ternary", rng.choice(np.array([-1, 0, 1]), (16, 20))),
              "l1.s": Const("float32", rng.random(16)),
              "l2.w": Const("binary", rng.choice(np.array([-1, 1]), (8, 16))), "l2.s": Const("float32", rng.random(8))}
    nodes = [Node("linear", first, [x, "l1.w", "l1.s"], ["h"]), Node("relu", "r", ["h"], ["a"]),
             Node("linear", "l2", ["a", "l2.w", "l2.s"], [y])]
    return Graph([Value(x, (None, 20))], [y], nodes, consts, dict(metadata or {}))


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.tern"
    tern.write(graph(), path)
    return path


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(1).standard_normal((3, 20)).astype(np.float32))
    return path


# ---------------------------------------------------------------------- the group


def test_os_error_is_one_line_with_the_path(model, tmp_path, monkeypatch):
    locked = tmp_path / "locked"

    def refuse(*args):
        raise PermissionError(errno.EACCES, "Permission denied", str(locked))

    monkeypatch.setattr(reporting, "load", refuse)
    err = one_line_error(invoke("report", model))
    assert err == f"ternarize: Permission denied: {locked}; check the permissions or choose another path"
    result = invoke("--debug", "report", model)
    assert result.exit_code == 2 and "Traceback" in result.stderr and err in result.stderr


def test_report_out_under_a_file_is_one_line(model, tmp_path):
    one_line_error(invoke("report", model, "--out", model / "sub"), r"cannot write .*m\.tern.*folder")


@pytest.mark.skipif(not os.path.exists(os.devnull) or os.name != "posix", reason="needs /dev/null")
def test_report_out_that_is_a_device_is_one_line(model):
    one_line_error(invoke("report", model, "--out", os.devnull), r"--out /dev/null exists and is not a folder")


def test_usage_error_has_no_traceback_even_with_debug(model):
    err = one_line_error(invoke("inspect", model, "--debug"), r"No such option '--debug'")
    assert "put --debug before the command" in err
    one_line_error(invoke("--debug", "inspect", model, "--bogus"), r"--bogus.*see '\w+ inspect --help'")
    one_line_error(invoke("--debug", "run", model, "--sparse", "nope"), r"nope")


@pytest.mark.parametrize("args", [[], ["data"]])
def test_group_without_command_prints_its_help(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout.startswith("Usage:") and "Commands:" in result.stdout and result.stdout.count("\n") > 5
    assert result.stderr == ""


# ---------------------------------------------------------------------- run


def test_run_output_needs_input(model, tmp_path):
    for output in (tmp_path / "y.npy", ""):
        one_line_error(invoke("run", model, "--data", "digits", "--output", output),
                       r"--output saves the outputs of --input; give --input")
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.parametrize("target, message", [
    ("input", r"is the input file"), ("model", r"is the input file"), ("folder", r"is a folder"),
    ("fifo", r"not a regular file"), ("missing", r"does not exist"), ("empty", r"output path is empty"),
])
def test_run_refuses_an_unwritable_output_before_running(model, inputs, tmp_path, target, message):
    output = {"input": inputs, "model": model, "folder": tmp_path, "fifo": tmp_path / "fifo",
              "missing": tmp_path / "no" / "y.npy", "empty": ""}[target]
    if target == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(output)
    before = {p: p.read_bytes() for p in (model, inputs)}
    names = sorted(os.listdir(tmp_path))
    result = invoke("run", model, "--input", inputs, "--output", output)
    one_line_error(result, message)
    assert result.stdout == ""  # refused before running
    assert {p: p.read_bytes() for p in (model, inputs)} == before
    assert sorted(os.listdir(tmp_path)) == names


def test_run_saves_the_outputs_and_prints_predictions(model, inputs, tmp_path):
    result = invoke("run", model, "--input", inputs, "--output", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (3, 8) and result.stdout.split() == [str(i) for i in y.argmax(axis=1)]


def test_run_without_class_scores_saves_but_predicts_nothing(tmp_path):
    path = tmp_path / "r.tern"
    tern.write(Graph([Value("x", (None, 3, 4))], ["y"], [Node("relu", "r", ["x"], ["y"])], {}), path)
    np.save(tmp_path / "x.npy", -np.ones((2, 3, 4), np.float32))
    result = invoke("run", path, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert result.exit_code == 0 and "shape (2, 3, 4), not (N, classes)" in result.stdout, result.output
    assert np.array_equal(np.load(tmp_path / "y.npy"), np.zeros((2, 3, 4), np.float32))


def test_run_names_the_kind_of_file_it_wants(model, tmp_path):
    one_line_error(invoke("run", model, "--input", tmp_path), r"is a folder; give a \.npy file$")
    one_line_error(invoke("run", tmp_path, "--data", "digits"), r"is a folder; give a \.tern file$")
    one_line_error(invoke("export", tmp_path, "--onnx", tmp_path / "m.onnx"), r"is a folder; give a \.tern file$")


def _npy(array, **kw):
    return lambda path: np.save(path, array, **kw)


HUGE = "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 64)}"  # 25 TB promised, none there


def _header(text: str) -> bytes:
    """A .npy version 1.0 prelude around a hand-written header (no data after it)."""
    body = text.encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def _truncated(path):
    np.save(path, np.ones((100, 20), np.float32))
    path.write_bytes(path.read_bytes()[:300])


BAD_NPY = [
    ("noise", lambda p: p.write_bytes(bytes(range(256)) * 4), r"is not a \.npy array \(it does not start with the "
     r"\.npy magic\); save it with numpy\.save$"),
    ("npz", lambda p: np.savez(open(p, "wb"), x=np.ones((2, 20))), r"is not a \.npy array"),
    ("truncated", _truncated, r"promises shape \(100, 20\) of float32 \(8,000 bytes\) but 172 bytes follow; the "
     r"file is truncated or damaged$"),
    ("huge header", lambda p: p.write_bytes(_header(HUGE)), r"promises shape \(99999999999, 64\) of float32 .* but 0 "
     r"bytes follow"),
    ("junk header", lambda p: p.write_bytes(_header("{'descr': '<f4', 'shape': (")),
     r"the \.npy header cannot be read"),
    ("code in header", lambda p: p.write_bytes(_header("__import__('os').system('false')")),
     r"the \.npy header cannot be read"),
    ("complex", _npy(np.ones((2, 20), complex)), r"holds complex128; only arrays of integers, floats or bools"),
    ("str", _npy(np.full((2, 20), "a")), r"holds <U1; only arrays of integers, floats or bools"),
    ("structured", _npy(np.zeros(2, [("a", "f4"), ("b", "i4")])), r"holds .*; only arrays of integers"),
    ("object", _npy(np.full((2, 20), None, object), allow_pickle=True), r"holds object; only arrays of integers"),
    ("nan", _npy(np.full((2, 20), np.nan, np.float32)), r"contains NaN or infinite values"),
    ("inf", _npy(np.full((2, 20), -np.inf)), r"contains NaN or infinite values"),
    ("beyond float32", _npy(np.full((2, 20), 1e300)), r"beyond the float32 range"),
]


@pytest.mark.parametrize("name, make, message", BAD_NPY, ids=[b[0] for b in BAD_NPY])
def test_run_rejects_bad_inputs(model, tmp_path, name, make, message):
    path = tmp_path / "x.npy"
    make(path)
    err = one_line_error(invoke("run", model, "--input", path), message)
    assert "allow_pickle" not in err


def test_run_takes_bool_inputs_as_zeros_and_ones(model, tmp_path):
    x = np.random.default_rng(0).random((3, 20)) > 0.5
    np.save(tmp_path / "b.npy", x)
    np.save(tmp_path / "f.npy", x.astype(np.float32))
    for name in ("b", "f"):
        result = invoke("run", model, "--input", tmp_path / f"{name}.npy", "--output", tmp_path / f"{name}-y.npy")
        assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "b-y.npy"), np.load(tmp_path / "f-y.npy"))


@pytest.mark.filterwarnings("error")  # numpy's overflow RuntimeWarnings would fail the command
def test_run_warns_once_when_the_outputs_overflow(model, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.full((3, 20), 3e38, np.float32))
    result = invoke("run", model, "--input", path)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"ternarize: warning: \d+ outputs are not finite \(inputs too large\?\)\n", result.stderr)
    assert len(result.stdout.split()) == 3


# ---------------------------------------------------------------------- export


def test_export_refuses_to_overwrite_its_input(model, tmp_path):
    before = model.read_bytes()
    one_line_error(invoke("export", model, "--onnx", model), r"is the input file")
    assert model.read_bytes() == before
    one_line_error(invoke("export", model, "--onnx", tmp_path), r"is a folder")
    one_line_error(invoke("export", model, "--onnx", tmp_path / "no" / "m.onnx"), r"does not exist")
    assert sorted(os.listdir(tmp_path)) == ["m.tern"]


# ---------------------------------------------------------------------- text from the file


def test_inspect_and_report_print_file_text_literally(tmp_path):
    folder = tmp_path / "["
    folder.mkdir()
    path = folder / "b].tern"  # the path reads [/b].tern: a closing tag
    link = "[link=https://example.com]y[/link]"
    meta = {EVIL: 1, "note": "[x]", "accuracy": {"runtime": "high"}, "training": {"history": [1, 2]}}
    tern.write(graph(first=EVIL, x="x\x1b", y=link, metadata=meta), path, producer=EVIL)
    shown = EVIL.replace("\x1b", "\\x1b")
    for args in (["inspect", path], ["report", path]):
        result = invoke(*args, env=WIDE)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and shown in result.output
    out = invoke("inspect", path, env=WIDE).stdout
    assert f"{path}: .tern v1" in out and "inputs x\\x1b [None, 20]" in out and f"outputs {link}" in out
    assert f"metadata: {shown}, accuracy, note, training" in out
    tern.write(graph(), tmp_path / "[x].tern")
    assert f"{tmp_path / '[x].tern'}: .tern" in invoke("inspect", tmp_path / "[x].tern", env=WIDE).stdout


def test_paths_with_control_characters_are_printed_escaped(tmp_path):
    odd = tmp_path / "n\nname\x1b[31m"
    tern.write(graph(), odd.with_suffix(".tern"))
    wrote = invoke("export", odd.with_suffix(".tern"), "--onnx", odd.with_suffix(".onnx"), env=WIDE).stdout
    assert wrote.startswith(f"wrote {tmp_path}/n\\nname\\x1b[31m.onnx (") and wrote.count("\n") == 1
    np.save(odd.with_suffix(".npy"), np.zeros((2, 20), np.uint8))  # a uint8 input: a note names the file
    result = invoke("run", odd.with_suffix(".tern"), "--input", odd.with_suffix(".npy"))
    assert result.exit_code == 0 and result.stderr == (f"{tmp_path}/n\\nname\\x1b[31m.npy holds uint8 pixels: "
                                                       "scaled by 1/255 to [0, 1], as mnist, fashion-mnist, "
                                                       "cifar10 and uint8 .npz data are for training\n")


# ---------------------------------------------------------------------- report


def _compress_folder(tmp_path, history) -> str:
    run = tmp_path / "run"
    run.mkdir()
    tern.write(graph(), run / "model.tern")
    (run / "report.json").write_text(json.dumps({"schema": reporting.SCHEMA, "training": {"history": history},
                                                 "model": {"tern_sha256": _sha256(run / "model.tern")}}))
    return run


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("history", [[1, 2, 3], [{}], [{"epoch": "a", "loss": "x", "test_acc": None}], "nope",
                                     [dict(HISTORY[0], nonzero=None)], [dict(HISTORY[0], test_acc=True)],
                                     [dict(HISTORY[0], train_loss=10 ** 400)], [dict(HISTORY[0], epoch=1e308)],
                                     [dict(HISTORY[0], epoch=1.5)], [dict(HISTORY[0], epoch=0)],
                                     [dict(HISTORY[0], test_loss=1e308)]])
def test_report_ignores_a_malformed_training_history(tmp_path, history):
    out = tmp_path / "out"
    result = invoke("report", _compress_folder(tmp_path, history), "--out", out)
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.stderr
    assert sorted(os.listdir(out)) == ["layers.png", "report.json", "report.md"]
    assert "history" not in json.loads((out / "report.json").read_text())["training"]


def test_report_survives_an_absurdly_deep_report_json(tmp_path):
    run = _compress_folder(tmp_path, HISTORY)
    (run / "report.json").write_text("[" * 100000)
    out = tmp_path / "out"
    result = invoke("report", run, "--out", out)
    assert result.exit_code == 0 and "training.png" not in os.listdir(out), result.output


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and /dev/zero")
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_report_does_not_read_a_report_json_that_is_no_file(tmp_path, kind):
    """A FIFO would block the read for ever and /dev/zero would fill the memory: both are left unread."""
    run = _compress_folder(tmp_path, HISTORY)
    os.remove(run / "report.json")
    if kind == "fifo":
        os.mkfifo(run / "report.json")
    else:
        os.symlink("/dev/zero", run / "report.json")
    out = tmp_path / "out"
    result = invoke("report", run, "--out", out)
    assert result.exit_code == 0 and "training.png" not in os.listdir(out), result.output


def test_report_draws_a_sound_training_history(tmp_path):
    out = tmp_path / "out"
    assert invoke("report", _compress_folder(tmp_path, HISTORY), "--out", out).exit_code == 0
    assert sorted(os.listdir(out)) == ["layers.png", "report.json", "report.md", "training.png"]
    assert "## Training" in (out / "report.md").read_text()


@pytest.mark.parametrize("resumed, says", [
    ([{"after_epoch": 3, "changed": {"lam": [1e-7, 1e-6]}}],
     ["Resumed after epoch 3 with changed settings (the epochs before used the old values): lam 1e-07 → 1e-06."]),
    ([{"after_epoch": 3, "changed": {"lam": [1e-7, 1e-6]}}, {"after_epoch": 5, "changed": {"lr": [0.1, None]}}],
     ["Resumed after epoch 3 with changed settings (the epochs before used the old values): lam 1e-07 → 1e-06.",
      "Resumed after epoch 5 with changed settings (the epochs before used the old values): lr 0.1 → null."]),
    ([{"after_epoch": 3, "changed": {}}], []),
    ([{"after_epoch": "3", "changed": {"lam": [1, 2]}}, 7, None], []),
    ([{"after_epoch": 3, "changed": {"lam": [[[1]], 2], "x\n[/b]": ["a\x1b", None]}}],
     ["Resumed after epoch 3 with changed settings (the epochs before used the old values): "
      'x [/b] "a\\u001b" → null.']),
    ("nope", []), ({"after_epoch": 3, "changed": {"lam": [1, 2]}}, []),
])
def test_report_says_when_a_resumed_run_changed_settings(tmp_path, resumed, says):
    run = _compress_folder(tmp_path, HISTORY)
    (run / "report.json").write_text(json.dumps({"schema": reporting.SCHEMA,
                                                 "model": {"tern_sha256": _sha256(run / "model.tern")},
                                                 "training": {"history": HISTORY, "resumed": resumed}}))
    out = tmp_path / "out"
    assert invoke("report", run, "--out", out).exit_code == 0
    lines = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("Resumed")]
    assert lines == says


def test_report_write_leaves_nothing_when_a_file_fails(model, tmp_path, monkeypatch):
    real = reporting.atomic_write

    def failing(path, text):
        if os.path.basename(path) == "report.md":
            raise OutputError(f"cannot write {path}: No space left on device; free some disk space")
        real(path, text)

    monkeypatch.setattr(reporting, "atomic_write", failing)
    one_line_error(invoke("report", model, "--out", tmp_path / "new"), r"No space left")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    rep = reporting.load(str(model))
    with pytest.raises(OutputError):
        rep.write(str(tmp_path / "old"))
    assert os.listdir(tmp_path / "old") == []


def test_report_out_refuses_to_overwrite_without_force(model, tmp_path):
    out = tmp_path / "out"
    assert invoke("report", model, "--out", out).exit_code == 0
    (out / "report.md").write_text("mine")
    one_line_error(invoke("report", model, "--out", out),
                   r"the folder .*out already holds layers.png, report.json, report.md; "
                   r"pass --force to overwrite them$")
    assert (out / "report.md").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text("{}")
    one_line_error(invoke("report", model, "--out", other), r"already holds report.json; pass --force to overwrite it$")
    assert sorted(os.listdir(other)) == ["report.json"]
    assert invoke("report", model, "--out", out, "--force").exit_code == 0
    assert (out / "report.md").read_text() != "mine"
    one_line_error(invoke("report", model, "--out", ""), r"--out is empty")
    one_line_error(invoke("report", model, "--force"), r"--force replaces the report files in --out")
    mixed = tmp_path / "mixed"  # old report files and a folder where report.md goes
    (mixed / "report.md").mkdir(parents=True)
    (mixed / "report.json").write_text("old")
    one_line_error(invoke("report", model, "--out", mixed, "--force"), r"report.md is a folder")
    assert (mixed / "report.json").read_text() == "old"


def test_report_out_refuses_another_models_compress_folder(model, tmp_path):
    run = _compress_folder(tmp_path, HISTORY)
    before = sorted(os.listdir(run))
    for force in ([], ["--force"]):
        one_line_error(invoke("report", model, "--out", run, *force),
                       r"the folder .*run holds a model.tern that is not .*; a report there would sit beside another "
                       r"model; choose another --out$")
    assert sorted(os.listdir(run)) == before
    for same in (run, run / "model.tern"):  # the folder's own model: its report may be rewritten
        assert invoke("report", same, "--out", run, "--force").exit_code == 0
    assert "report.md" in os.listdir(run)


def test_report_md_shows_the_settings_and_the_validation_accuracy(tmp_path):
    run = _compress_folder(tmp_path, [dict(h, val_acc=h["test_acc"] - 0.05) for h in HISTORY])
    saved = json.loads((run / "report.json").read_text())
    saved["training"]["settings"] = {"lam": 1e-5, "epochs": 2, "note": "a|b\nc", "keep_float": ["fc"]}
    (run / "report.json").write_text(json.dumps(saved))
    out = tmp_path / "out"
    assert invoke("report", run, "--out", out).exit_code == 0
    md = (out / "report.md").read_text()
    assert ('| setting | value |\n|---|---|\n| epochs | 2 |\n| keep_float | \\["fc"\\] |\n| lam | 1e-05 |\n'
            '| note | "a\\|b\\\\nc" |\n') in md
    assert ("| epoch | loss | test acc | val acc | non-zero | seconds |\n|---|---|---|---|---|---|\n"
            "| 1 | 0.9000 | 70.00% | 65.00% | 40.00% | 1.5 |\n") in md
    saved["training"]["history"] = HISTORY  # no validation split: no column
    (run / "report.json").write_text(json.dumps(saved))
    assert invoke("report", run, "--out", out, "--force").exit_code == 0
    assert "| epoch | loss | test acc | non-zero | seconds |\n" in (out / "report.md").read_text()


def test_report_takes_the_neighbours_only_of_model_tern(tmp_path):
    run = _compress_folder(tmp_path, HISTORY)
    tern.write(graph(), run / "other.tern")
    assert invoke("export", run / "model.tern", "--onnx", run / "model.onnx").exit_code == 0
    size = os.path.getsize(run / "model.onnx")
    alone = json.loads(invoke("report", run / "other.tern", "--json").stdout)
    assert alone["totals"]["onnx_bytes"] is None and "history" not in alone["training"]
    for path in (run, run / "model.tern"):
        result = invoke("report", path, "--json")
        got = json.loads(result.stdout)
        assert got["totals"]["onnx_bytes"] == size and got["training"]["history"] == HISTORY
        assert got["model"]["tern_sha256"] == _sha256(run / "model.tern") and result.stderr == ""
    # written again in another form (as the README shows): still exported from this model.tern
    assert invoke("export", run / "model.tern", "--onnx", run / "model.onnx", "--compat", "--force").exit_code == 0
    result = invoke("report", run, "--json")
    assert json.loads(result.stdout)["totals"]["onnx_bytes"] == os.path.getsize(run / "model.onnx") != size
    assert result.stderr == ""


def test_report_leaves_out_neighbours_written_for_another_model(tmp_path):
    run = _compress_folder(tmp_path, HISTORY)
    other = graph(metadata={"note": "another"})
    onnx_path = run / "model.onnx"
    for content, why in [(b"x" * 1234, "cannot be read as an ONNX model"),
                         (None, "was not exported from this model.tern (its metadata differ)")]:
        if content is None:
            tern.write(other, tmp_path / "other.tern")
            assert invoke("export", tmp_path / "other.tern", "--onnx", onnx_path, "--force").exit_code == 0
        else:
            onnx_path.write_bytes(content)
        result = invoke("report", run, "--json")
        got = json.loads(result.stdout)
        assert got["totals"]["onnx_bytes"] is None and got["training"]["history"] == HISTORY
        assert result.stderr == f"ternarize: note: {onnx_path} {why}; its size is left out\n"
    tern.write(other, run / "model.tern")  # another model over the folder's own: the ONNX file is its now
    result = invoke("report", run, "--json")
    got = json.loads(result.stdout)
    assert got["totals"]["onnx_bytes"] == os.path.getsize(onnx_path) and "history" not in got["training"]
    assert result.exit_code == 0 and result.stderr == (f"ternarize: note: {run / 'report.json'} was written for "
                                                       "another model.tern; its training history is left out\n")
    # a refusal stays one line: the notes come after the checks
    one_line_error(invoke("report", run, "--out", run), r"already holds .*; pass --force")


def test_an_unreadable_onnx_file_is_left_out_with_a_note(tmp_path, monkeypatch):
    import onnx

    run = _compress_folder(tmp_path, HISTORY)
    assert invoke("export", run / "model.tern", "--onnx", run / "model.onnx").exit_code == 0

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(onnx, "load", refuse)
    result = invoke("report", run, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["totals"]["onnx_bytes"] is None
    assert result.stderr == (f"ternarize: note: {run / 'model.onnx'} cannot be read as an ONNX model; "
                             "its size is left out\n")


def test_a_report_json_from_before_the_hash_names_its_model_by_size(tmp_path):
    run = _compress_folder(tmp_path, HISTORY)
    size = os.path.getsize(run / "model.tern")
    for tern_bytes, kept in [(size, True), (size + 1, False), (True, False), ("x", False)]:
        (run / "report.json").write_text(json.dumps({"schema": reporting.SCHEMA, "training": {"history": HISTORY},
                                                     "totals": {"tern_bytes": tern_bytes}}))
        result = invoke("report", run, "--json")
        assert ("history" in json.loads(result.stdout)["training"]) == kept, tern_bytes
        assert len(result.stderr.splitlines()) == (0 if kept else 1)
    saved = {"schema": reporting.SCHEMA, "training": {"history": HISTORY},  # the hash decides, not the size
             "model": {"tern_sha256": _sha256(run / "model.tern").upper()}, "totals": {"tern_bytes": size + 1}}
    (run / "report.json").write_text(json.dumps(saved))
    assert "history" in json.loads(invoke("report", run, "--json").stdout)["training"]


def test_report_md_shows_text_from_the_file_as_it_is(tmp_path):
    evil = "![x](http://evil.example/t.png) <img src=x> `a` *b*"
    run = _compress_folder(tmp_path, HISTORY)
    tern.write(graph(first=evil, metadata={"name": evil, "dataset": evil}), run / "model.tern")
    out = tmp_path / "out"
    assert invoke("report", run, "--out", out).exit_code == 0
    md = (out / "report.md").read_text()
    assert not re.search(r"(?<!\\)(!\[x|<img|`a)", md)  # no unescaped image, HTML or code
    escaped = "\\!\\[x\\](http://evil.example/t.png) \\<img src=x\\> \\`a\\` \\*b\\*"
    assert md.startswith(f"# Compression report: {escaped}\n") and f"| {escaped} | 16x20 |" in md

