"""The example scripts keep working (small settings)."""

import subprocess
import sys
from pathlib import Path

import ternarize

ROOT = Path(__file__).resolve().parents[1]


def test_train_float_saves_a_model_that_loads_without_trust(tmp_path):
    out = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_float.py"), "--model", "lenet", "--data",
                           "digits", "--epochs", "1", "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test accuracy" in proc.stdout
    model = ternarize.load_model(out)
    assert type(model).__name__ == "LeNet"


def test_train_float_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_float.py"), "--data", "imagenet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown dataset" in proc.stderr
