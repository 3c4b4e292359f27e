"""Output folders and option checks of compress and demo: nothing of the user's is touched, nothing
half-written stays, and what can be checked before training is checked before training."""

import contextlib
import copy
import errno
import math
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import ternarize
from ternarize import _io, demo, pipeline
from ternarize._io import atomic_write, check_output, is_temp_of, temp_name
from ternarize.cli import cli
from ternarize.errors import ConfigError, OutputError, TrainingError
from ternarize.train.loop import TrainConfig

QUIET = dict(epochs=1, batch_size=50, progress=False, log=lambda s: None)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), path)
    return path


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts."""
    def fit(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(pipeline, "fit", fit)


# ---------------------------------------------------------------------- temp names


def test_temp_names_are_recognised_only_for_the_given_outputs():
    name = temp_name("model.tern")
    assert is_temp_of(name, ("model.tern",)) and not is_temp_of(name, ("model.onnx",))
    assert is_temp_of(temp_name("layers.png", ".png"), ("layers.png",))
    for user in ("template.tmpl", "report.tmp.bak", "cache.tmp", ".model.tern.tmp.xyz",
                 ".model.tern.tmp.0123456789abX"):
        assert not is_temp_of(user, ("model.tern", "report")), user


def test_check_output_refuses_folders_inputs_and_missing_parents(tmp_path):
    src = tmp_path / "x.npy"
    src.write_bytes(b"data")
    with pytest.raises(OutputError, match="is the input file"):
        check_output(src, inputs=[src])
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path)
    with pytest.raises(OutputError, match="does not exist; create it"):
        check_output(tmp_path / "nodir" / "o.npy")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(src / "o.npy")
    with pytest.raises(OutputError, match="empty"):
        check_output("")
    assert check_output(tmp_path / "o.npy", inputs=[src]) == str(tmp_path / "o.npy")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_atomic_write_never_replaces_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        atomic_write(fifo, b"x")
    assert not fifo.is_file() and sorted(os.listdir(tmp_path)) == ["pipe"]


def test_a_path_ending_in_a_separator_is_not_a_file_name(tmp_path):
    for call in (lambda p: check_output(p), lambda p: atomic_write(p, b"x")):
        with pytest.raises(OutputError, match="ends with a folder separator"):
            call(str(tmp_path / "nodir") + "/")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no links here")
def test_a_link_is_written_through_and_a_link_to_a_fifo_refused(tmp_path):
    (tmp_path / "real.npy").write_bytes(b"old")
    os.symlink(tmp_path / "real.npy", tmp_path / "link.npy")
    atomic_write(tmp_path / "link.npy", b"new")
    assert os.path.islink(tmp_path / "link.npy") and (tmp_path / "real.npy").read_bytes() == b"new"
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        os.symlink(tmp_path / "pipe", tmp_path / "to-pipe")
        with pytest.raises(OutputError, match="not a regular file"):
            check_output(tmp_path / "to-pipe")
        with pytest.raises(OutputError, match="not a regular file"):
            atomic_write(tmp_path / "to-pipe", b"x")
        assert os.path.islink(tmp_path / "to-pipe")


def test_link_loops_long_names_and_unwritable_folders(tmp_path):
    if hasattr(os, "symlink"):
        os.symlink(tmp_path / "l2", tmp_path / "l1")
        os.symlink(tmp_path / "l1", tmp_path / "l2")
        with pytest.raises(OutputError, match="a link that leads to no file"):
            atomic_write(tmp_path / "l1", b"x")
        assert os.path.islink(tmp_path / "l1")
    long = tmp_path / ("a" * 245)  # fits a file name, but not with the temp name's additions
    atomic_write(long, b"x")
    assert long.read_bytes() == b"x" and not [n for n in os.listdir(tmp_path) if ".tmp." in n]
    with pytest.raises(OutputError, match="longer than 255 bytes"):
        check_output(tmp_path / ("a" * 300))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if not os.access(locked, os.W_OK):  # root writes anyway
        with pytest.raises(OutputError, match="is not writable"):
            check_output(locked / "o.npy")


def test_a_full_disk_while_saving_a_model_is_an_output_error(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*m\.pt: No space left on device; free some disk space"):
        ternarize.save_model(torch.nn.Linear(2, 2), tmp_path / "m.pt")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- the output folder


def test_user_files_with_tmp_in_their_names_are_kept(tiny, tmp_path, no_training):
    out = tmp_path / "userdir"
    out.mkdir()
    for name in ("template.tmpl", "report.tmp.bak", "notes.txt"):
        (out / name).write_text(name)
    (out / "cache.tmp").mkdir()
    with pytest.raises(ConfigError, match="already holds"):
        ternarize.compress(str(tiny), "digits", out=str(out), **QUIET)
    assert sorted(os.listdir(out)) == ["cache.tmp", "notes.txt", "report.tmp.bak", "template.tmpl"]


def test_stale_temp_files_of_a_killed_run_are_removed_and_do_not_block(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / temp_name("model.tern")
    stale.write_bytes(b"half")
    (out / (pipeline.PROBE + "abc")).write_bytes(b"")
    result = ternarize.compress(str(tiny), "digits", out=str(out), **QUIET)
    assert result.accuracy > 0 and not stale.exists()
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_an_input_named_like_an_output_is_never_removed(tiny, tmp_path, no_training):
    out = tmp_path / "out"
    out.mkdir()
    model = out / "checkpoint.pt"
    model.write_bytes(tiny.read_bytes())
    with pytest.raises(ConfigError, match="has the name of an output"):
        ternarize.compress(str(model), "digits", out=str(out), force=True, **QUIET)
    assert model.read_bytes() == tiny.read_bytes()


def test_the_folders_a_failed_run_made_are_all_removed(tiny, tmp_path, monkeypatch):
    def diverge(*args, **kwargs):
        raise TrainingError("the training loss became nan in epoch 1")
    monkeypatch.setattr(pipeline, "fit", diverge)
    with pytest.raises(TrainingError):
        ternarize.compress(str(tiny), "digits", out=str(tmp_path / "p1" / "p2" / "p3"), **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["tiny.pt"]


def test_a_folder_where_an_output_goes_is_refused_before_training(tiny, tmp_path, no_training):
    out = tmp_path / "out"
    (out / "model.tern").mkdir(parents=True)
    with pytest.raises(ConfigError, match="model.tern is not a regular file"):
        ternarize.compress(str(tiny), "digits", out=str(out), force=True, **QUIET)
    assert os.listdir(out) == ["model.tern"]


def test_an_unwritable_folder_fails_before_training(tiny, tmp_path, monkeypatch, no_training):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(pipeline.tempfile, "mkstemp", refuse)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="cannot write to the output folder .*Read-only file system; choose another"):
        ternarize.compress(str(tiny), "digits", out=str(out), **QUIET)
    assert not out.exists()  # the folder this run made is gone again


def test_out_below_a_file_is_refused_first(tiny, tmp_path, no_training):
    res = invoke("compress", tiny, "--data", "digits", "--out", tiny / "sub", "--epochs", "1")
    assert res.exit_code == 2 and "is a file, not a folder" in res.stderr and "\n" not in res.stderr.strip()


def test_a_failure_after_training_removes_the_outputs_and_keeps_the_checkpoint(tiny, tmp_path, monkeypatch):
    import ternarize.onnx as onnx_export

    def full(*args, **kwargs):
        raise OutputError("cannot write model.onnx: No space left on device; free some disk space")
    monkeypatch.setattr(onnx_export, "export", full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left.*kept in .*checkpoint.pt: rerun with --resume"):
        ternarize.compress(str(tiny), "digits", out=str(out), **QUIET)
    assert os.listdir(out) == ["checkpoint.pt"]  # complete, for --resume once there is room


def test_a_failed_training_leaves_no_empty_folder(tiny, tmp_path, monkeypatch):
    def diverge(*args, **kwargs):
        raise TrainingError("the training loss became nan in epoch 1")
    monkeypatch.setattr(pipeline, "fit", diverge)
    out = tmp_path / "out"
    with pytest.raises(TrainingError):
        ternarize.compress(str(tiny), "digits", out=str(out), **QUIET)
    assert not out.exists()


def test_a_failed_demo_removes_its_float_model_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "fit_float", lambda *args, **kwargs: None)

    def fail(path, *args, resumable=True, **kwargs):
        assert os.path.isfile(path) and not resumable  # the demo has no --resume: no checkpoint kept
        (tmp_path / "demo" / "checkpoint.pt").write_bytes(b"state")
        raise TrainingError("the training loss became nan in epoch 1")
    monkeypatch.setattr(demo, "compress", fail)
    out = tmp_path / "demo"
    with pytest.raises(TrainingError):
        demo.run(out=str(out), progress=False, log=lambda s: None)
    assert not out.exists()


def test_the_demo_runs_and_a_failed_rerun_with_force_keeps_its_outputs(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    result = demo.run(out=str(out), epochs=1, progress=False, log=lambda s: None)
    assert result.runtime_accuracy > 0.5
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert sorted(before) == sorted(pipeline.OUTPUTS + (pipeline.FLOAT_MODEL,))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run(out=str(out), force=True, epochs=1, progress=False, log=lambda s: None)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_a_full_folder_is_refused_with_the_options_each_command_has(tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", "--out", str(out)])
    assert result.exit_code == 2 and "pass --force to overwrite it" in result.stderr
    assert "--resume" not in result.stderr  # the demo has none
    with pytest.raises(ConfigError, match="pass --force to overwrite it or --resume to continue"):
        pipeline.check_out(str(out), force=False, resume=False)
    assert os.listdir(out) == ["notes.txt"]


@pytest.mark.parametrize("kept_origin", [True, False])
def test_resume_from_another_models_checkpoint_is_refused(tmp_path, kept_origin):
    out = tmp_path / "out"
    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    ck = out / "checkpoint.pt"
    ternarize.fit(small, ternarize.load_dataset("digits"),
                  TrainConfig(epochs=1, batch_size=50, progress=False, checkpoint=str(ck)), log=lambda s: None)
    if not kept_origin:  # a checkpoint written before the fingerprints were kept: the weights tell
        state = torch.load(ck, weights_only=True)
        del state["origin"]
        torch.save(state, ck)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    message = ("made from another float model .*or start over" if kept_origin
               else "was made for a different model .*start over without --resume")
    lines = []
    with pytest.raises(ConfigError, match=message):
        ternarize.compress(other, "digits", out=str(out), resume=True, **{**QUIET, "log": lines.append})
    assert lines == []  # not even the float model's accuracy before the refusal


def test_resume_past_the_epochs_is_refused_before_anything_is_logged(tmp_path):
    out = tmp_path / "out"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    ternarize.fit(copy.deepcopy(model), ternarize.load_dataset("digits"),
                  TrainConfig(epochs=2, batch_size=50, progress=False, checkpoint=str(out / "checkpoint.pt")),
                  log=lambda s: None)
    lines = []
    with pytest.raises(ConfigError, match="has trained 2 epochs, more than --epochs 1; resume with --epochs 2"):
        ternarize.compress(model, "digits", out=str(out), resume=True, **{**QUIET, "log": lines.append})
    assert lines == []
    ternarize.compress(model, "digits", out=str(out), resume=True, **{**QUIET, "epochs": 2, "log": lines.append})
    assert lines[0].startswith("float model: test accuracy") and lines[1].startswith("resuming after epoch 2 of 2")


# ---------------------------------------------------------------------- options


def test_numpy_scalars_are_options_too():
    import numpy as np

    TrainConfig(seed=np.int64(3), lr=np.float32(1e-3), lam=np.float64(0)).validate()
    for kw in ({"lam": None}, {"device": None}, {"lr": 10 ** 400}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            TrainConfig(**kw).validate()


@pytest.mark.parametrize("field, value", [("lam", math.inf), ("rho", math.inf), ("lr", math.inf), ("lr", math.nan),
                                          ("ema_decay", math.nan), ("seed", 1 << 32), ("seed", -1)])
def test_non_finite_and_out_of_range_options_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("field, value, message", [("lr", 1e38, "lr must be at most 1000 .*got 1e\\+38"),
                                                   ("rho", 1e300, "rho must be at most 1000"),
                                                   ("lam", 1e30, "lam must be at most 1e\\+06")])
def test_absurd_steering_values_are_refused_before_a_float32_overflow(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value}).validate()
    TrainConfig(**{field: value / value * (1000 if field != "lam" else 1e6)}).validate()  # the bound itself is fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_devices_and_tf32_are_refused_without_a_gpu(tiny, tmp_path, no_training):
    with pytest.raises(ConfigError, match="'cuda:3' was asked for"):
        TrainConfig(device="cuda:3").validate()
    with pytest.raises(ConfigError, match="tf32 needs a CUDA GPU"):
        TrainConfig(precision="tf32").validate()
    res = invoke("compress", tiny, "--data", "digits", "--out", tmp_path / "out", "--device", "tpu")
    assert res.exit_code == 2 and "device 'tpu' is unknown" in res.stderr and "float model" not in res.stderr
    assert not (tmp_path / "out").exists()
    res = invoke("compress", tiny, "--data", "digits", "--out", tmp_path / "out", "--cuda-graphs", "on",
                 "--device", "cpu")
    assert res.exit_code == 2 and "cuda_graphs 'on' needs a CUDA GPU" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_cuda_graphs_option_reaches_training(tiny, tmp_path, monkeypatch):
    seen = []

    def fit(model, data, config, **kwargs):
        seen.append(config.cuda_graphs)
        raise AssertionError("stop here")

    monkeypatch.setattr(pipeline, "fit", fit)
    for value in ("off", "auto"):
        invoke("compress", tiny, "--data", "digits", "--out", tmp_path / value, "--cuda-graphs", value)
    assert seen == ["off", "auto"]
    res = invoke("compress", tiny, "--data", "digits", "--out", tmp_path / "x", "--cuda-graphs", "maybe")
    assert res.exit_code == 2 and "--cuda-graphs" in res.stderr


def test_options_are_checked_on_the_command_line_before_anything_is_made(tiny, tmp_path, no_training):
    for args in (["--lam", "inf"], ["--seed", str(10 ** 23)], ["--lr", "nan"]):
        res = invoke("compress", tiny, "--data", "digits", "--out", tmp_path / "out", *args)
        assert res.exit_code == 2 and "\n" not in res.stderr.strip(), (args, res.stderr)
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- two runs, signals, --force


HOLD = """
import sys, time
from ternarize._io import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_a_locked_folder_stops_and_a_stale_lock_does_not_block(tiny, tmp_path, no_training):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputError, match="another ternarize run is writing to .*out; wait for it"):
            ternarize.compress(str(tiny), "digits", out=str(out), **QUIET)
        res = invoke("compress", tiny, "--data", "digits", "--out", out, "--epochs", "1")
        assert res.exit_code == 2 and "another ternarize run is writing" in res.stderr
        assert "\n" not in res.stderr.strip()
        # what the running run has written so far is its own: not a folder to --force or --resume
        (out / "checkpoint.pt").write_bytes(b"")
        for extra in ([], ["--resume"], ["--force"]):
            res = invoke("compress", tiny, "--data", "digits", "--out", out, "--epochs", "1", *extra)
            assert res.exit_code == 2 and res.stderr.startswith("ternarize: another ternarize run is writing"), extra
        before = sorted(os.listdir(tmp_path))
        assert not _io.busy(str(tmp_path))  # a folder without a lock file: nobody to ask, nothing made
        assert sorted(os.listdir(tmp_path)) == before
        (out / "checkpoint.pt").unlink()
    finally:
        holder.kill()  # killed: its lock file stays, but the operating system drops the lock
        holder.wait()
    assert os.listdir(out) == [_io.LOCK]
    with pytest.raises(AssertionError, match="training started"):
        ternarize.compress(str(tiny), "digits", out=str(out), **QUIET)
    assert os.listdir(out) == []
    with _io.folder_lock(str(out)) as nested:  # within one process the lock is re-entrant (the demo's)
        with _io.folder_lock(str(out)) as inner:
            assert not nested and inner
        assert os.listdir(out) == [_io.LOCK]
    assert os.listdir(out) == []


def test_the_lock_is_taken_again_when_its_file_is_replaced(tmp_path, monkeypatch):
    """A holder removes the lock file as it leaves: a run that opened the old file takes a new one."""
    opened = []
    real_open = os.open

    def open_and_swap(path, *args):
        fd = real_open(path, *args)
        if not opened:  # the holder leaves between our open and our lock
            os.unlink(path)
            real_open(path, os.O_RDWR | os.O_CREAT)
        opened.append(path)
        return fd
    monkeypatch.setattr(_io.os, "open", open_and_swap)
    with _io.folder_lock(str(tmp_path)):
        assert len(opened) == 2
    assert os.listdir(tmp_path) == []


@pytest.fixture
def finished(tiny, tmp_path):
    """An output folder of a finished run, and its files' bytes."""
    out = tmp_path / "done"
    ternarize.compress(str(tiny), "digits", out=str(out), **QUIET)
    return out, {n: (out / n).read_bytes() for n in os.listdir(out)}


@pytest.mark.parametrize("failure", [KeyboardInterrupt, TrainingError])
def test_force_keeps_the_previous_outputs_until_the_new_ones_are_written(tiny, finished, monkeypatch, failure):
    out, before = finished
    seen = []

    def stop(*args, **kwargs):
        seen.append(sorted(os.listdir(out)))
        raise failure("stopped in training")
    monkeypatch.setattr(pipeline, "fit", stop)
    with pytest.raises(failure):
        ternarize.compress(str(tiny), "digits", out=str(out), force=True, **QUIET)
    assert seen == [sorted([_io.LOCK, pipeline.PREVIOUS])]  # set aside during the run
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_force_replaces_the_previous_outputs_once_the_new_ones_are_written(tiny, finished):
    out, before = finished
    (out / "notes.txt").write_text("mine")
    ternarize.compress(str(tiny), "digits", out=str(out), force=True, seed=1, **QUIET)
    assert sorted(os.listdir(out)) == sorted([*before, "notes.txt"])
    assert (out / "model.tern").read_bytes() != before["model.tern"]


def test_previous_outputs_a_killed_run_set_aside_are_put_back_never_deleted(tiny, tmp_path, no_training):
    out = tmp_path / "out"
    (out / pipeline.PREVIOUS).mkdir(parents=True)
    (out / pipeline.PREVIOUS / "model.tern").write_bytes(b"old")
    with pytest.raises(ConfigError, match="already holds model.tern; pass --force"):
        ternarize.compress(str(tiny), "digits", out=str(out), **QUIET)
    assert os.listdir(out) == ["model.tern"] and (out / "model.tern").read_bytes() == b"old"
    (out / pipeline.PREVIOUS).mkdir()
    (out / pipeline.PREVIOUS / "model.tern").write_bytes(b"older")
    with pytest.raises(OutputError, match="holds model.tern of an earlier run.*remove that folder"):
        ternarize.compress(str(tiny), "digits", out=str(out), force=True, **QUIET)
    assert (out / pipeline.PREVIOUS / "model.tern").read_bytes() == b"older"
    assert (out / "model.tern").read_bytes() == b"old"


def test_a_signal_while_the_previous_outputs_are_set_aside_puts_them_all_back(tiny, finished, monkeypatch):
    out, before = finished
    real_replace = os.replace

    def replace_then_stop(a, b):
        real_replace(a, b)
        if pipeline.PREVIOUS in str(b):
            raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ternarize.compress(str(tiny), "digits", out=str(out), force=True, **QUIET)
    monkeypatch.setattr(pipeline.os, "replace", real_replace)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_an_interrupt_after_the_last_output_keeps_the_checkpoint(tiny, finished, monkeypatch):
    """The checkpoint goes only with the commit of the new outputs: an interrupt just before it
    puts the previous outputs back and keeps the training for --resume."""
    out, before = finished
    write = pipeline._write_outputs

    def written_then_interrupted(*args, **kwargs):
        write(*args, **kwargs)  # every output is written; the folder is not committed yet
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "_write_outputs", written_then_interrupted)
    with pytest.raises(KeyboardInterrupt, match="the training is kept in .*checkpoint.pt: rerun with --resume"):
        ternarize.compress(str(tiny), "digits", out=str(out), force=True, epochs=1, progress=False,
                           log=lambda m: None)
    monkeypatch.setattr(pipeline, "_write_outputs", write)
    kept = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert kept.pop("checkpoint.pt") and kept == before
    ternarize.compress(str(tiny), "digits", out=str(out), force=True, resume=True, progress=False, epochs=1,
                       log=lambda m: None)
    assert not (out / "checkpoint.pt").exists() and sorted(os.listdir(out)) == sorted(before)


def test_another_thread_is_refused_as_another_process_is(tmp_path):
    import threading
    errors = []

    def second():
        try:
            with _io.folder_lock(str(tmp_path)):
                pass
        except OutputError as e:
            errors.append(str(e))
    with _io.folder_lock(str(tmp_path)):
        t = threading.Thread(target=second)
        t.start()
        t.join()
    assert len(errors) == 1 and "another ternarize run" in errors[0]


def test_an_interrupt_names_the_checkpoint_it_keeps(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def interrupted(model, dataset, config, log, **kw):
        with open(config.checkpoint, "wb") as f:
            f.write(b"an epoch")
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "fit", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    res = invoke("compress", tiny, "--data", "digits", "--out", out, "--epochs", "1")
    assert res.exit_code == 130
    assert res.stderr.strip().splitlines()[-1] == (f"ternarize: interrupted; the training is kept in "
                                                   f"{out / 'checkpoint.pt'}: rerun with --resume to continue")
    assert os.listdir(out) == ["checkpoint.pt"]
    assert signal.getsignal(signal.SIGTERM) == before  # the command line's handlers are undone


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)])
def test_sigterm_and_sighup_roll_back_as_ctrl_c_does(finished, tiny, tmp_path, signum):
    out, before = finished
    cmd = [sys.executable, "-m", "ternarize", "compress", str(tiny), "--data", "digits", "--out", str(out),
           "--force", "--epochs", "10000", "--batch-size", "2", "--no-progress"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 600
        while "float model" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until the training starts
        assert "float model" in log.read_text(), log.read_text()  # else the signal would find no handler yet
        time.sleep(0.05)
        proc.send_signal(signum)
        time.sleep(0.01)
        proc.send_signal(signum)  # a second one does not cut the clean-up short
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = log.read_text()
    assert proc.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ternarize: stopped by {signal.Signals(signum).name}")
    assert "Traceback" not in err
    after = {n: (out / n).read_bytes() for n in os.listdir(out)}
    kept = f"; the training is kept in {out / 'checkpoint.pt'}: rerun with --resume to continue"
    if last.endswith(kept):  # a fast machine saved an epoch first: its checkpoint stays, as after Ctrl-C
        assert "epoch 1/" in err and after.pop("checkpoint.pt")
    else:
        assert last == f"ternarize: stopped by {signal.Signals(signum).name}", last
    assert after == before


_SLOW_STOP = """
import os, signal, sys, time
from ternarize import cli
from ternarize import data as datasets

WHERE = sys.argv[1]

class SlowTeardown:  # deleted in the interpreter's last teardown, after it has reset the signal handlers
    def __del__(self, write=os.write, read=os.read):
        write(2, b"in the last teardown\\n")
        read(0, 1)  # until the test has sent its signal

keep = SlowTeardown()

def status(_folder):
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        if WHERE == "hang":  # a stop that does not end
            print("stopping", file=sys.stderr, flush=True)
            time.sleep(30)

datasets.status = status
sys.argv[1:] = ["data", "list"]
cli.main()
"""


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("where", ["hang", "teardown"])
def test_further_signals_while_stopping_keep_the_exit_status(tmp_path, where):
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_STOP)
    proc = subprocess.Popen([sys.executable, str(script), where], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    waits_for = "stopping" if where == "hang" else "in the last teardown"
    try:
        lines = []
        while not any(line.startswith(waits_for) for line in lines) and proc.poll() is None:
            lines.append(proc.stderr.readline())
        assert proc.poll() is None, "".join(lines)  # it waits for our signals
        if where == "hang":  # the second is kept (the same stop), the third ends the process at once
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
        else:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(BrokenPipeError):  # killed by it: the assertion below says so
                proc.stdin.write("x")
                proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    err = "".join(lines) + proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    if where == "hang":  # ended at once, and says so
        assert last == "ternarize: stopped by SIGTERM while stopping: ended at once, without the clean-up", err
    else:
        assert last == "in the last teardown" and "ternarize: stopped by SIGTERM\n" in err, err


def test_a_second_signal_before_the_clean_up_waits_for_it(monkeypatch):
    """The first signal's interrupt may still be unwinding towards its clean-up (OutputFolder.__exit__)
    when a second one comes: that one must not end the process before the previous outputs are back."""
    from ternarize import cli as cli_module

    class Exited(Exception):
        pass

    def exit_now(status):
        exits.append(status)
        raise Exited
    exits = []
    monkeypatch.setattr(cli_module, "_STOPPING", [])
    monkeypatch.setattr(cli_module, "_STOPPED", [])
    monkeypatch.setattr(cli_module.os, "_exit", exit_now)
    with pytest.raises(_io.Stopped):
        cli_module._on_signal(signal.SIGTERM, None)
    cli_module._on_signal(signal.SIGTERM, None)  # still unwinding: kept
    assert exits == []
    with pytest.raises(Exited):
        cli_module._on_signal(signal.SIGTERM, None)  # a third ends it at once
    assert exits == [128 + signal.SIGTERM]


def test_a_signal_during_a_clean_up_waits_for_its_end():
    from ternarize import cli as cli_module
    done = []
    with pytest.raises(_io.Stopped) as info:
        with _io.signals_deferred():
            cli_module._on_signal(signal.SIGTERM, None)  # kept, not raised: the clean-up goes on
            done.append("cleaned")
    assert done == ["cleaned"] and info.value.signum == signal.SIGTERM and not cli_module._STOPPING
    with pytest.raises(ValueError):  # an error leaving the clean-up goes on; the signal is dropped
        with _io.signals_deferred():
            cli_module._on_signal(signal.SIGINT, None)
            raise ValueError("clean-up failed")
    with _io.signals_deferred():
        pass  # nothing is pending any more


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_signals_the_caller_ignores_stay_ignored(tiny, tmp_path, monkeypatch):
    """nohup (SIGHUP) and background jobs (SIGINT) ignore signals: the command line keeps that."""
    seen = []

    def record(*args, **kwargs):
        seen.append((signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)))
        raise TrainingError("the training loss became nan in epoch 1")
    monkeypatch.setattr(pipeline, "fit", record)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        res = invoke("compress", tiny, "--data", "digits", "--out", tmp_path / "out", "--epochs", "1")
    finally:
        signal.signal(signal.SIGHUP, before)
    assert res.exit_code == 2 and seen[0][0] == signal.SIG_IGN and seen[0][1] not in (signal.SIG_IGN, signal.SIG_DFL)


def test_an_argument_that_is_not_utf8_is_refused_first(tiny, tmp_path):
    res = invoke("compress", tiny, "--data", "digits", "--out", str(tmp_path / "o\udcff"))
    assert res.exit_code == 2 and "is not UTF-8 text" in res.stderr and "\n" not in res.stderr.strip()
    assert os.listdir(tmp_path) == ["tiny.pt"]


def test_epochs_have_an_upper_bound(tiny, no_training):
    res = invoke("compress", tiny, "--data", "digits", "--epochs", "99999999999999999999")
    assert res.exit_code == 2 and "--epochs" in res.stderr
    with pytest.raises(ConfigError, match="epochs must be from 1 to 100000"):
        TrainConfig(epochs=100_001).validate()
    from ternarize.cli import MAX_EPOCHS
    from ternarize.train.loop import MAX_EPOCHS as TRAIN_MAX
    assert MAX_EPOCHS == TRAIN_MAX


# ---------------------------------------------------------------------- single files


def test_create_only_writes_refuse_a_file_that_appeared_and_replacing_keeps_its_mode(tmp_path):
    path = tmp_path / "y.npy"
    with pytest.raises(OutputError, match="appeared while this command ran"):
        with _io.atomic_path(path, create=True) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"ours")
            path.write_bytes(b"theirs")  # another program, meanwhile
    assert path.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["y.npy"]
    path.chmod(0o600)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    atomic_write(tmp_path / "z.npy", b"new", create=True)
    assert (tmp_path / "z.npy").read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["y.npy", "z.npy"]


def test_inputs_that_are_not_files_are_named_for_what_they_are(tiny, tmp_path, no_training):
    golden = os.path.join(os.path.dirname(__file__), "..", "formats", "golden", "tiny.tern")
    cases = {"missing.npz": "does not exist", "folder.npz": "is a folder"}
    (tmp_path / "folder.npz").mkdir()
    if hasattr(os, "symlink"):
        os.symlink(tmp_path / "l2.npz", tmp_path / "l1.npz")
        os.symlink(tmp_path / "l1.npz", tmp_path / "l2.npz")
        os.symlink(tmp_path / "nothing", tmp_path / "dangling.npz")
        cases |= {"l1.npz": "a link that leads to no file", "dangling.npz": "a link that leads to no file"}
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.npz")
        cases["fifo.npz"] = "not a regular file"
    for name, message in cases.items():
        path = str(tmp_path / name)
        for args in (["inspect", path], ["run", golden, "--input", path], ["compress", path, "--data", "digits"],
                     ["compress", tiny, "--data", path], ["report", path]):
            if args[0] == "report" and name == "folder.npz":
                continue  # report reads a folder made by compress
            res = invoke(*args)
            assert res.exit_code == 2 and message in res.stderr, (args, res.stderr)
    if hasattr(os, "symlink"):
        res = invoke("compress", tiny, "--data", "digits", "--out", tmp_path / "l1.npz")
        assert res.exit_code == 2 and "a link that leads to no folder" in res.stderr


PROBE = """
import sys, time
from ternarize._io import busy
end = time.monotonic() + float(sys.argv[2])
print("probing", flush=True)
n = 0
while time.monotonic() < end:
    busy(sys.argv[1])
    n += 1
print(n)
"""


def test_asking_whether_a_folder_is_busy_never_refuses_a_run_taking_it(tmp_path):
    """busy() takes the lock for a moment (shared, read-only); a run taking it then waits instead
    of being refused."""
    prober = subprocess.Popen([sys.executable, "-c", PROBE, str(tmp_path), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert prober.stdout.readline() == "probing\n"
        taken = 0
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            with _io.folder_lock(str(tmp_path)):
                taken += 1
    finally:
        probes = int(prober.stdout.read() or 0)
        prober.wait()
    assert taken > 20 and probes > 100
