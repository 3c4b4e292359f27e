"""The command line: help everywhere, one-line errors with exit code 2, the bad-input table."""

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from ternarize import __version__, zoo
from ternarize.cli import cli

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "formats", "golden")
ROOT_GOLDEN = Path(GOLDEN)


def invoke(*args, env=None):
    runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


def test_every_command_has_help_text_with_an_example():
    for path, cmd in _commands(cli):
        assert cmd.help and len(cmd.help.strip()) > 20, f"{' '.join(path)} has no help text"
        if not isinstance(cmd, click.Group):
            assert "Example:" in cmd.help, f"{' '.join(path)} help has no example"
        result = invoke(*path, "-h")
        assert result.exit_code == 0 and "Usage:" in result.output
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden and param.name not in ("help",):
                assert param.help or param.name in ("batch_size", "seed"), f"{' '.join(path)} --{param.name}"


def test_version_and_short_help():
    assert __version__ in invoke("--version").output
    assert "Usage:" in invoke("-h").output


def test_module_entry_point_and_console_script():
    proc = subprocess.run([sys.executable, "-m", "ternarize", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ternarize", "compress", "nope.pt", "--data", "digits"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ternarize", "--debug", "compress", "nope.pt", "--data", "digits"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_bad_option_is_one_line():
    result = invoke("compress", "m.pt", "--data", "digits", "--mode", "quaternary")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "quaternary" in result.stderr
    result = invoke("compress", "m.pt", "--data", "digits", "--bogus")
    assert result.exit_code == 2 and "--bogus" in result.stderr and result.stderr.strip().count("\n") == 0


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/nonexistent/marker')}",))


def _write_idx(path, magic, dims, data, gz=True):
    header = bytes(magic) + b"".join(d.to_bytes(4, "big") for d in dims)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + data)


@pytest.fixture
def files(tmp_path):
    d = tmp_path
    model = zoo.create("mlp", in_shape=(1, 8, 8), width=16, depth=1)
    torch.save(model, d / "good.pt")
    torch.save(model.state_dict(), d / "sd.pt")
    (d / "text.pt").write_text("this is not a model\n")
    blob = (d / "good.pt").read_bytes()
    (d / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (d / "folder.pt").mkdir()
    marker = d / "PWNED"
    torch.save(Evil(), d / "evil.pt")
    with open(d / "evil.pkl", "wb") as f:  # a bare pickle, not torch.save's format (protocol 4 or 5)
        pickle.dump(Evil(), f)
    with open(d / "evil2.pkl", "wb") as f:  # the same at torch.save's protocol
        pickle.dump(Evil(), f, protocol=2)
    with open(d / "evil3.pkl", "wb") as f:  # torch warns (two lines) when it reads another protocol
        pickle.dump(Evil(), f, protocol=3)
    # corrupted MNIST folders: wrong magic in the training images; label count ≠ image count
    for name, magic, labels in (("badmagic", [0, 0, 8, 9], 2), ("badcount", [0, 0, 8, 3], 3)):
        bad = d / name / "mnist"
        bad.mkdir(parents=True)
        _write_idx(bad / "train-images-idx3-ubyte.gz", magic, [2, 28, 28], bytes(2 * 784))
        _write_idx(bad / "train-labels-idx1-ubyte.gz", [0, 0, 8, 1], [labels], bytes(labels))
        _write_idx(bad / "t10k-images-idx3-ubyte.gz", [0, 0, 8, 3], [1, 28, 28], bytes(784))
        _write_idx(bad / "t10k-labels-idx1-ubyte.gz", [0, 0, 8, 1], [1], bytes(1))
    return d, marker


BAD_INPUT = [
    ("missing.pt", ["--data", "digits"], "does not exist"),
    ("folder.pt", ["--data", "digits"], "is a folder, not a model file"),
    ("text.pt", ["--data", "digits"], "not a torch.save or TorchScript file"),
    ("trunc.pt", ["--data", "digits"], "truncated or corrupted"),
    ("sd.pt", ["--data", "digits"], "state_dict.*--arch"),
    ("sd.pt", ["--data", "digits", "--arch", "transformer"], "unknown zoo model 'transformer'"),
    ("sd.pt", ["--data", "digits", "--arch", "no_such_pkg.models:build"], "no_such_pkg"),
    ("evil.pt", ["--data", "digits"], "posix.system.*--trust"),
    ("evil.pkl", ["--data", "digits"], r"saved with pickle protocol [45], which torch.s safe loader cannot read"),
    ("evil2.pkl", ["--data", "digits"], "posix.system.*--trust"),
    ("evil3.pkl", ["--data", "digits"], "posix.system.*--trust"),
    ("good.pt", ["--data", "imagenet"], "unknown dataset 'imagenet'"),
    ("good.pt", ["--data", "mnist", "--data-dir", "{d}/badmagic"], "train-images-idx3-ubyte.*(magic|type)"),
    ("good.pt", ["--data", "mnist", "--data-dir", "{d}/badcount"], "3 labels.*2 images|labels.*images"),
    ("good.pt", ["--data", "mnist"], "ternarize data fetch mnist"),  # an empty data root
    ("good.pt", ["--data", "digits", "--keep-float", "nothing*"], "matches no"),
    ("good.pt", ["--data", "digits", "--epochs", "0"], "epochs"),
]


@pytest.mark.parametrize("model, args, message", BAD_INPUT, ids=[f"{m}-{a[1]}-{i}" for i, (m, a, _) in
                                                                   enumerate(BAD_INPUT)])
def test_bad_input_table(files, model, args, message, tmp_path, monkeypatch):
    d, marker = files
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    monkeypatch.setenv("TERNARIZE_DATA", str(tmp_path / "empty-root"))
    args = [a.replace("{d}", str(d)) for a in args]
    out = tmp_path / "out"
    result = invoke("compress", d / model, *args, "--out", out, "--no-progress")
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("ternarize: ")
    import re

    assert re.search(message, err), err
    assert "Traceback" not in result.output
    assert not marker.exists(), "the hostile pickle ran"
    assert not (out / "model.tern").exists()


def test_file_commands_reject_missing_and_malformed_files(tmp_path):
    bad = tmp_path / "bad.tern"
    bad.write_bytes(b"\x89TERN\r\n\x1a" + b"\x00" * 30)
    for args in (["inspect", tmp_path / "none.tern"], ["export", tmp_path / "none.tern", "--onnx", tmp_path / "o.onnx"],
                 ["run", tmp_path / "none.tern", "--data", "digits"], ["report", tmp_path / "none.tern"],
                 ["inspect", bad], ["run", bad, "--data", "digits"], ["export", bad, "--onnx", tmp_path / "o.onnx"]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("ternarize: ")
    assert not (tmp_path / "o.onnx").exists()
    assert "; the file is damaged, or not a .tern file this ternarize reads: copy it" in invoke("inspect", bad).stderr
    newer = bytearray((ROOT_GOLDEN / "tiny.tern").read_bytes())
    newer[8] = 2  # the version field
    (tmp_path / "newer.tern").write_bytes(bytes(newer))
    err = invoke("inspect", tmp_path / "newer.tern").stderr
    assert "version is 2; this reader knows version 1 only; a newer ternarize wrote it: upgrade ternarize" in err
    assert "damaged" not in err
    result = invoke("verify", bad)
    assert result.exit_code == 1 and "NOT sound" in result.output
    assert invoke("verify", tmp_path / "none.tern").exit_code == 2
    assert invoke("run", bad).exit_code == 2  # neither --input nor --data




def test_run_input_in_batches_empty_input_and_out_of_memory(tmp_path, monkeypatch):
    import numpy as np

    from ternarize import cli as cli_module
    from ternarize.runtime import Runtime

    tiny = os.path.join(GOLDEN, "tiny.tern")
    x = np.random.default_rng(0).standard_normal((300, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(cli_module, "RUN_BATCH", 64)
    sizes = []
    run = Runtime.run
    monkeypatch.setattr(Runtime, "run", lambda self, a: sizes.append(len(a)) or run(self, a))
    result = invoke("run", tiny, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    assert sizes == [64, 64, 64, 64, 44]
    rt = Runtime.load(tiny)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.concatenate([run(rt, x[i:i + 64])
                                                                               for i in range(0, 300, 64)]))
    assert result.output.split() == [str(int(i)) for i in np.load(tmp_path / "y.npy").argmax(axis=1)]

    for empty in (np.zeros((0, 5), np.float32), np.float32(3)):
        np.save(tmp_path / "e.npy", empty)
        result = invoke("run", tiny, "--input", tmp_path / "e.npy")
        assert result.exit_code == 2 and "holds no inputs" in result.stderr and "(N, 5) with N >= 1" in result.stderr

    def no_memory(self, a):
        raise MemoryError("Unable to allocate 29.8 GiB for an array with shape (5, 1, 40008, 40008)")

    monkeypatch.setattr(Runtime, "run", no_memory)
    result = invoke("run", tiny, "--input", tmp_path / "x.npy", "--output", tmp_path / "z.npy")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("ternarize: out of memory (Unable to allocate 29.8 GiB")
    assert "fewer at a time" in result.stderr
    assert not (tmp_path / "z.npy").exists()


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="no /dev/stdout here")
def test_output_to_a_redirected_standard_output_is_refused(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((3, 5), np.float32))
    with open(tmp_path / "printed.txt", "wb") as printed:
        proc = subprocess.run([sys.executable, "-m", "ternarize", "run", os.path.join(GOLDEN, "tiny.tern"), "--input",
                               str(tmp_path / "x.npy"), "--output", "/dev/stdout"], stdout=printed,
                              stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2
    assert "is this command's standard input, output or error, not a file" in proc.stderr
    assert (tmp_path / "printed.txt").read_bytes() == b""


def test_run_on_a_dataset_of_another_input_shape_says_so():
    result = invoke("run", os.path.join(GOLDEN, "mixed.tern"), "--data", "digits")
    assert result.exit_code == 2
    assert "mixed.tern takes inputs of shape [64] and digits has [1, 8, 8]; give the dataset" in result.stderr


def test_run_on_a_dataset_whose_classes_the_model_does_not_score_says_so(tmp_path):
    from ternarize import lower, tern

    for name, model, shape in (("image", torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1)), [1, 8, 8]),
                               ("five", zoo.create("mlp", in_shape=(1, 8, 8), width=16, depth=1, num_classes=5),
                                [5])):
        path = tmp_path / f"{name}.tern"
        tern.write(lower(model.eval(), torch.zeros(1, 1, 8, 8), discrete={}), path)
        result = invoke("run", path, "--data", "digits")
        assert result.exit_code == 2, result.output
        assert result.stderr == (f"ternarize: {path} gives outputs of shape {shape} per input, not scores for the 10 "
                                 "classes of digits; give the dataset the model was trained on, or run it on --input "
                                 "x.npy\n")
    wide = tmp_path / "twelve.tern"  # more scores than classes: compress trains such a model, run scores it
    model = zoo.create("mlp", in_shape=(1, 8, 8), width=16, depth=1, num_classes=12).eval()
    tern.write(lower(model, torch.zeros(1, 1, 8, 8), discrete={}), wide)
    result = invoke("run", wide, "--data", "digits")
    assert result.exit_code == 0 and "on digits: test accuracy" in result.output, result.output


def test_run_shows_progress_on_a_terminal_only(monkeypatch):
    conv = os.path.join(GOLDEN, "conv.tern")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    plain = invoke("run", conv, "--data", "digits")
    assert plain.exit_code == 0 and plain.stderr == ""
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stderr as a terminal
    shown = invoke("run", conv, "--data", "digits")
    assert shown.exit_code == 0 and "running digits" in shown.stderr and "359/359" in shown.stderr
    assert shown.stdout == plain.stdout


def test_run_sparse_choices_are_the_runtime_forms():
    from ternarize.cli import cli
    from ternarize.runtime import SPARSE_FORMS

    option = next(p for p in cli.commands["run"].params if p.name == "sparse")
    assert tuple(option.type.choices) == SPARSE_FORMS


def test_inspect_verify_and_run_print_json(tmp_path):
    import json

    import numpy as np

    from ternarize import tern
    from ternarize.runtime import Runtime

    conv = os.path.join(GOLDEN, "conv.tern")
    tf = tern.load(conv)
    shown = json.loads(invoke("inspect", conv, "--json").stdout)
    assert shown["size"] == os.path.getsize(conv) and shown["version"] == 1
    assert shown["graph"] == tf.header["graph"] and shown["metadata"] == tf.metadata
    assert [t["name"] for t in shown["tensors"]] == [e.name for e in tf.tensors]
    for t, e in zip(shown["tensors"], tf.tensors):
        assert t["crc32"] == e.crc32 and t["nbytes"] == e.nbytes and t["shape"] == list(e.shape)
        assert t["bits_per_weight"] == 8 * e.nbytes / int(np.prod(e.shape))

    result = invoke("verify", conv, "--json")
    checks = json.loads(result.stdout)
    assert result.exit_code == 0 and checks["sound"] is True
    assert [c["check"] for c in checks["checks"]] == [name for name, _, _ in tern.verify(conv)]
    assert all(c["ok"] for c in checks["checks"]) and checks["checks"][0]["message"].startswith("magic, version 1")
    damaged = bytearray((ROOT_GOLDEN / "conv.tern").read_bytes())
    damaged[-1] ^= 0xFF  # the last tensor's data: its CRC no longer matches
    (tmp_path / "damaged.tern").write_bytes(bytes(damaged))
    result = invoke("verify", tmp_path / "damaged.tern", "--json")
    checks = json.loads(result.stdout)
    assert result.exit_code == 1 and checks["sound"] is False
    failed = [c for c in checks["checks"] if not c["ok"]]
    assert failed and failed[0]["check"].endswith("crc32") and "CRC32" in failed[0]["message"]
    assert checks["checks"][-1] == {"check": "decode", "ok": None, "message": "not run: a check above failed"}
    lines = invoke("verify", tmp_path / "damaged.tern").stdout.splitlines()
    assert lines[-2:] == ["skip decode: not run: a check above failed", f"{tmp_path / 'damaged.tern'}: NOT sound"]
    assert sum(line.startswith("FAIL ") for line in lines) == 1

    acc = json.loads(invoke("run", conv, "--data", "digits", "--json").stdout)
    plain = invoke("run", conv, "--data", "digits").stdout
    assert acc["dataset"] == "digits" and acc["examples"] == 359
    assert f"test accuracy {100 * acc['accuracy']:.2f}% (359 examples)" in plain

    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = invoke("run", conv, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy", "--json")
    out = json.loads(result.stdout)
    y = Runtime.load(conv).run(x)
    assert out["predictions"] == y.argmax(axis=1).tolist() and out["shape"] == [5, y.shape[1]]
    assert out["output"] == str(tmp_path / "y.npy") and out["not_finite"] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), y)


def test_export_and_run_output_do_not_replace_a_file_without_force(tmp_path):
    import numpy as np

    tiny = os.path.join(GOLDEN, "tiny.tern")
    np.save(tmp_path / "x.npy", np.ones((2, 5), np.float32))
    for args, target in ((["export", tiny, "--onnx"], tmp_path / "m.onnx"),
                         (["run", tiny, "--input", tmp_path / "x.npy", "--output"], tmp_path / "y.npy")):
        target.write_bytes(b"keep me")
        result = invoke(*args, target)
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr.strip() == f"ternarize: {target} already exists; pass --force to overwrite it, " \
                                         "or choose another path"
        assert target.read_bytes() == b"keep me"
        result = invoke(*args, target, "--force")
        assert result.exit_code == 0, result.output
        assert target.read_bytes() != b"keep me"
    result = invoke("run", tiny, "--input", tmp_path / "x.npy", "--force")
    assert result.exit_code == 2 and "--force replaces the --output file; give --output" in result.stderr


def test_data_list_as_text_and_json(tmp_path):
    import json

    rows = json.loads(invoke("data", "list", "--data-dir", tmp_path, "--json").stdout)
    assert [r["name"] for r in rows] == ["digits", "mnist", "fashion-mnist", "cifar10"]
    assert rows[1]["folder"] == str(tmp_path / "mnist") and not rows[1]["present"]
    lines = invoke("data", "list", "--data-dir", tmp_path).stdout.splitlines()
    assert lines[0].split() == ["digits", "present", "(inside", "scikit-learn)"]
    assert lines[1] == f"mnist          missing: {rows[1]['fetch']}  ({tmp_path / 'mnist'})"


def test_inspect_keeps_a_long_header_line_whole(tmp_path):
    import shutil

    path = tmp_path / ("m" * 60 + ".tern")
    shutil.copy(os.path.join(GOLDEN, "conv.tern"), path)
    first = invoke("inspect", path, env={"COLUMNS": "80"}).stdout.splitlines()[0]
    assert first.startswith(f"{path}: .tern v1, ") and first.endswith("producer ternarize golden")


def test_a_file_of_another_kind_is_named(tmp_path):
    import numpy as np

    from ternarize import onnx as tonnx
    from ternarize import tern

    torch.save(zoo.create("mlp", in_shape=(1, 8, 8), width=8), tmp_path / "m.pt")
    tonnx.export(tern.read(os.path.join(GOLDEN, "tiny.tern")), tmp_path / "m.onnx")
    np.save(tmp_path / "a.npy", np.zeros(3))
    for name, kind in (("m.pt", "a zip archive (a PyTorch model saved with torch.save is one)"),
                       ("m.onnx", "an ONNX model"), ("a.npy", "a NumPy .npy array")):
        for command in ("inspect", "run", "report"):
            result = invoke(command, tmp_path / name, *(["--data", "digits"] if command == "run" else []))
            assert result.exit_code == 2, (command, name, result.output)
            assert result.stderr.strip().endswith(f"this is {kind}, not a .tern file; give the model.tern that "
                                                  "ternarize compress wrote"), result.stderr
    result = invoke("compress", os.path.join(GOLDEN, "tiny.tern"), "--data", "digits", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "tiny.tern is a .tern file, what ternarize compress writes, not a PyTorch " \
                                      "model; give the float model it was made from" in result.stderr
    assert not (tmp_path / "o").exists()


def test_tables_on_a_narrow_terminal_lose_no_value(monkeypatch):
    import re

    for name in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    conv = os.path.join(GOLDEN, "conv.tern")
    wide = invoke("report", conv, env={"COLUMNS": "200"}).stdout  # not a terminal: drawn at full width
    for columns in ("80", "60"):
        result = invoke("report", conv, env={"COLUMNS": columns, "FORCE_COLOR": "1"})  # rich: a terminal
        text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
        assert result.exit_code == 0 and "…" not in text
        cells = [c.strip() for line in wide.splitlines() if line.startswith(("│", "┃"))
                 for c in line.strip("│┃").replace("┃", "│").split("│")]
        assert "ternary" in cells and "totals" in wide
        for cell in cells:  # every cell of the wide tables
            assert cell in text, (columns, cell)
    assert "…" not in invoke("inspect", conv, env={"COLUMNS": "40", "FORCE_COLOR": "1"}).stdout


def test_run_notes_one_input_far_off_values_and_another_dataset(tmp_path):
    import numpy as np

    from ternarize import tern

    g = tern.read(os.path.join(GOLDEN, "conv.tern"))
    g.metadata["dataset"] = "digits"
    tern.write(g, tmp_path / "digits.tern")
    shape = tuple(g.inputs[0].shape[1:])
    x = np.random.default_rng(0).random((1, *shape)).astype(np.float32)
    np.save(tmp_path / "one.npy", x[0])  # one input without its batch axis
    np.save(tmp_path / "batch.npy", x)
    one = invoke("run", tmp_path / "digits.tern", "--input", tmp_path / "one.npy", "--output", tmp_path / "y1.npy")
    assert one.exit_code == 0 and one.stderr.strip() == (
        f"{tmp_path / 'one.npy'} holds one input of shape {list(shape)}: run as a batch of one")
    invoke("run", tmp_path / "digits.tern", "--input", tmp_path / "batch.npy", "--output", tmp_path / "y.npy")
    assert np.array_equal(np.load(tmp_path / "y1.npy"), np.load(tmp_path / "y.npy"))
    np.save(tmp_path / "wide.npy", x * 255)  # pixels as floats: taken as they are, and said so
    wide = invoke("run", tmp_path / "digits.tern", "--input", tmp_path / "wide.npy")
    assert wide.exit_code == 0 and wide.stderr.strip().startswith(f"{tmp_path / 'wide.npy'} holds values from ")
    assert "this model was trained on digits, whose inputs are in [0, 1]: scale them so" in wide.stderr
    assert invoke("run", os.path.join(GOLDEN, "conv.tern"), "--input", tmp_path / "wide.npy").stderr == ""  # no dataset
    with_mnist = invoke("run", tmp_path / "digits.tern", "--data", "mnist")  # another shape: one line, the error
    assert with_mnist.exit_code == 2 and len(with_mnist.stderr.strip().splitlines()) == 1


def test_run_warns_when_the_data_is_not_what_the_model_was_trained_on(tmp_path):
    from ternarize import tern

    g = tern.read(os.path.join(GOLDEN, "conv.tern"))
    g.metadata["dataset"] = "mnist"
    tern.write(g, tmp_path / "mnist.tern")
    ran = invoke("run", tmp_path / "mnist.tern", "--data", "digits")  # the golden conv model takes 8x8 digits
    assert ran.exit_code == 0, ran.output
    assert ran.stderr.strip() == f"ternarize: warning: {tmp_path / 'mnist.tern'} was trained on mnist, not digits"


def test_run_scales_uint8_pixels_as_the_datasets_are(tmp_path):
    import json

    import numpy as np

    from ternarize.data import load_dataset

    conv = os.path.join(GOLDEN, "conv.tern")
    x = load_dataset("digits").x_test[:20]  # floats in [0, 1]
    pixels = np.round(x * 255).astype(np.uint8)
    np.save(tmp_path / "floats.npy", pixels.astype(np.float32) / np.float32(255))
    np.save(tmp_path / "pixels.npy", pixels)
    floats = invoke("run", conv, "--input", tmp_path / "floats.npy", "--json")
    scaled = invoke("run", conv, "--input", tmp_path / "pixels.npy", "--json")
    assert floats.stderr == "" and scaled.stderr.strip() == (
        f"{tmp_path / 'pixels.npy'} holds uint8 pixels: scaled by 1/255 to [0, 1], as mnist, fashion-mnist, cifar10 "
        "and uint8 .npz data are for training")
    assert json.loads(scaled.stdout)["predictions"] == json.loads(floats.stdout)["predictions"]
    np.save(tmp_path / "ints.npy", pixels.astype(np.int64))  # not uint8: taken as they are, and said so
    ints = invoke("run", conv, "--input", tmp_path / "ints.npy", "--json")
    assert ints.exit_code == 0 and ints.stderr.strip() == (
        f"{tmp_path / 'ints.npy'} holds int64 values, taken as they are (up to {pixels.max()}); pixels are scaled "
        "only when stored as uint8")
    np.save(tmp_path / "bits.npy", (pixels > 127).astype(np.int64))  # 0/1 integers: nothing to say
    assert invoke("run", conv, "--input", tmp_path / "bits.npy").stderr == ""
    # a model trained on digits (values 0..16, scaled by 1/16 for training) takes its uint8 pixels so
    from ternarize import tern

    g = tern.read(conv)
    g.metadata["dataset"] = "digits"
    tern.write(g, tmp_path / "digits.tern")
    sixteenths = np.round(x * 16).astype(np.uint8)
    np.save(tmp_path / "sixteenths.npy", sixteenths)
    np.save(tmp_path / "sixteenths_f.npy", sixteenths.astype(np.float32) / np.float32(16))
    digits = invoke("run", tmp_path / "digits.tern", "--input", tmp_path / "sixteenths.npy", "--output",
                    tmp_path / "y_pixels.npy")
    assert digits.stderr.strip() == (f"{tmp_path / 'sixteenths.npy'} holds uint8 pixels: scaled by 1/16 to [0, 1], "
                                     "as the digits this model was trained on were")
    invoke("run", tmp_path / "digits.tern", "--input", tmp_path / "sixteenths_f.npy", "--output", tmp_path / "y.npy")
    assert np.array_equal(np.load(tmp_path / "y_pixels.npy"), np.load(tmp_path / "y.npy"))
    wide = invoke("run", tmp_path / "digits.tern", "--input", tmp_path / "pixels.npy", "--json")
    assert wide.stderr.strip() == (f"{tmp_path / 'pixels.npy'} holds uint8 pixels: values up to {pixels.max()}, more "
                                   "than the digits' 0..16 this model was trained on: taken for 0..255 pixels and "
                                   "scaled by 1/255")
    assert json.loads(wide.stdout)["predictions"] == json.loads(floats.stdout)["predictions"]
    np.save(tmp_path / "wrong.npy", pixels[:, :, :4])  # the note waits until the inputs fit the model
    wrong = invoke("run", conv, "--input", tmp_path / "wrong.npy")
    assert wrong.exit_code == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "uint8" not in wrong.stderr


def test_report_of_a_model_without_discrete_layers(tmp_path):
    from ternarize import lower, tern

    model = zoo.create("mlp", in_shape=(1, 8, 8), width=16, depth=1).eval()
    path = tmp_path / "float.tern"
    tern.write(lower(model, torch.zeros(1, 1, 8, 8), discrete={}), path)
    result = invoke("report", path, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    assert "non-zero discrete weights" in result.output and "- bits/weight (entropy -)" in result.output
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["layers.png", "report.json", "report.md"]


def test_a_pickle_of_another_protocol_is_refused_without_torchs_warning(files, tmp_path, monkeypatch):
    import warnings

    d, marker = files
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((d / "evil3.pkl").read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused = invoke("compress", d / "evil3.pkl", "--data", "digits", "--out", tmp_path / "o", "--no-progress")
        resumed = invoke("compress", d / "good.pt", "--data", "digits", "--out", out, "--resume", "--no-progress")
    assert refused.exit_code == 2 and "posix.system" in refused.stderr, refused.output
    assert resumed.exit_code == 2 and "cannot be read (UnpicklingError)" in resumed.stderr, resumed.output
    assert [str(w.message) for w in caught if "pickle protocol" in str(w.message)] == []
    assert not marker.exists()


@pytest.mark.parametrize("args, code", [
    (["verify", "conv.tern"], 0), (["verify", "conv.tern", "--json"], 0), (["verify", "bad.tern"], 1),
    (["inspect", "conv.tern"], 141), (["report", "conv.tern"], 141), (["inspect", "conv.tern", "--json"], 141),
])
def test_a_closed_pipe_ends_quietly(tmp_path, args, code):
    """The reader of standard output has gone before anything is printed (``| head -0``): no message,
    verify's exit code still says whether the file is sound, the others exit as SIGPIPE would."""
    data = (ROOT_GOLDEN / "conv.tern").read_bytes()
    (tmp_path / "conv.tern").write_bytes(data)
    (tmp_path / "bad.tern").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    proc = subprocess.Popen([sys.executable, "-m", "ternarize", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has started: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == code and err == "", err


def test_a_tern_file_of_flat_features_held_as_images_still_runs_on_them(tmp_path):
    """Flat features used to be held as (N, 1, 1, F): a model compressed then takes (N, F) data too."""
    import numpy as np

    from ternarize import lower, tern
    from ternarize.runtime import Runtime

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    tern.write(lower(model, torch.zeros(1, 1, 1, 6)), tmp_path / "old.tern")
    x = np.random.default_rng(0).random((30, 6)).astype(np.float32)
    y = Runtime.load(tmp_path / "old.tern").run(x.reshape(30, 1, 1, 6)).argmax(1)
    np.savez(tmp_path / "flat.npz", x=x, y=y, x_test=x, y_test=y)
    ran = invoke("run", tmp_path / "old.tern", "--data", tmp_path / "flat.npz")
    assert ran.exit_code == 0 and "test accuracy 100.00% (30 examples)" in ran.stdout, ran.output
    np.save(tmp_path / "x.npy", x)
    ran = invoke("run", tmp_path / "old.tern", "--input", tmp_path / "x.npy", "--json")
    assert ran.exit_code == 0 and json.loads(ran.stdout)["predictions"] == y.tolist()


def test_one_flat_input_runs_on_a_tern_file_of_flat_features_held_as_images(tmp_path):
    import numpy as np

    from ternarize import lower, tern

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 2))
    tern.write(lower(model, torch.zeros(1, 1, 1, 5)), tmp_path / "old.tern")
    np.save(tmp_path / "one.npy", np.ones(5, np.float32))
    ran = invoke("run", tmp_path / "old.tern", "--input", tmp_path / "one.npy", "--json")
    assert ran.exit_code == 0 and len(json.loads(ran.stdout)["predictions"]) == 1, ran.output
    assert "holds one input of shape [1, 1, 5]: run as a batch of one" in ran.stderr
