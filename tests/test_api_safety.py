"""The Python API on mistaken input: a ternarize Error with one line naming the problem, raised
before any work, and nothing of the caller's overwritten or executed."""

import pickle

import numpy as np
import pytest
import torch

import ternarize
from ternarize import tern
from ternarize.errors import ConfigError, DataError, LoweringError, ModelLoadError, TernFormatError
from ternarize.runtime import Runtime
from ternarize.train.loop import TrainConfig

QUIET = dict(epochs=1, batch_size=50, progress=False, log=lambda s: None)


def _tiny():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))


class _Payload:
    """Unpickling it would create the file named by ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_trust_must_be_a_bool(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f, protocol=2)
    for value in ("false", "no", 1, None):
        with pytest.raises(ModelLoadError, match="trust must be True or False"):
            ternarize.load_model(evil, trust=value)
    assert not marker.exists()


def test_compress_refuses_a_non_module_and_a_checkpoint_on_an_input(tmp_path):
    with pytest.raises(ConfigError, match="model must be a torch nn.Module or the path of a model file, got int"):
        ternarize.compress(5, "digits", out=str(tmp_path / "out"), **QUIET)
    model = tmp_path / "victim.pt"
    torch.save(_tiny(), model)
    before = model.read_bytes()
    with pytest.raises(ConfigError, match="the checkpoint .*victim.pt is one of the inputs"):
        ternarize.compress(str(model), "digits", out=str(tmp_path / "out"), checkpoint=str(model), **QUIET)
    assert model.read_bytes() == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("path, message", [("missing.tern", "cannot be opened .*No such file"),
                                           (".", "is a folder; give a .tern file"),
                                           (None, "must be a file name, not NoneType")])
def test_reading_a_tern_file_that_is_not_there(tmp_path, path, message):
    path = None if path is None else str(tmp_path / path)
    for read in (tern.read, tern.load, Runtime.load):
        with pytest.raises(TernFormatError, match=message):
            read(path)
    [(check, ok, text)] = tern.verify(path)
    assert (check, ok) == ("read", False) and text


def test_fit_checks_model_data_and_config_before_training():
    data = ternarize.load_dataset("digits")
    with pytest.raises(ConfigError, match="data must be a ternarize Dataset"):
        ternarize.fit(_tiny(), "digits", TrainConfig(**{k: v for k, v in QUIET.items() if k != "log"}))
    with pytest.raises(ConfigError, match="config must be a TrainConfig, got dict"):
        ternarize.fit(_tiny(), data, {"epochs": 1})
    few = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with pytest.raises(ConfigError, match="3 outputs but the data has 10 classes"):
        ternarize.fit(few, data, TrainConfig(epochs=1, progress=False))
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(ConfigError, match="does not accept the data's inputs of shape"):
        ternarize.fit(wide, data, TrainConfig(epochs=1, progress=False))
    with pytest.raises(ConfigError, match="teacher's outputs do not have the model's shape"):
        ternarize.fit(_tiny(), data, TrainConfig(epochs=1, progress=False, distill=True),
                      teacher=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12)))


def test_a_stray_huge_label_is_refused(tmp_path):
    y = np.zeros(40, np.int64)
    y[3] = 5_000_000
    np.savez(tmp_path / "d.npz", x=np.zeros((40, 4), np.float32), y=y)
    with pytest.raises(DataError, match="contains the label 5000000; labels are class indices 0..99999"):
        ternarize.load_dataset(str(tmp_path / "d.npz"))


def test_lower_names_unknown_discrete_parameters():
    model = _tiny()
    with pytest.raises(LoweringError, match="'1.weigth', which is not a parameter of the model"):
        ternarize.lower(model, torch.zeros(1, 1, 8, 8), discrete={"1.weigth": "ternary"})
    with pytest.raises(LoweringError, match="discrete must map parameter names"):
        ternarize.lower(model, torch.zeros(1, 1, 8, 8), discrete=["1.weight"])
    with pytest.raises(LoweringError, match="needs a torch nn.Module, got NoneType"):
        ternarize.lower(None, torch.zeros(1, 1, 8, 8))


def test_keep_float_takes_one_pattern_as_a_string():
    assert TrainConfig(keep_float="first").keep_float == ("first",)
    assert TrainConfig(keep_float=None).keep_float == ()
    assert TrainConfig(keep_float=["a*", "last"]).keep_float == ("a*", "last")
    with pytest.raises(ConfigError, match="keep_float must be glob strings"):
        TrainConfig(keep_float=5).validate()


def test_writers_need_a_graph(tmp_path):
    from ternarize import onnx as tonnx
    from ternarize.errors import ExportError, GraphError

    with pytest.raises(GraphError, match="holds a Graph .*got Sequential"):
        tern.write(_tiny(), tmp_path / "m.tern")
    with pytest.raises(ExportError, match="export needs a Graph .*got dict"):
        tonnx.export({}, tmp_path / "m.onnx")
    graph = ternarize.lower(_tiny(), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="encodings must map constant names"):
        tern.write(graph, tmp_path / "m.tern", encodings=["t2"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, kwargs, message", [
    ("mlp", {"width": 0}, "width must be a whole number above 0 and at most 1,048,576, got 0"),
    ("mlp", {"width": 4.5}, "width must be a whole number"),
    ("mlp", {"depth": float("nan")}, "depth must be a whole number"),
    ("vgg", {"width": -1}, "width must be a number above 0 and at most 1024, got -1"),
    ("resnet", {"blocks": True}, "blocks must be a whole number"),
    ("mlp", {"num_classes": 0}, r"num_classes must be a whole number from 1 to 1,048,576, got 0"),
    ("lenet", {"num_classes": -3}, r"num_classes must be a whole number from 1"),
    ("mlp", {"in_shape": (1, 0, 8)}, r"in_shape must be \(channels, height, width\), three whole numbers of at "
                                     r"least 1 whose product is at most 4,294,967,296, got \(1, 0, 8\)"),
    ("mlp", {"in_shape": (1 << 24,) * 3}, r"in_shape must be \(channels, height, width\)"),
    ("vgg", {"in_shape": (3, 32)}, r"in_shape must be \(channels, height, width\)"),
])
def test_zoo_sizes_are_checked(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ternarize.zoo.create(name, **kwargs)
    assert ternarize.zoo.create("mlp", in_shape=(1, 8, 8), width=16.0, depth=1)[1].out_features == 16


def test_fit_float_checks_its_settings_before_training():
    from ternarize.train.loop import fit_float

    data = ternarize.load_dataset("digits")
    for kwargs, message in (({"lr": float("nan")}, "lr must be a finite number"), ({"seed": -1}, "seed must be"),
                            ({"epochs": 0}, "epochs must be from 1 to"), ({"device": "tpu"}, "device 'tpu'")):
        with pytest.raises(ConfigError, match=message):
            fit_float(_tiny(), data, progress=False, log=lambda s: None, **kwargs)
    with pytest.raises(ConfigError, match="does not accept the data's inputs"):
        fit_float(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 10)), data, progress=False)
