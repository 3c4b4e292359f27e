"""The scripts under examples/ and bench/ refuse bad input in one line, exit code 2, before the
long work, and leave nothing behind (ternarize._scripts). The scripts run in this process through
``_scripts.main`` (as ``python SCRIPT`` does) with the long work replaced by a failing stub, so a
test that passes shows the check came first; bench/gpu.sh runs as a subprocess."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ternarize
from ternarize import _scripts
from ternarize.errors import ConfigError, OutputError

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = "cuda:99"  # refused with or without a GPU


def load(rel: str):
    """The script ROOT/rel as a module named script_<stem>; sys.path is left as it was."""
    name = "script_" + Path(rel).stem
    if name not in sys.modules:
        saved = sys.path[:]
        spec = importlib.util.spec_from_file_location(name, ROOT / rel)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path[:] = saved
        sys.modules[name] = module
    return sys.modules[name]


def never(*args, **kwargs):
    raise AssertionError("the long work started before the input was checked")


def stubbed(monkeypatch, rel: str, work: str):
    """The script ``rel`` (see :func:`load`) whose long ``work`` fails the test if it ever starts."""
    module = load(rel)
    monkeypatch.setattr(module, work, never)
    return module


def call(capsys, module, *argv) -> tuple[int, str, str]:
    """Run the script's main as ``python SCRIPT ARGV`` would: (exit code, stdout, stderr)."""
    try:
        code = _scripts.main(module.main, [str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, module, *argv, says: str = "") -> str:
    code, out, err = call(capsys, module, *argv)
    prog = os.path.basename(module.__file__)
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and err.startswith(f"{prog}: ") and "Traceback" not in err, err
    assert says in err, err
    return err


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------- ternarize._scripts


@pytest.mark.parametrize(("kind", "text"), [
    (_scripts.positive_int, "0"), (_scripts.positive_int, "-5"), (_scripts.positive_int, "1.5"),
    (_scripts.positive_int, "x"), (_scripts.non_negative_int, "-1"), (_scripts.seed, "-1"),
    (_scripts.seed, str(2**32)), (_scripts.seed, "99999999999999999999"), (_scripts.positive_float, "0"),
    (_scripts.positive_float, "-1"), (_scripts.positive_float, "nan"), (_scripts.positive_float, "inf"),
    (_scripts.width, "0"), (_scripts.width, "-0.5"), (_scripts.width, "nan"), (_scripts.fraction, "0"),
    (_scripts.fraction, "1.5"), (_scripts.models(["mlp", "vgg"]), "nope"), (_scripts.models(["mlp"]), ""),
    (_scripts.models(["mlp", "vgg"]), "mlp,"),
])
def test_types_refuse_bad_values(kind, text):
    with pytest.raises(argparse.ArgumentTypeError, match="got|unknown model"):
        kind(text)


def test_types_accept_good_values():
    assert _scripts.seed(str(2**32 - 1)) == 2**32 - 1 and _scripts.non_negative_int("0") == 0
    assert _scripts.fraction("1") == 1.0 and _scripts.width("0.125") == 0.125
    assert _scripts.models(["mlp", "vgg"])(" vgg , mlp") == ["vgg", "mlp"]


def test_main_turns_errors_into_one_line(capsys, monkeypatch):
    def fails(error):
        def main(argv):
            raise error
        return main

    assert _scripts.main(fails(ConfigError("x is wrong; do y"))) == 2
    assert _scripts.main(fails(FileNotFoundError(2, "No such file or directory", "a.txt"))) == 2
    assert _scripts.main(fails(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.splitlines() == [
        "test_scripts.py: x is wrong; do y",
        "test_scripts.py: No such file or directory: a.txt; check the path; create a missing folder first",
        "test_scripts.py: interrupted"]
    monkeypatch.setenv("TERNARIZE_DEBUG", "1")
    with pytest.raises(ConfigError):
        _scripts.main(fails(ConfigError("x")))


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", None)])
def test_sigterm_and_sighup_stop_a_script_as_ctrl_c_does(capsys, tmp_path, signum):
    before = signal.getsignal(signum)

    def main(argv):
        with _scripts.output_folder(tmp_path / "made" / "out"):
            os.kill(os.getpid(), signum)
            time.sleep(30)
    assert _scripts.main(main) == 128 + signum
    assert capsys.readouterr().err == f"test_scripts.py: stopped by {signal.Signals(signum).name}\n"
    assert not (tmp_path / "made").exists()  # the folders it made are removed
    assert signal.getsignal(signum) == before


def test_out_of_memory_is_one_line_other_errors_pass():
    torch_says = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000000 bytes."
    with pytest.raises(ConfigError, match=r"^out of memory \(an allocation of 3,725.3 GiB failed\); use less$"):
        with _scripts.out_of_memory("use less"):
            raise RuntimeError(torch_says)
    with pytest.raises(ConfigError, match="^out of memory; use less$"), _scripts.out_of_memory("use less"):
        raise MemoryError()
    with pytest.raises(RuntimeError, match="a bug"), _scripts.out_of_memory("use less"):
        raise RuntimeError("a bug")


def test_output_folder_is_checked_first_and_removed_on_failure(tmp_path):
    (tmp_path / "file").write_text("keep")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(OutputError, match="not a folder"), _scripts.output_folder(bad):
            never()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "paper.json").mkdir()
    with pytest.raises(OutputError, match="is a folder"), _scripts.output_folder(tmp_path / "out", ["paper.json"]):
        never()
    with pytest.raises(ConfigError), _scripts.output_folder(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b").is_dir()
        raise ConfigError("late failure")
    assert not (tmp_path / "a").exists()
    with _scripts.output_folder(tmp_path / "a" / "b"):
        pass
    assert (tmp_path / "a" / "b").is_dir()


# ---------------------------------------------------------------------- examples/


@pytest.fixture
def train_float(monkeypatch):
    return stubbed(monkeypatch, "examples/train_float.py", "load_dataset")


@pytest.mark.parametrize(("argv", "says"), [
    (["--width", "0"], "--width"), (["--width", "-3"], "--width"), (["--width", "nan"], "--width"),
    (["--model", "vgg", "--width", "0"], "--width"), (["--model", "vgg", "--width", "-1"], "--width"),
    (["--model", "lenet", "--width", "3"], "does not apply to lenet"),
    (["--model", "mlp", "--width", "4.5"], "whole number"), (["--model", "resnet", "--width", "4.5"], "whole number"),
    (["--model", "mlp", "--width", "1e12"], "too large"), (["--model", "vgg", "--width", "2000"], "too large"),
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
    (["--seed", "99999999999999999999"], "--seed"), (["--seed", "-1"], "--seed"),
    (["--epochs", "0"], "--epochs"), (["--batch-size", "1"], "--batch-size"),
    (["--device", "bogus"], "bogus"), (["--device", NO_GPU], NO_GPU),
])
def test_train_float_refuses_bad_options_before_loading_data(capsys, train_float, argv, says):
    refused(capsys, train_float, *argv, says=says)


def test_train_float_never_writes_over_its_dataset(capsys, tmp_path, monkeypatch):
    module = stubbed(monkeypatch, "examples/train_float.py", "fit_float")
    data = tmp_path / "victim.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 0, 1]))
    before = md5(data)
    refused(capsys, module, "--data", data, "--out", data, says="is the input file")
    assert md5(data) == before


@pytest.mark.parametrize("where", ["missing/model.pt", ".", "model.pt/"])
def test_train_float_checks_out_before_training(capsys, tmp_path, train_float, where):
    refused(capsys, train_float, "--out", f"{tmp_path}/{where}")
    assert sorted(tmp_path.iterdir()) == []


def test_train_float_resnet_width_is_base_channels(capsys, tmp_path):
    out = tmp_path / "m.pt"
    code, stdout, err = call(capsys, load("examples/train_float.py"), "--model", "resnet", "--width", "2",
                             "--epochs", "1", "--device", "cpu", "--out", out)
    assert code == 0, err
    assert stdout.strip().endswith(f"saved {out}")
    assert ternarize.load_model(out).stem[0].out_channels == 2
    code, stdout, err = call(capsys, load("examples/train_float.py"), "--model", "resnet", "--width", "3",
                             "--epochs", "1", "--device", "cpu", "--out", out)
    assert code == 0 and stdout.strip().endswith(f"saved {out} (it replaced the file of that name)"), err
    assert ternarize.load_model(out).stem[0].out_channels == 3


@pytest.fixture
def paper_mnist(monkeypatch):
    return stubbed(monkeypatch, "examples/paper_mnist.py", "run")


@pytest.mark.parametrize(("argv", "says"), [
    (["--width", "-2"], "--width"), (["--width", "0"], "--width"), (["--epochs", "0"], "--epochs"),
    (["--seed", str(2**64)], "--seed"), (["--seed", "-1"], "--seed"), (["--device", NO_GPU], NO_GPU),
    (["--device", "bogus"], "bogus"), (["--mode", "quaternary"], "--mode"), (["--compile", "yes"], "--compile"),
    (["--time-budget", "0"], "--time-budget"), (["--time-budget", "nan"], "--time-budget"),
])
def test_paper_mnist_refuses_bad_options_before_training(capsys, paper_mnist, argv, says):
    refused(capsys, paper_mnist, *argv, says=says)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 is fine on a GPU")
def test_paper_mnist_refuses_tf32_on_a_cpu(capsys, paper_mnist):
    refused(capsys, paper_mnist, "--precision", "tf32", "--device", "cpu", says="tf32")


@pytest.mark.parametrize("where", ["missing/s.json", ".", "s.json/"])
def test_paper_mnist_checks_json_before_training(capsys, tmp_path, paper_mnist, where):
    refused(capsys, paper_mnist, "--json", f"{tmp_path}/{where}")
    assert sorted(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- bench/paper.py and gpu.sh


@pytest.fixture
def paper(monkeypatch):
    return stubbed(monkeypatch, "bench/paper.py", "step_ratios")


def test_paper_finds_missing_fashion_mnist_before_step_a(capsys, tmp_path, paper):
    data = tmp_path / "data"
    data.mkdir()
    real = ternarize.data.data_root() / "mnist"
    if real.is_dir():
        (data / "mnist").symlink_to(real)  # MNIST present, Fashion-MNIST missing
    refused(capsys, paper, "--data-dir", data, "--out", tmp_path / "out", "--tiny",
            says="fashion-mnist" if real.is_dir() else "mnist")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("argv", "says"), [
    (["--precision", "fp64"], "--precision"), (["--device", "bogus"], "bogus"), (["--device", NO_GPU], NO_GPU),
    (["--data-dir", "/nonexistent/data"], "/nonexistent/data"),
])
def test_paper_refuses_bad_options_before_step_a(capsys, tmp_path, paper, argv, says):
    refused(capsys, paper, "--data-dir", tmp_path, "--out", tmp_path / "out", "--tiny", *argv, says=says)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine without a CUDA GPU")
def test_paper_asks_for_tiny_or_a_cpu_device_without_a_gpu(capsys, tmp_path, paper):
    refused(capsys, paper, "--data-dir", tmp_path, "--out", tmp_path / "out",
            says="there is no CUDA GPU, and the full run takes hours on a CPU: pass --tiny for the CPU check, "
                 "or --device cpu")
    assert not (tmp_path / "out").exists()


def test_paper_refuses_a_file_as_out_and_removes_the_folder_it_made(capsys, tmp_path, paper, monkeypatch):
    monkeypatch.setattr(paper, "load_dataset", lambda name, data_dir=None: name)
    (tmp_path / "README.md").write_text("keep")
    refused(capsys, paper, "--data-dir", tmp_path, "--out", tmp_path / "README.md", "--tiny", says="not a folder")
    assert (tmp_path / "README.md").read_text() == "keep"

    def fails(*args):
        raise ConfigError("failed in step (b); do something")

    monkeypatch.setattr(paper, "run", fails)
    refused(capsys, paper, "--data-dir", tmp_path, "--out", tmp_path / "a" / "b", "--tiny", says="step (b)")
    assert not (tmp_path / "a").exists()


def test_paper_records_a_failed_step_and_runs_the_others(capsys, tmp_path, paper, monkeypatch):
    monkeypatch.setattr(paper, "load_dataset", lambda name, data_dir=None: name)
    monkeypatch.setattr(paper, "step_ratios", lambda *a: [{"precision": "fp32", "graphs": False, "model": "mlp",
                                                           "variant": "float Adam", "median_ms": 2.0, "ratio": 1.0}])
    done = []

    def schedule(cfg, args, log, data, mode):
        if mode == "ternary":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        done.append(mode)
        return {"width": 8, "precision": "fp32", "cuda_graphs": "on", "epochs_run": 1, "seconds_per_epoch": 0.5,
                "time_to": {}, "final_test_acc": 0.9, "final_nonzero": 0.05}

    monkeypatch.setattr(paper, "mnist_schedule", schedule)
    monkeypatch.setattr(paper, "fashion_vgg", lambda *a: done.append("fashion") or {
        "width": 1.0, "cuda_graphs": "on", "epochs_run": 2, "train_seconds": 3.0, "test_acc": 0.9, "nonzero": 0.1})
    code, out, err = call(capsys, paper, "--data-dir", tmp_path, "--out", tmp_path / "out", "--tiny")
    assert code == 1 and done == ["binary", "fashion"]
    assert "Traceback" in err and "a step failed" in err.splitlines()[-1]
    report = json.loads((tmp_path / "out" / "paper.json").read_text())
    assert report["mnist"]["ternary"] == {"error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert report["mnist"]["binary"]["epochs_run"] == 1 and report["steps"][0]["ratio"] == 1.0
    text = (tmp_path / "out" / "paper.md").read_text()
    assert "| ternary | failed: RuntimeError: CUDA error" in text and "| binary | 8 | fp32 | on | 1 |" in text
    assert "| 1.0 | on | 2 | 3.0 | 90.00% | 10.00% |" in text


def test_paper_keeps_the_step_rows_of_settings_that_ran(monkeypatch):
    paper = load("bench/paper.py")

    def measure(name, args, device, graphed=False):
        if name == "vgg":
            raise RuntimeError("out of | memory\nmore")
        return [{"model": name, "variant": "float Adam", "graphs": False, "median_ms": 1.0, "ratio": 1.0}]

    monkeypatch.setattr(paper.train_step, "measure", measure)
    cfg = dict(paper.TINY)
    failures = []
    steps = paper._attempt(lambda: paper.step_ratios(cfg, torch.device("cpu"), lambda s: None), failures)
    assert failures == ["steps"] and [r["model"] for r in steps["rows"]] == ["mlp"]
    assert steps["error"] == "fp32 eager vgg: RuntimeError: out of / memory"
    text = paper.markdown({"env": {"device": "cpu", "torch": "x", "date": "d"}, "steps": steps})
    assert "| fp32 | no | mlp | float Adam | 1.00 | 1.000 |" in text
    assert "failed: fp32 eager vgg: RuntimeError: out of / memory" in text


def test_train_step_profiles_each_variant_and_paper_shows_both_ratios(capsys, tmp_path):
    module = load("bench/train_step.py")
    path = tmp_path / "step.json"
    code, out, err = call(capsys, module, "--models", "mlp", "--mlp-width", "16", "--steps", "2", "--warmup", "0",
                          "--no-compile", "--profile", "--json", path)
    assert code == 0, err
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["float Adam", "MSA ternary eager", "MSA binary eager", "STE TWN"]
    for r in rows:  # a CPU profile: the step's top-level aten operations
        prof = r["profile"]
        assert prof["what"] == "aten ops" and prof["per_step"] > 0 and prof["ms_per_step"] > 0
        assert prof["top"] and all(t["name"].startswith("aten::") for t in prof["top"])
        assert f"mlp {r['variant']}: {prof['per_step']:.0f} aten ops per step" in out
    assert "aten::mm" in out or "aten::addmm" in out or "aten::linear" in out
    paper = load("bench/paper.py")
    fused = [{"model": "mlp", "variant": "float Adam fused", "graphs": True, "median_ms": 0.5, "ratio": 0.5,
              "ratio_fused": 1.0, "precision": "tf32"}]
    text = paper.markdown({"env": {"device": "gpu", "torch": "x", "date": "d"}, "steps": fused})
    assert "| tf32 | yes | mlp | float Adam fused | 0.50 | 0.500 | 1.000 |" in text


def test_compile_time_reports_the_spread_over_fresh_processes(capsys, monkeypatch, tmp_path):
    module = load("bench/compile_time.py")
    times = iter([0.4, 0.6, 0.5, 0.3, 0.3, 0.3, 0.9, 0.9, 0.9])

    def fresh(name, setting, device, args):
        assert device == "cpu" and args.width == 8
        return {"setting": name, "process_s": 2.0, "first_step_s": 1.0, "step_ms": next(times), "compiled": True}

    monkeypatch.setattr(module, "fresh_process", fresh)
    code, out, err = call(capsys, module, "--width", "8", "--repeat", "3", "--json", tmp_path / "c.json")
    assert code == 0, err
    assert "defaults: step ms over 3 processes: min 0.400, median 0.500, max 0.600 (max/min 1.50)" in out
    assert "one compile thread: step ms over 3 processes: min 0.300, median 0.300, max 0.300 (max/min 1.00)" in out
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["defaults"] * 3 + ["one compile thread"] * 3 + ["first call on W x 784"] * 3


def test_gpu_sh_takes_relative_paths_from_the_caller_and_options_after_data(tmp_path):
    (tmp_path / "data").mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    made_in_repo = (ROOT / "bench-out").exists()
    proc = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "data", "--tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "", proc.stdout  # paper.py's error line stays on stderr (and in the log)
    text = proc.stderr
    assert f"not in {tmp_path}/data/mnist" in text and "Traceback" not in text and "mkdir" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no bench-out left
    assert (ROOT / "bench-out").exists() == made_in_repo
    proc = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "nodata", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == (f"gpu.sh: DATA_ROOT {tmp_path}/nodata is not a folder; give "
                                                    "the folder that holds mnist/ and fashion-mnist/\n")
    assert not (tmp_path / "out").exists()


def test_gpu_sh_says_when_its_python_lacks_torch(tmp_path):
    (tmp_path / "data").mkdir()
    fake = tmp_path / "bin" / "python3"  # a python3 first on PATH whose imports all fail
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHON", None)
    proc = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "data", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == ("gpu.sh: python3 cannot import torch and numpy; activate the "
                                                    "environment that has them (or set PYTHON)\n"), proc.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (tmp_path / "py" / "python").chmod(0o755)
    for python in (sys.executable, "py/python"):  # PYTHON names the interpreter, a relative path from here
        env["PYTHON"] = python  # the run goes on to paper.py's own check
        proc = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "data", "out", "--tiny"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"not in {tmp_path}/data/mnist" in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- the other bench scripts


@pytest.mark.parametrize(("argv", "says"), [
    (["--models", "nope"], "unknown model 'nope'"), (["--models", ""], "unknown model ''"),
    (["--steps", "0"], "--steps"), (["--steps", "-1"], "--steps"), (["--batch", "0"], "--batch"),
    (["--batch", "1"], "--batch"), (["--mlp-width", "0"], "--mlp-width"), (["--vgg-width", "-1"], "--vgg-width"),
    (["--warmup", "-1"], "--warmup"), (["--device", "bogus"], "bogus"), (["--device", NO_GPU], NO_GPU),
    (["--graphs"], "--graphs needs a CUDA device, not cpu"), (["--precision", "tf32"], "tf32 needs a CUDA GPU"),
    (["--precision", "bf16"], "--precision"),
])
def test_train_step_refuses_bad_options(capsys, monkeypatch, argv, says):
    module = stubbed(monkeypatch, "bench/train_step.py", "measure")
    refused(capsys, module, *argv, says=says)


@pytest.mark.parametrize("script", ["bench/runtime.py", "bench/onnx.py"])
@pytest.mark.parametrize(("argv", "says"), [
    (["--models", "nope"], "unknown model 'nope'"), (["--models", "lenet"], "unknown model 'lenet'"),
    (["--width", "0"], "--width"), (["--width", "1e9"], "--width"), (["--vgg-width", "0"], "--vgg-width"),
    (["--vgg-width", "1e300"], "--vgg-width"), (["--runs", "0"], "--runs"),
    (["--runs", "-5"], "--runs"), (["--threads", "-1"], "--threads"), (["--threads", "0"], "--threads"),
])
def test_runtime_and_onnx_refuse_bad_options(capsys, monkeypatch, script, argv, says):
    module = stubbed(monkeypatch, script, "bench_model")
    refused(capsys, module, *argv, says=says)


@pytest.mark.parametrize(("argv", "says"), [
    (["--width", "0"], "--width"), (["--width", "0.5"], "--width"), (["--vgg-width", "-1"], "--vgg-width"),
    (["--vgg-width", "0"], "--vgg-width"), (["--rounds", "0"], "--rounds"),
])
def test_allocator_refuses_bad_options(capsys, monkeypatch, argv, says):
    module = stubbed(monkeypatch, "bench/allocator.py", "build")
    refused(capsys, module, *argv, says=says)


@pytest.mark.parametrize(("script", "work", "argv"), [
    ("bench/train_step.py", "measure", []), ("bench/runtime.py", "bench_model", []),
    ("bench/onnx.py", "bench_model", []), ("bench/allocator.py", "build", []),
    ("bench/revisions.py", "base_runtime", ["HEAD"]), ("examples/paper_mnist.py", "run", []),
    ("bench/compile_time.py", "fresh_process", []), ("bench/size.py", "demo_model", []),
])
@pytest.mark.parametrize("where", ["missing/x.json", ".", "x.json/"])
def test_json_is_checked_before_the_benchmark(capsys, tmp_path, monkeypatch, script, work, argv, where):
    module = load(script)
    monkeypatch.setattr(module, work, never)
    refused(capsys, module, *argv, "--json", f"{tmp_path}/{where}")
    assert sorted(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- bench/size.py


@pytest.mark.parametrize(("argv", "says"), [
    (["--models", "nope"], "unknown model 'nope'"), (["--width", "0"], "--width"),
    (["--vgg-width", "0"], "--vgg-width"), (["missing.tern"], "missing.tern"), (["not-a-tern"], "not-a-tern"),
])
def test_size_refuses_bad_input_before_the_work(capsys, monkeypatch, tmp_path, argv, says):
    module = load("bench/size.py")
    for work in ("demo_model", "synthetic_model", "sizes"):
        monkeypatch.setattr(module, work, never)
    (tmp_path / "not-a-tern").write_bytes(b"PK\x03\x04 a zip file, not a .tern file")
    monkeypatch.chdir(tmp_path)
    refused(capsys, module, *argv, says=says)


def test_size_never_writes_its_json_over_a_file_it_measures(capsys, monkeypatch, tmp_path):
    module = load("bench/size.py")
    monkeypatch.setattr(module, "sizes", never)
    folder = tmp_path / "run"
    folder.mkdir()
    kept = (ROOT / "formats" / "golden" / "tiny.tern").read_bytes()
    (folder / "model.tern").write_bytes(kept)
    err = refused(capsys, module, folder, "--json", folder / "model.tern", says="model.tern")
    assert "input" in err, err
    assert (folder / "model.tern").read_bytes() == kept


def test_size_measures_every_way_from_the_same_weights(capsys, tmp_path):
    import bz2
    import gzip

    from ternarize import lower, pack, tern
    from ternarize.testing import project, synthetic

    module = load("bench/size.py")
    model, shape = synthetic("mlp", 24)
    graph = lower(model, torch.zeros(1, *shape), discrete=project(model, "ternary", 0.2))
    path = tmp_path / "m.tern"
    tern.write(graph, path)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.tern").write_bytes(path.read_bytes())
    code, out, err = call(capsys, module, path, folder, "--json", tmp_path / "size.json")  # a file, and a folder
    assert code == 0, err
    assert "bytes of the same weights stored each way" in out and ".tern --float16" in out
    rows = json.loads((tmp_path / "size.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [str(path), str(folder)]
    assert rows[0]["bytes"] == rows[1]["bytes"]
    b = rows[0]["bytes"]
    graph = tern.read(path)  # its tensors in the file's order
    disc = {n: c for n, c in graph.consts.items() if c.kind != "float32"}
    floats = sum(c.data.size for c in graph.consts.values() if c.kind == "float32")
    dense = b"".join(pack.encode(c.data, "ternary", "t2")[0] for c in disc.values())
    floats_raw = b"".join(c.data.tobytes() for c in graph.consts.values() if c.kind == "float32")
    assert b[".tern"] == path.stat().st_size
    plain = tern.dumps(graph, deflate=False)[0]
    assert b[".tern, plain JSON header"] == len(plain) > b[".tern"]
    codes = sum(c.data.size for c in disc.values())
    assert b["packed codes + f32"] == len(dense) + 4 * floats == codes // 4 + 4 * floats
    assert b["packed codes + f32, gzip -9"] == len(gzip.compress(dense + floats_raw, 9, mtime=0))
    assert b["packed codes + f32, bzip2 -9"] == len(bz2.compress(dense + floats_raw, 9))
    entropy = sum(c.data.size * pack.entropy_bits(c.data) for c in disc.values()) / 8
    assert b["floor: entropy + f32"] - b["floor: entropy + f16"] == 2 * floats
    assert b["floor: entropy + f32"] == int(np.ceil(entropy)) + 4 * floats <= b[".tern"]
    assert b[".tern --float16"] < b[".tern"] < b["ONNX (INT2)"] < b["torch.save, float32"]
    assert b["torch.save, float32"] > 4 * (sum(c.data.size for c in graph.consts.values()) - floats // 2)
    assert rows[0]["nonzero"] == pytest.approx(sum(np.count_nonzero(c.data) for c in disc.values())
                                               / sum(c.data.size for c in disc.values()))


# ---------------------------------------------------------------------- bench/revisions.py


def test_revisions_never_passes_an_option_to_git(capsys, tmp_path):
    scratch = tmp_path / "precious.txt"
    scratch.write_text("precious\n")
    module = load("bench/revisions.py")
    for rev in (f"--output={scratch}", f"-o{scratch}", "--remote=https://example.invalid/x.git", ""):
        refused(capsys, module, "--models", "mlp", "--", rev, says="not a git revision")
    for rev in ("no-such-branch", "HEAD:README.md", "HEAD~1..HEAD"):
        refused(capsys, module, "--models", "mlp", rev, says="names no commit")
    assert scratch.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


RUNTIMES = {  # tag -> ternarize/ files of a revision whose runtime fails
    "raising": {"__init__.py": "raise RuntimeError('boom at import')\n", "runtime/__init__.py": ""},
    "syntax": {"__init__.py": "", "runtime/__init__.py": "def broken(:\n"},
    "no-runtime-class": {"__init__.py": "", "runtime/__init__.py": "X = 1\n"},
    "run-fails": {"__init__.py": "", "runtime/__init__.py": (
        "class Runtime:\n"
        "    @classmethod\n"
        "    def load(cls, path):\n"
        "        return cls()\n"
        "    def run(self, x):\n"
        "        raise ValueError('cannot run this')\n")},
}


@pytest.fixture(scope="module")
def broken_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    for tag, files in RUNTIMES.items():
        for name, text in files.items():
            (repo / "ternarize" / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / "ternarize" / name).write_text(text)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", tag], check=True)
        subprocess.run([*git, "tag", tag], check=True)
    return repo


@pytest.mark.parametrize(("tag", "says"), [
    ("raising", "cannot be imported (RuntimeError: boom at import)"),
    ("syntax", "cannot be imported (SyntaxError"),
    ("no-runtime-class", "cannot be imported (AttributeError"),
    ("run-fails", "cannot run batch 1 (ValueError: cannot run this)"),
])
def test_revisions_reports_a_broken_old_runtime_in_one_line(capsys, monkeypatch, broken_repo, tag, says):
    module = load("bench/revisions.py")
    monkeypatch.setattr(module, "ROOT", broken_repo)
    refused(capsys, module, tag, "--models", "mlp", "--width", "8", "--rounds", "1", "--block", "1", says=says)


def test_revisions_against_head_writes_json(capsys, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, err = call(capsys, load("bench/revisions.py"), "HEAD", "--models", "mlp", "--width", "8",
                             "--rounds", "1", "--block", "1", "--json", out)
    assert code == 0, err
    assert "working tree vs HEAD" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"] and '"rows"' in out.read_text()


def test_paper_mnist_prints_the_time_to_each_target_or_not_reached(capsys, monkeypatch):
    module = load("examples/paper_mnist.py")
    history = [{"epoch": 1, "test_acc": 0.986, "nonzero": 0.5, "seconds": 12.5},
               {"epoch": 2, "test_acc": 0.987, "nonzero": 0.4, "seconds": 10.0}]
    monkeypatch.setattr(module, "run", lambda *a, **k: module.summarize(history, width=8))
    code, out, _ = call(capsys, module, "--width", "8", "--epochs", "2")
    assert code == 0 and out.strip().endswith("time to 98.5%/98.8%: 12.5 s (epoch 1) / not reached")
