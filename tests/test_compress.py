"""`ternarize compress` end to end on the embedded digits dataset."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ternarize
from ternarize import tern, zoo
from ternarize.cli import cli
from ternarize.data import load_dataset

FAST = ["--epochs", "2", "--batch-size", "50", "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from ternarize.train.loop import fit_float

    torch.manual_seed(0)
    data = load_dataset("digits")
    model = zoo.create("mlp", in_shape=data.in_shape, width=48, depth=2)
    fit_float(model, data, epochs=3, progress=False, log=lambda s: None)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(model, path)
    return path


@pytest.fixture(scope="module")
def compressed(float_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = ternarize.compress(str(float_model), "digits", out=str(out), epochs=2, batch_size=50, progress=False,
                                val_fraction=0.1, log=lambda s: None)
    return out, result


def test_outputs_exist_and_verify(compressed):
    out, result = compressed
    for name in ("model.tern", "model.onnx", "report.json", "report.md", "layers.png", "training.png", "weights.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.pt").exists()
    assert invoke("verify", out / "model.tern").exit_code == 0
    assert [name for name in os.listdir(out) if ".tmp" in name] == []


def test_runtime_accuracy_equals_the_trained_torch_model(compressed):
    _, result = compressed
    assert result.runtime_accuracy == result.accuracy
    assert result.accuracy > 0.8
    rep = json.loads((compressed[0] / "report.json").read_text())
    assert rep["accuracy"]["runtime"] == result.runtime_accuracy
    assert rep["accuracy"]["trained"] == result.accuracy


def test_report_is_consistent_with_the_files(compressed):
    out, _ = compressed
    rep = json.loads((out / "report.json").read_text())
    t = rep["totals"]
    size = os.path.getsize(out / "model.tern")
    assert rep["model"]["source_bytes"] > 0 and len(rep["model"]["source_sha256"]) == 64
    assert t["tern_bytes"] == size
    assert t["onnx_bytes"] == os.path.getsize(out / "model.onnx")
    tf = tern.load(str(out / "model.tern"))
    assert tf.data_start == t["header_bytes"]
    assert sum(e.nbytes for e in tf.tensors) == t["tensor_bytes"] <= size - t["header_bytes"]
    assert size - t["header_bytes"] - t["tensor_bytes"] < 64 * len(tf.tensors)  # only alignment padding
    graph = tern.read(str(out / "model.tern"))
    for row in rep["layers"]:
        node = next(n for n in graph.nodes if n.name == row["name"])
        codes = graph.consts[node.inputs[1]].data
        assert row["weights"] == codes.size
        if row["kind"] != "float32":
            assert row["nonzero"] == np.count_nonzero(codes)
            assert row["plus_fraction"] == pytest.approx(np.mean(codes == 1))
    disc = [r for r in rep["layers"] if r["kind"] != "float32"]
    codes = [graph.consts[e.name].data for e in tf.tensors if e.kind != "float32"]
    assert t["discrete_weights"] == sum(r["weights"] for r in disc) == sum(c.size for c in codes)
    assert t["nonzero_fraction"] == pytest.approx(sum(np.count_nonzero(c) for c in codes) / t["discrete_weights"])
    assert t["peak_ram_bytes"] == t["runtime_weight_bytes"] + t["runtime_activation_bytes"]
    floats = [e for e in tf.tensors if e.kind == "float32"]
    assert t["float_bytes"] == sum(e.nbytes for e in floats) == 4 * sum(e.count for e in floats)
    assert t["float_encodings"] == ["f32"]
    md = (out / "report.md").read_text()
    assert "![layers](layers.png)" in md and "| non-zero |" in md
    assert len(rep["training"]["history"]) == 2
    assert all(0 < h["val_acc"] <= 1 for h in rep["training"]["history"])
    assert "history" not in tf.metadata["training"]  # the header stays small


def test_report_command_on_folder_and_file(compressed):
    out, _ = compressed
    result = invoke("report", out, "--json")
    assert result.exit_code == 0 and result.stderr == ""
    totals = json.loads(result.stdout)["totals"]
    assert totals["tern_bytes"] == os.path.getsize(out / "model.tern")
    assert totals["onnx_bytes"] == os.path.getsize(out / "model.onnx")  # the ONNX file compress wrote with it
    assert invoke("report", out / "model.tern").exit_code == 0
    assert invoke("inspect", out / "model.tern").exit_code == 0


def test_report_written_again_keeps_the_weights_plot_of_its_folder(compressed, tmp_path):
    out, _ = compressed
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = (run / "report.md").read_text()
    assert "![weights](weights.png)" in before
    assert invoke("report", run, "--out", run, "--force").exit_code == 0
    assert (run / "report.md").read_text() == before  # the same report, weights.png still listed
    assert "weights.png" in json.loads((run / "report.json").read_text())["plots"]
    elsewhere = tmp_path / "elsewhere"  # no float weights there: no weights plot
    assert invoke("report", run, "--out", elsewhere).exit_code == 0
    assert "weights.png" not in (elsewhere / "report.md").read_text() + "".join(os.listdir(elsewhere))
    graph = tern.read(run / "model.tern")  # another model over the folder's own: its weights.png is stale
    graph.metadata["note"] = "another model"
    tern.write(graph, run / "model.tern")
    assert invoke("report", run, "--out", run, "--force").exit_code == 0
    assert "weights.png" not in (run / "report.md").read_text()


def test_run_and_export_commands(compressed, tmp_path):
    out, result = compressed
    ds = load_dataset("digits")
    res = invoke("run", out / "model.tern", "--data", "digits")
    assert res.exit_code == 0 and f"{100 * result.runtime_accuracy:.2f}%" in res.output
    for form in ("stream", "gaps", "indices"):
        res = invoke("run", out / "model.tern", "--data", "digits", "--sparse", form)
        assert res.exit_code == 0 and f"{100 * result.runtime_accuracy:.2f}%" in res.output, form
    res = invoke("run", out / "model.tern", "--data", "digits", "--sparse", "fast")
    assert res.exit_code == 2 and "--sparse" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    np.save(tmp_path / "x.npy", ds.x_test[:5])
    res = invoke("run", out / "model.tern", "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert res.exit_code == 0 and len(res.output.split()) == 5
    assert np.load(tmp_path / "y.npy").shape == (5, 10)
    res = invoke("export", out / "model.tern", "--onnx", tmp_path / "m.onnx")
    assert res.exit_code == 0 and (tmp_path / "m.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_existing_folder_is_not_overwritten_without_force(compressed, float_model):
    out, _ = compressed
    before = (out / "model.tern").read_bytes()
    res = invoke("compress", float_model, "--data", "digits", "--out", out, *FAST)
    assert res.exit_code == 2 and "--force" in res.stderr
    assert (out / "model.tern").read_bytes() == before


@pytest.mark.parametrize("make, message", [
    (lambda: zoo.create("mlp", in_shape=(1, 28, 28), width=8, depth=1), "does not accept"),
    (lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.GELU()),
     "unsupported module GELU"),
    (lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), "3 outputs but the data has 10 classes"),
])
def test_bad_models_fail_before_training(tmp_path, make, message):
    torch.save(make(), tmp_path / "m.pt")
    res = invoke("compress", tmp_path / "m.pt", "--data", "digits", "--out", tmp_path / "out", *FAST)
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert "epoch" not in res.stderr  # no training started
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def _compress_cmd(model, out, epochs):
    return [sys.executable, "-m", "ternarize", "compress", str(model), "--data", "digits", "--out", str(out),
            "--epochs", str(epochs), "--batch-size", "20", "--no-progress"]


@pytest.mark.slow
def test_loss_option_reaches_the_training(float_model, tmp_path):
    out = tmp_path / "out"
    res = invoke("compress", float_model, "--data", "digits", "--out", out, "--mode", "binary",
                 "--loss", "squared_hinge", *FAST)
    assert res.exit_code == 0, res.output
    settings = json.loads((out / "report.json").read_text())["training"]["settings"]
    assert (settings["mode"], settings["loss"]) == ("binary", "squared_hinge")
    res = invoke("compress", float_model, "--data", "digits", "--out", tmp_path / "o2", "--loss", "hinge", *FAST)
    assert res.exit_code == 2 and "hinge" in res.output and not (tmp_path / "o2").exists()
    assert settings["ema_anneal"] == 0.95  # the paper's η for MNIST (and any dataset but cifar10)
    res = invoke("compress", float_model, "--data", "digits", "--out", tmp_path / "o3", "--ema-anneal", "0.9", *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o3" / "report.json").read_text())["training"]["settings"]["ema_anneal"] == 0.9
    res = invoke("compress", float_model, "--data", "digits", "--out", tmp_path / "o4", "--ema-anneal", "0", *FAST)
    assert res.exit_code == 2 and "--ema-anneal" in res.stderr and not (tmp_path / "o4").exists()


def test_the_paper_anneal_follows_the_dataset_name():
    from ternarize.pipeline import paper_defaults

    assert paper_defaults("cifar10", {"epochs": 2}) == {"epochs": 2, "ema_anneal": 0.98}
    assert paper_defaults(" CIFAR-10", {}) == {"ema_anneal": 0.98}  # any spelling load_dataset takes
    assert paper_defaults("cifar10", {"ema_anneal": 0.9}) == {"ema_anneal": 0.9}  # the user's wins
    assert paper_defaults("mnist", {}) == {} and paper_defaults("x.npz", {}) == {}


def test_a_model_with_every_discrete_weight_zero_is_warned_about(float_model, tmp_path):
    res = invoke("compress", float_model, "--data", "digits", "--out", tmp_path / "zero", "--lam", "1e6", *FAST)
    assert res.exit_code == 0, res.output
    assert "warning: every discrete weight ended at 0" in res.stderr
    assert json.loads((tmp_path / "zero" / "report.json").read_text())["totals"]["nonzero_fraction"] == 0
    res = invoke("compress", float_model, "--data", "digits", "--out", tmp_path / "fine", *FAST)
    assert res.exit_code == 0 and "ended at 0" not in res.stderr


def test_killed_run_resumes_to_the_same_result(float_model, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two spinning OpenMP threads crawl on a busy machine
    assert subprocess.run(_compress_cmd(float_model, straight, 4), capture_output=True, env=env).returncode == 0
    proc = subprocess.Popen(_compress_cmd(float_model, killed, 4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        assert not (killed / "model.tern").exists()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint.pt").exists(), proc.stderr.read()
    assert not (killed / "model.tern").exists() and not (killed / "model.onnx").exists()
    res = subprocess.run(_compress_cmd(float_model, killed, 4) + ["--resume"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "resuming after epoch" in res.stderr
    a, b = tern.read(str(straight / "model.tern")), tern.read(str(killed / "model.tern"))
    assert a.consts.keys() == b.consts.keys()
    for name in a.consts:
        np.testing.assert_array_equal(a.consts[name].data, b.consts[name].data, err_msg=name)
    ha, hb = (json.loads((d / "report.json").read_text())["training"]["history"] for d in (straight, killed))
    assert [h["test_acc"] for h in ha] == [h["test_acc"] for h in hb] and len(ha) == 4


@pytest.mark.slow
def test_compress_under_torchrun_writes_once_from_rank_0(float_model, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ternarize",
           "compress", str(float_model), "--data", "digits", "--out", str(out), "--epochs", "1", "--device", "cpu",
           "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stderr[-3000:]
    assert res.stderr.count("epoch 1/1") == 1 and res.stderr.count("float model") == 1, log  # only rank 0 logs
    assert invoke("verify", out / "model.tern").exit_code == 0, log
    assert (out / "report.json").is_file() and not (out / "checkpoint.pt").exists(), log


def test_every_report_field_is_documented(compressed):
    out, _ = compressed
    doc = (Path(__file__).parent.parent / "formats" / "REPORT.md").read_text()
    rep = json.loads((out / "report.json").read_text())
    sections = {"top": rep, "model": rep["model"], "totals": rep["totals"], "layers[i]": rep["layers"][0],
                "accuracy": rep["accuracy"], "training": rep["training"], "history": rep["training"]["history"][0]}
    missing = [f"{where}.{key}" for where, obj in sections.items() for key in obj
               if f"`{key}`" not in doc and f'"{key}"' not in doc]
    assert not missing, missing


def test_resume_of_a_finished_run_says_how_to_train_again(compressed, float_model, tmp_path):
    out, _ = compressed
    before = sorted(os.listdir(out))
    result = invoke("compress", float_model, "--data", "digits", "--out", out, "--resume", *FAST)
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"ternarize: there is no checkpoint.pt in {out} to resume from; the run there has finished: to train "
        "again, run without --resume and with --force (it replaces the folder's files), or choose another --out")
    assert sorted(os.listdir(out)) == before
    fresh = invoke("compress", float_model, "--data", "digits", "--out", tmp_path / "new", "--resume", *FAST)
    assert fresh.exit_code == 2 and fresh.stderr.strip().endswith("to resume from; run without --resume")


def test_flat_features_compress_and_run_as_they_are(tmp_path):
    """An .npz of flat features (N, F) trains a model of Linear layers without a Flatten, and the
    .tern and ONNX files take (N, F) inputs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    y = (x[:, :3].argmax(1)).astype(np.int64)  # three classes a linear model separates
    np.savez(tmp_path / "flat.npz", x=x[:240], y=y[:240], x_test=x[240:], y_test=y[240:])
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)),
               tmp_path / "flat.pt")
    out = tmp_path / "out"
    done = invoke("compress", tmp_path / "flat.pt", "--data", tmp_path / "flat.npz", "--epochs", "2",
                  "--out", out, "--no-progress")
    assert done.exit_code == 0, done.output
    np.save(tmp_path / "x.npy", x[240:])
    ran = invoke("run", out / "model.tern", "--input", tmp_path / "x.npy", "--json")
    assert ran.exit_code == 0, ran.output
    from ternarize.runtime import Runtime

    rt = Runtime.load(out / "model.tern")
    assert rt.input_shape == (12,)
    assert json.loads(ran.stdout)["predictions"] == rt.run(x[240:]).argmax(1).tolist()
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [12]
    got = session.run(None, {session.get_inputs()[0].name: x[240:]})[0]
    np.testing.assert_allclose(got, rt.run(x[240:]), atol=1e-4 * np.abs(got).max())


def test_keep_best_writes_the_best_epoch_and_needs_a_validation_split(float_model, tmp_path):
    bad = invoke("compress", float_model, "--data", "digits", "--keep-best", "--out", tmp_path / "no")
    assert bad.exit_code == 2 and bad.stderr.strip() == ("ternarize: --keep-best picks the epoch of best validation "
                                                          "accuracy: hold out a validation set with --val-fraction "
                                                          "(0.1, say)")
    assert not (tmp_path / "no").exists()
    out = tmp_path / "best"
    done = invoke("compress", float_model, "--data", "digits", "--keep-best", "--val-fraction", "0.2", "--epochs", "3",
                  "--batch-size", "50", "--out", out, "--no-progress")
    assert done.exit_code == 0, done.output
    rep = json.loads((out / "report.json").read_text())
    vals = [h["val_acc"] for h in rep["training"]["history"]]
    assert rep["training"]["settings"]["keep_best"] is True
    assert rep["training"]["kept_epoch"] == 1 + vals.index(max(vals))
    assert f"kept the weights of epoch {rep['training']['kept_epoch']}" in done.stderr


def test_float16_halves_the_float_tensors_and_every_output_agrees_with_the_file(float_model, compressed, tmp_path):
    out = tmp_path / "half"
    lines = []
    result = ternarize.compress(str(float_model), "digits", out=str(out), epochs=2, batch_size=50, progress=False,
                                val_fraction=0.1, float16=True, log=lines.append)
    full = tern.load(str(compressed[0] / "model.tern"))
    half = tern.load(str(out / "model.tern"))
    floats = {e.name: e for e in full.tensors if e.kind == "float32"}
    assert floats and all(e.encoding == "f16" and e.nbytes == 2 * e.count for e in half.tensors if e.kind == "float32")
    assert [e.name for e in half.tensors if e.kind == "float32"] == list(floats)
    # the same training (same seed): the discrete codes are equal, the floats are their binary16 roundings
    g_full, g_half = tern.read(str(compressed[0] / "model.tern")), tern.read(str(out / "model.tern"))
    for name, const in g_full.consts.items():
        want = const.data.astype(np.float16).astype(np.float32) if name in floats else const.data
        assert np.array_equal(g_half.consts[name].data, want), name
    saved = sum(e.nbytes for e in floats.values()) // 2
    assert half.size <= full.size - saved + 64 * len(floats)  # alignment padding may take back a little
    assert half.size < full.size
    said = [line for line in lines if line.startswith("float16 tensors: model.tern is ")]
    assert said == [f"float16 tensors: model.tern is {half.size:,} bytes instead of {full.size:,}; outputs moved by "
                    f"at most {tf_record(half)['max_change']:.2g} of their largest value, the predicted class "
                    f"changed on 0.0% of the 359 test inputs checked"], lines
    assert tf_record(half)["stored"] is True and tf_record(half)["class_changed"] == 0
    assert 0 < tf_record(half)["max_change"] < 1e-2
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["float16"] == tf_record(half)
    assert rep["totals"]["float_encodings"] == ["f16"] and rep["totals"]["float_bytes"] == saved
    assert "(f16)" in (out / "report.md").read_text()
    # the runtime's accuracy is measured on the file as written, and the ONNX file holds the same values
    assert rep["accuracy"]["runtime"] == result.runtime_accuracy
    assert abs(result.runtime_accuracy - result.accuracy) <= 0.01
    x = load_dataset("digits").x_test[:64]
    from ternarize import onnx as onnx_export
    from ternarize.runtime import Runtime
    got = Runtime.load(str(out / "model.tern")).run(x)
    ort = onnx_export.run(onnx_export.session(str(out / "model.onnx")), x)
    assert np.abs(got - ort).max() <= 1e-5 * np.abs(got).max()
    assert invoke("verify", out / "model.tern").exit_code == 0


def test_float16_option_of_the_command(float_model, tmp_path):
    out = tmp_path / "o"
    res = invoke("compress", float_model, "--data", "digits", "--out", out, "--float16", *FAST)
    assert res.exit_code == 0, res.output
    assert "float16 tensors: model.tern " in res.output
    shown = invoke("inspect", out / "model.tern").output
    assert " f16 " in shown and " f32 " not in shown


def test_float16_that_changes_predictions_keeps_float32(float_model, tmp_path, monkeypatch):
    from ternarize import pipeline

    monkeypatch.setattr(pipeline, "F16_MAX_CHANGED", -1.0)  # any rounding counts as too much
    lines = []
    ternarize.compress(str(float_model), "digits", out=str(tmp_path / "o"), epochs=1, batch_size=50, progress=False,
                       float16=True, log=lines.append)
    tf = tern.load(str(tmp_path / "o" / "model.tern"))
    assert {e.encoding for e in tf.tensors if e.kind == "float32"} == {"f32"}
    assert any(line.startswith("warning: float16 tensors changed the predicted class") and "keeps its float tensors "
               "in float32" in line for line in lines), lines
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["totals"]["float_encodings"] == ["f32"]
    assert tf_record(tf)["stored"] is False and rep["model"]["float16"] == tf_record(tf)
    assert 0 <= tf_record(tf)["class_changed"] <= 1


def tf_record(tf) -> dict:
    """What compress --float16 recorded in a .tern file's metadata."""
    return tf.metadata["float16"]


def test_halved_rounds_float_constants_and_keeps_those_beyond_binary16():
    from ternarize.graph import Const
    from ternarize.pipeline import halved

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.1, -1.0 / 3, 70000.0, 1.0]] * 3))
        model[1].bias.copy_(torch.tensor([0.1, 1e-8, -2.0 / 3]))
    graph = ternarize.lower(model, torch.zeros(1, 4))
    graph.consts["extra"] = Const("ternary", np.array([[1, 0, -1]], np.int8))
    before = {k: c.data.copy() for k, c in graph.consts.items()}
    half = halved(graph)
    assert all(np.array_equal(graph.consts[k].data, v) for k, v in before.items())  # the input is unchanged
    weight = next(k for k in graph.consts if k.endswith("weight"))
    bias = next(k for k in graph.consts if k.endswith("bias"))
    assert np.array_equal(half.consts[weight].data, before[weight])  # 70000 overflows binary16: kept
    assert np.array_equal(half.consts[bias].data, np.array([0.1, 1e-8, -2.0 / 3], np.float16).astype(np.float32))
    assert half.consts[bias].data[0] != np.float32(0.1)
    assert half.consts["extra"] is graph.consts["extra"]
    del half.consts["extra"]  # not used by any node: no file would hold it
    encodings = {e.name: e.encoding for e in tern.parse(tern.dumps(half, allow_lossy=True)[0]).tensors}
    assert encodings[bias] == "f16" and encodings[weight] == "f32"


def test_a_resume_writes_what_its_own_float16_says_and_warns_of_a_change(float_model, tmp_path, monkeypatch):
    from ternarize import pipeline

    out = tmp_path / "o"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # stopped after training, before the files: the checkpoint stays
        m.setattr(pipeline, "_write_outputs", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ternarize.compress(str(float_model), "digits", out=str(out), epochs=1, batch_size=50, progress=False,
                               float16=True, log=lambda s: None)
    assert (out / "checkpoint.pt").is_file()
    lines = []
    ternarize.compress(str(float_model), "digits", out=str(out), epochs=1, batch_size=50, progress=False,
                       resume=True, log=lines.append)
    assert [line for line in lines if "--float16" in line] == [
        "warning: the interrupted run was started with --float16; this one writes the .tern file's float tensors "
        "in float32 (resume with --float16 for half precision)"], lines
    tf = tern.load(str(out / "model.tern"))
    assert {e.encoding for e in tf.tensors if e.kind == "float32"} == {"f32"} and "float16" not in tf.metadata
    assert tf.metadata["training"]["settings"]["float16"] is False
