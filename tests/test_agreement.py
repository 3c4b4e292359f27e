"""One model, three executions: the torch model, the .tern file in the numpy runtime and the
.onnx file in onnxruntime agree within 1e-5 relative on every zoo model (100 random inputs)."""

import numpy as np
import pytest
import torch

from ternarize import Runtime, lower, tern
from ternarize import onnx as tonnx
from ternarize.testing import project, synthetic

CASES = [("mlp", 32, (1, 28, 28)), ("vgg", 0.125, (1, 28, 28)), ("vgg", 0.125, (3, 32, 32)),
         ("lenet", None, (1, 28, 28)), ("resnet", 8, (3, 32, 32)), ("resnet", 8, (1, 28, 28))]


@pytest.mark.parametrize("name, width, shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, _, s in CASES])
@pytest.mark.parametrize("kind, density", [("ternary", 0.05), ("ternary", 0.6), ("binary", 1.0)])
def test_torch_runtime_and_onnxruntime_agree(tmp_path, name, width, shape, kind, density):
    model = synthetic(name, width, in_shape=shape)[0]
    discrete = project(model, kind, density)
    x = np.random.default_rng(0).standard_normal((100, *shape)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    graph = lower(model, torch.from_numpy(x[:1]), discrete)
    tern.write(graph, tmp_path / "m.tern")
    tonnx.export(graph, tmp_path / "m.onnx")
    by_runtime = Runtime.load(tmp_path / "m.tern").run(x)
    by_onnx = tonnx.run(tonnx.session(tmp_path / "m.onnx"), x)
    scale = np.abs(reference).max()
    for label, got in (("runtime", by_runtime), ("onnxruntime", by_onnx)):
        assert np.abs(got - reference).max() <= 1e-5 * scale, label
    assert np.abs(by_runtime - by_onnx).max() <= 1e-5 * scale
