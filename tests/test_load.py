"""Tests for ternarize.load: good files load, bad input fails with one clear line, and a hostile
pickle never runs."""

from __future__ import annotations

import copy
import os
import sys
import zipfile

import pytest
import torch
from torch import nn

from ternarize import zoo
from ternarize.errors import ModelLoadError, UnsafeModelError
from ternarize.load import load_model, parse_arch

# Small versions of every zoo model, with inputs of the matching shape.
ZOO_CASES = {
    "mlp": ({"width": 16, "depth": 2, "in_shape": (1, 8, 8)}, (4, 1, 8, 8)),
    "vgg": ({"width": 0.05, "fc": 16, "in_shape": (3, 8, 8)}, (4, 3, 8, 8)),
    "lenet": ({"in_shape": (1, 8, 8)}, (4, 1, 8, 8)),
    "resnet": ({"width": 4, "in_shape": (3, 8, 8)}, (4, 3, 8, 8)),
}
MLP_SPEC = "mlp(width=16, depth=2, in_shape=(1, 8, 8))"


# --- objects pickled by the tests (module level so pickle can name them) --------------------------


class CustomNet(nn.Module):
    """A user-defined module: not a torch.nn built-in nor a zoo model."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x).relu()


def touch_marker(path):
    """What a hostile pickle calls: it leaves a file behind, so a test can tell it ran."""
    with open(path, "w") as f:
        f.write("ran")
    return "pwned"


class WritesMarker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (touch_marker, (self.path,))


class RunsShell:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class Evals:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (eval, (f"open({self.path!r}, 'w').write('ran')",))


# --- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(params=["scan", "fallback"])
def mode(request, monkeypatch):
    """'scan' checks globals with torch's get_unsafe_globals_in_checkpoint; 'fallback' hides it,
    as on torch < 2.5, so the load-refuse-retry path runs."""
    if request.param == "fallback":
        monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
    return request.param


@pytest.fixture(autouse=True)
def no_leaked_safe_globals():
    """Loading must leave torch's process-wide allowlist as it found it."""
    before = set(torch.serialization.get_safe_globals())
    yield
    # torch may register its own entries meanwhile (lazily imported DTensor types): ignore those.
    leaked = set(torch.serialization.get_safe_globals()) - before
    ours = ("torch.nn", "torch._utils", "torch._C._nn", "ternarize", "builtins", "collections")
    assert not [g for g in leaked if getattr(g, "__module__", "").startswith(ours)]


def small_mlp():
    torch.manual_seed(0)
    return zoo.create("mlp", width=16, depth=2, in_shape=(1, 8, 8)).eval()


def same_outputs(a: nn.Module, b: nn.Module, shape) -> None:
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b(x), rtol=0, atol=0)


# --- good input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_full_zoo_module_loads_without_trust(tmp_path, mode, name):
    kwargs, shape = ZOO_CASES[name]
    torch.manual_seed(0)
    model = zoo.create(name, **kwargs)
    torch.save(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert type(loaded) is type(model) and not loaded.training
    same_outputs(model, loaded, shape)


def test_sequential_of_builtins_loads(tmp_path, mode):
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.GELU(), nn.Flatten(),
        nn.Dropout(0.1), nn.Linear(32, 4), nn.LayerNorm(4),
        nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, batch_first=True),
    )
    torch.save(model, tmp_path / "seq.pt")
    loaded = load_model(str(tmp_path / "seq.pt"))
    assert isinstance(loaded, nn.Sequential)
    same_outputs(model, loaded, (3, 2, 8))


def test_state_dict_with_zoo_arch_and_kwargs(tmp_path):
    model = small_mlp()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    said = []
    loaded = load_model(tmp_path / "w.pt", arch=MLP_SPEC, log=said.append)
    same_outputs(model, loaded, (4, 1, 8, 8))
    assert said == []
    torch.save(model, tmp_path / "full.pt")
    same_outputs(model, load_model(tmp_path / "full.pt", arch="vgg", log=said.append), (4, 1, 8, 8))
    assert said == [f"warning: {tmp_path / 'full.pt'} holds a whole module, so --arch vgg is not used"]


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}, "epoch": 3},
    lambda sd: {"model": sd},
    lambda sd: {"module." + k: v for k, v in sd.items()},  # saved from a DDP-wrapped model
], ids=["state_dict", "model_state_dict", "model", "ddp-prefix"])
def test_checkpoint_dict_with_arch(tmp_path, wrap):
    model = small_mlp()
    torch.save(wrap(model.state_dict()), tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", arch=MLP_SPEC)
    same_outputs(model, loaded, (4, 1, 8, 8))


def test_legacy_non_zip_format(tmp_path, mode):
    model = small_mlp()
    torch.save(model.state_dict(), tmp_path / "sd.pt", _use_new_zipfile_serialization=False)
    same_outputs(model, load_model(tmp_path / "sd.pt", arch=MLP_SPEC), (4, 1, 8, 8))
    # A legacy full module carries its source code, which the restricted unpickler refuses.
    torch.save(model, tmp_path / "full.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeModelError, match=r"legacy \(non-zip\) torch\.save format.*--trust"):
        load_model(tmp_path / "full.pt")
    same_outputs(model, load_model(tmp_path / "full.pt", trust=True), (4, 1, 8, 8))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_loads(tmp_path, how):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.randn(1, 4))
    scripted.save(str(tmp_path / "ts.pt"))
    loaded = load_model(tmp_path / "ts.pt", trust=True)
    assert isinstance(loaded, torch.jit.ScriptModule) and not loaded.training
    same_outputs(model, loaded, (3, 4))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_is_code_and_needs_trust(tmp_path, monkeypatch):
    """TorchScript's methods (__setstate__) run while torch.jit.load reads the file: never without trust."""
    torch.jit.script(nn.Sequential(nn.Linear(2, 2))).save(str(tmp_path / "ts.pt"))
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(UnsafeModelError, match=r"ts\.pt is a TorchScript archive: loading it runs code"):
        load_model(tmp_path / "ts.pt")
    assert calls == []


def test_returned_model_is_in_eval_mode(tmp_path):
    model = small_mlp().train()
    torch.save(model, tmp_path / "m.pt")
    assert not any(m.training for m in load_model(tmp_path / "m.pt").modules())


def test_module_factory_arch(tmp_path, monkeypatch):
    (tmp_path / "my_arches.py").write_text(
        "from torch import nn\n"
        "def build(hidden=3):\n"
        "    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_arches", raising=False)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", arch="my_arches:build(hidden=5)")
    same_outputs(model, loaded, (3, 4))
    assert isinstance(parse_arch("my_arches:build")(), nn.Sequential)


def test_parse_arch_builds_zoo_model_with_kwargs():
    model = parse_arch("  vgg(width=0.05, fc=8, in_shape=(3, 8, 8), num_classes=3) ")()
    assert isinstance(model, zoo.VGG) and model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_trust_loads_user_defined_module(tmp_path):
    model = CustomNet()
    torch.save(model, tmp_path / "custom.pt")
    with pytest.raises(UnsafeModelError, match=r"CustomNet.*--trust.*trust=True"):
        load_model(tmp_path / "custom.pt")
    loaded = load_model(tmp_path / "custom.pt", trust=True)
    assert isinstance(loaded, CustomNet)
    same_outputs(model, loaded, (3, 4))


def test_trusted_file_whose_class_cannot_be_imported_says_so(tmp_path, monkeypatch):
    (tmp_path / "my_nets_for_test.py").write_text(
        "from torch import nn\n\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(4, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_nets_for_test

    torch.save(my_nets_for_test.Net(), tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "my_nets_for_test")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(ModelLoadError, match=r"No module named 'my_nets_for_test': the file names a class this "
                                             r"process cannot import; make the module that defines it importable"):
        load_model(tmp_path / "net.pt", trust=True)


# --- hostile pickles -------------------------------------------------------------------------------


def _calls_linear(path, times):
    """A torch.save-like zip whose data.pkl calls torch.nn.Linear(8, 8) ``times`` times (REDUCE), where a
    saved module is rebuilt (NEWOBJ + state): only allowlisted names, but the file picks each layer's size."""
    ops = bytearray(b"\x80\x02ctorch.nn.modules.linear\nLinear\nq\x00]q\x01(")
    for _ in range(times):
        ops += b"h\x00K\x08K\x08\x86R"  # BINGET 0, 8, 8, TUPLE2, REDUCE
    ops += b"e."  # APPENDS, STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", bytes(ops))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("times", [1, 3])
def test_a_pickle_calling_a_layer_class_is_refused(tmp_path, mode, times, monkeypatch):
    built = []
    monkeypatch.setattr(nn.Linear, "reset_parameters", lambda self: built.append(self))
    with pytest.raises(UnsafeModelError, match=r"calls the layer class torch\.nn\.modules\.linear\.Linear with "
                                               r"arguments of its own, which torch\.save never writes"):
        load_model(_calls_linear(tmp_path / "calls.pt", times))
    assert built == []




def _with_data_pkl(path, pkl: bytes):
    """A torch.save zip of a small layer whose data.pkl is replaced by ``pkl``."""
    src = tmp = path.with_suffix(".src")
    torch.save(nn.Linear(2, 2), tmp)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n in zin.namelist():
            z.writestr(n, pkl if n.endswith("/data.pkl") else zin.read(n))
    return path


@pytest.mark.parametrize("pkl, name", [
    (b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R.", "builtins.bytearray"),  # bytearray(2**30)
    (b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.", "builtins.bytearray"),  # protocol 2's name
    (b"\x80\x02ctorch\nFloatTensor\nJ\x00\x00\x10\x00J\x00\x04\x00\x00\x86R.", "torch.FloatTensor"),
    (b"\x80\x02ctorch.storage\nUntypedStorage\nJ\x00\x00\x00\x40\x85R.", "torch.storage.UntypedStorage"),
    (b"\x80\x02ctorch\nDoubleStorage\nJ\x00\x00\x00\x04\x85R.", "torch.DoubleStorage"),
], ids=["bytearray", "__builtin__.bytearray", "FloatTensor", "UntypedStorage", "DoubleStorage"])
def test_a_pickle_allocating_a_size_of_its_own_is_refused(tmp_path, mode, pkl, name):
    """torch's safe loader allows these calls; a few bytes of file would fill gigabytes."""
    with pytest.raises(UnsafeModelError, match=rf"calls {name} with a size of its own, which torch\.save never"):
        load_model(_with_data_pkl(tmp_path / "alloc.pt", pkl))
    model = nn.Linear(2, 2)
    model.note = bytearray(b"kept")  # a bytearray with content is data, and loads
    torch.save(model, tmp_path / "fine.pt")
    assert load_model(tmp_path / "fine.pt").note == bytearray(b"kept")


def test_archives_torch_save_never_writes_are_refused(tmp_path):
    torch.save(small_mlp(), tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as zin:
        records = [(n, zin.read(n)) for n in zin.namelist()]
    with zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as z:  # how a zip bomb fits
        for n, data in records:
            z.writestr(n, data)
    with pytest.raises(ModelLoadError, match=r"holds m/\S+ compressed \(zip method 8\), which torch\.save "):
        load_model(tmp_path / "deflated.pt")
    with pytest.warns(UserWarning, match="Duplicate name"), \
            zipfile.ZipFile(tmp_path / "twice.pt", "w", zipfile.ZIP_STORED) as z:
        for n, data in records + records[-1:]:
            z.writestr(n, data)
    with pytest.raises(ModelLoadError, match=r"is not a zip archive torch\.save writes: it lists \S+ twice"):
        load_model(tmp_path / "twice.pt")
    (tmp_path / "again.pt").write_bytes((tmp_path / "m.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "again.pt", "a") as z:  # directory entries pointing at one record
        for i in range(3):
            entry = copy.copy(z.getinfo(records[0][0]))
            entry.filename = f"{entry.filename}{i}"
            z.filelist.append(entry)
            z._didModify = True
    with pytest.raises(ModelLoadError, match=r"is not a zip archive torch\.save writes: it has \S+ overlapping "):
        load_model(tmp_path / "again.pt")
    with zipfile.ZipFile(tmp_path / "code.pt", "w", zipfile.ZIP_STORED) as z:  # TorchScript's code is compressed
        for n, data in records:  # a weight's record named like code is not TorchScript's: m/data/code/0
            z.writestr(n.replace("/data/0", "/data/code/0"), data,
                       compress_type=zipfile.ZIP_DEFLATED if n.endswith("/data/0") else zipfile.ZIP_STORED)
    with pytest.raises(ModelLoadError, match=r"holds m/data/code/0 compressed \(zip method 8\)"):
        load_model(tmp_path / "code.pt")


@pytest.mark.parametrize("make, message", [
    (lambda: nn.Linear(4, 3, device="meta"), r"tensor weight has no data \(it is on the meta device\)"),
    (lambda: _expanded(nn.Linear(64, 1000)), r"tensor weight of shape \[1000, 64\] has elements that share memory "
                                            r"\(strides \[0, 0\]\)"),
], ids=["meta", "expanded"])
def test_tensors_without_their_own_data_are_refused_before_a_copy(tmp_path, make, message):
    torch.save(make(), tmp_path / "m.pt")
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path / "m.pt", arch=MLP_SPEC)


def test_weights_that_view_other_memory_without_overlap_load(tmp_path):
    """Views torch.save writes as they are: a strided slice, a transpose, weights tied between two
    layers, a sparse buffer."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Linear(10, 10), nn.Linear(10, 10))
    model[1].weight = nn.Parameter(torch.randn(10, 127)[:, ::2])  # strides (127, 2): no element shared
    model[2].weight = nn.Parameter(torch.randn(10, 10).t())
    model[3].weight = model[2].weight
    model.register_buffer("adjacency", torch.eye(3).to_sparse())
    torch.save(model, tmp_path / "views.pt")
    loaded = load_model(tmp_path / "views.pt")
    assert loaded[1].weight.stride() == (127, 2) and loaded[3].weight is loaded[2].weight
    torch.testing.assert_close(loaded(torch.ones(1, 1, 8, 8)), model(torch.ones(1, 1, 8, 8)))


def _encodes(doublings: int) -> bytes:
    """A data.pkl of ``_codecs.encode`` called on its own result ``doublings`` times ("hex" doubles
    the size): a few hundred bytes that torch's safe loader turns into 64 × 2^doublings bytes."""
    ops = bytearray(b"\x80\x02c_codecs\nencode\nq\x00" + b"h\x00" * doublings)
    ops += b"X\x40\x00\x00\x00" + b"a" * 64 + b"X\x06\x00\x00\x00latin1\x86R"
    ops += b"X\x03\x00\x00\x00hex\x86R" * doublings
    return bytes(ops + b".")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="the cap is set on Linux")
def test_the_safe_load_runs_with_its_address_space_capped(tmp_path, monkeypatch):
    import resource

    from ternarize import load

    monkeypatch.setattr(load, "LOAD_MEMORY", (2, 4096, 96 << 20))  # the cap's margin, small for the test
    limits = resource.getrlimit(resource.RLIMIT_AS)
    with pytest.raises(ModelLoadError, match=r"needs more than 96\.\d MiB of memory to unpickle, more than a model "
                                             r"file of its size and number of tensors holds; .* --trust"):
        load_model(_with_data_pkl(tmp_path / "grows.pt", _encodes(22)))  # 256 MiB from 0.7 KB
    assert resource.getrlimit(resource.RLIMIT_AS) == limits  # restored
    many = nn.Sequential(*(nn.Linear(2, 2) for _ in range(3000)))  # 6,000 small tensors: 2 KiB or so each
    torch.save(many, tmp_path / "many.pt")
    monkeypatch.setattr(load, "LOAD_MEMORY", (0, 4096, 0))  # only what their records allow
    assert len(load_model(tmp_path / "many.pt")) == 3000


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="the cap is set on Linux")
def test_capped_loads_in_two_threads_leave_the_limit_as_it_was(tmp_path):
    import resource
    import threading

    torch.save(small_mlp(), tmp_path / "a.pt")
    limits = resource.getrlimit(resource.RLIMIT_AS)
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(load_model(tmp_path / "a.pt"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loaded) == 4 and resource.getrlimit(resource.RLIMIT_AS) == limits


def test_objects_nested_too_deep_are_refused_before_unpickling(tmp_path):
    """Hashing a tuple nested millions deep overflows the C stack: the walker counts the depth."""
    deep = b"\x80\x02K\x01" + b"\x85" * 2000 + b"."  # (((1,),),) ... 2,000 deep
    with pytest.raises(UnsafeModelError, match=r"nests objects more than 1000 deep, which no model needs"):
        load_model(_with_data_pkl(tmp_path / "deep.pt", deep))
    nested = small_mlp()
    for _ in range(30):  # modules in modules: a few levels of the pickle each
        nested = nn.Sequential(nested)
    torch.save(nested, tmp_path / "nested.pt")
    assert isinstance(load_model(tmp_path / "nested.pt"), nn.Sequential)


def test_a_tensor_shadowing_a_registered_weight_is_checked_too(tmp_path):
    layer = nn.Linear(64, 2)
    layer.__dict__["weight"] = torch.zeros(1).expand(1 << 22, 64)  # what layer.weight reads: 1 GiB when used
    torch.save(layer, tmp_path / "shadow.pt")
    with pytest.raises(ModelLoadError, match=r"tensor weight of shape \[4194304, 64\] has elements that share"):
        load_model(tmp_path / "shadow.pt")


def test_sparse_parameters_are_refused_and_lazy_ones_left_to_the_forward(tmp_path):
    layer = nn.Linear(4, 2, bias=False)
    layer.weight = nn.Parameter(torch.eye(2, 4).to_sparse())
    torch.save(layer, tmp_path / "sparse.pt")
    with pytest.raises(ModelLoadError, match=r"parameter weight is a sparse tensor, which cannot be retrained here"):
        load_model(tmp_path / "sparse.pt")
    torch.save(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), tmp_path / "lazy.pt")
    assert isinstance(load_model(tmp_path / "lazy.pt", trust=True)[1], nn.LazyLinear)


def _expanded(layer):
    layer.weight = nn.Parameter(torch.zeros(1).expand_as(layer.weight))  # 4 bytes standing for 256 KB
    return layer


def test_files_that_only_look_like_pickles_are_named(tmp_path):
    (tmp_path / "x80.pt").write_bytes(b"\x80\xffthis is not a pickle")
    with pytest.raises(ModelLoadError, match=r"is not a PyTorch model file \(it looks like an unknown binary"):
        load_model(tmp_path / "x80.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "p0.pt", pickle_protocol=0)
    with pytest.raises(ModelLoadError, match=r"saved with pickle protocol 0 or 1, which torch's safe loader cannot"):
        load_model(tmp_path / "p0.pt", arch=MLP_SPEC)


@pytest.mark.parametrize("payload, name", [
    (RunsShell, r"(posix|nt|os)\.system"),
    (WritesMarker, r"touch_marker"),
    (Evals, r"builtins\.eval"),
], ids=["os.system", "module-function", "eval"])
@pytest.mark.parametrize("wrap", ["bare", "in-checkpoint"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, mode, payload, name, wrap):
    marker = tmp_path / "MARKER"
    obj = payload(marker)
    if wrap == "in-checkpoint":  # hidden beside a genuine state_dict, with a valid arch given
        obj = {"state_dict": small_mlp().state_dict(), "extra": obj}
    torch.save(obj, tmp_path / "evil.pt")
    with pytest.raises(UnsafeModelError, match=rf"{name}.*not on the safe-loading allowlist.*--trust"):
        load_model(tmp_path / "evil.pt", arch=MLP_SPEC)
    assert not marker.exists(), "code from the file ran"


def test_legacy_format_hostile_pickle_never_runs(tmp_path, mode):
    marker = tmp_path / "MARKER"
    torch.save(WritesMarker(marker), tmp_path / "evil.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeModelError, match=r"touch_marker"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("ref, name", [
    (torch.nn.modules.module.register_module_forward_hook, r"register_module_forward_hook"),
    (zoo.create, r"ternarize\.zoo\.create"),
    (torch.nn.functional.dropout, r"torch\.nn\.functional\.dropout"),
], ids=["nn-function", "zoo-function", "functional"])
def test_only_classes_and_listed_helpers_are_allowed(tmp_path, mode, ref, name):
    # Functions living next to allowlisted classes are not allowlisted themselves.
    torch.save({"f": ref}, tmp_path / "f.pt")
    with pytest.raises(UnsafeModelError, match=name):
        load_model(tmp_path / "f.pt")


def test_user_defined_module_inside_sequential_is_refused(tmp_path, mode):
    torch.save(nn.Sequential(nn.Linear(4, 4), CustomNet()), tmp_path / "m.pt")
    with pytest.raises(UnsafeModelError, match=r"CustomNet"):
        load_model(tmp_path / "m.pt")


# --- bad input -------------------------------------------------------------------------------------


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncated(tmp_path):
    torch.save(small_mlp(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    return _write(tmp_path / "cut.pt", data[: len(data) // 2])


def _state_dict_file(tmp_path):
    torch.save(small_mlp().state_dict(), tmp_path / "w.pt")
    return tmp_path / "w.pt"


def _zip_without_model(tmp_path):
    with zipfile.ZipFile(tmp_path / "notes.pt", "w") as z:
        z.writestr("notes/readme.txt", "hello")
    return tmp_path / "notes.pt"


def _protocol(n, zip_format=True):
    def make(tmp_path):
        torch.save(small_mlp(), tmp_path / "p.pt", pickle_protocol=n, _use_new_zipfile_serialization=zip_format)
        return tmp_path / "p.pt"
    return make


def _flipped_weight_byte(tmp_path):
    """A torch.save archive with one byte of a weight changed: the zip's CRC-32 no longer matches."""
    torch.save(small_mlp(), tmp_path / "full.pt")
    data = bytearray((tmp_path / "full.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "full.pt") as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    local = info.header_offset  # the local header's name and extra field lengths (its extra field pads)
    at = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") + int.from_bytes(
        data[local + 28:local + 30], "little")
    data[at + info.file_size // 2] ^= 0x40  # inside its data
    return _write(tmp_path / "flipped.pt", bytes(data))


def _saved(obj):
    def make(tmp_path):
        torch.save(obj, tmp_path / "obj.pt")
        return tmp_path / "obj.pt"
    return make


# (id, make the file, arch, error, message regex)
BAD_INPUT = [
    ("missing", lambda t: t / "nope.pt", None, ModelLoadError, r"does not exist"),
    ("directory", lambda t: t, None, ModelLoadError, r"is a folder, not a model file"),
    ("empty", lambda t: _write(t / "e.pt", b""), None, ModelLoadError, r"is empty \(0 bytes\)"),
    ("text", lambda t: _write(t / "model.pt", b"this is not a model\n"), None, ModelLoadError,
     r"not a PyTorch model file \(it looks like a text file, not a torch\.save or TorchScript file\)"),
    ("binary", lambda t: _write(t / "b.pt", bytes(range(1, 200))), None, ModelLoadError,
     r"not a PyTorch model file"),
    ("truncated", _truncated, None, ModelLoadError, r"truncated or corrupted"),
    ("bad-pickle", lambda t: _write(t / "p.pt", b"\x80\x02garbage"), None, ModelLoadError,
     r"cannot load .*: \w.*; the file may be truncated or corrupted"),
    ("protocol-4", _protocol(4), None, ModelLoadError,
     r"saved with pickle protocol 4, which torch's safe loader cannot read; save it again with torch\.save's "
     r"default protocol"),
    ("protocol-5-legacy", _protocol(5, zip_format=False), None, ModelLoadError, r"saved with pickle protocol 5"),
    ("bad-crc", _flipped_weight_byte, None, ModelLoadError,
     r"is corrupted: \S+/data/\d+ inside it does not match its checksum; copy or save the model again"),
    ("zip-not-torch", _zip_without_model, None, ModelLoadError, r"zip archive but not a torch\.save"),
    ("state-dict-no-arch", _state_dict_file, None, ModelLoadError,
     r"holds a state_dict \(\d+ tensors\); pass --arch NAME \(a zoo model: lenet, mlp, resnet, vgg\) "
     r"or --arch package\.module:factory"),
    ("unknown-zoo-name", _state_dict_file, "alexnet", ModelLoadError,
     r"unknown zoo model 'alexnet'.*lenet, mlp, resnet, vgg"),
    ("dotted-without-colon", _state_dict_file, "torchvision.models.resnet18", ModelLoadError,
     r"package\.module:factory"),
    ("missing-module", _state_dict_file, "no_such_module_xyz:build", ModelLoadError,
     r"cannot import module 'no_such_module_xyz'"),
    ("missing-attribute", _state_dict_file, "ternarize.zoo:NoSuchNet", ModelLoadError,
     r"module 'ternarize\.zoo' has no attribute 'NoSuchNet'"),
    ("not-callable", _state_dict_file, "ternarize.zoo:_MODELS", ModelLoadError, r"not callable"),
    ("factory-not-module", _state_dict_file, "ternarize.zoo:names", ModelLoadError,
     r"returned a list of 4 items, not a torch\.nn\.Module"),
    ("non-literal-kwarg", _state_dict_file, "mlp(width=__import__('os').getpid())", ModelLoadError,
     r"width= must be a literal .* not a call; nothing was evaluated"),
    ("name-kwarg", _state_dict_file, "mlp(width=big)", ModelLoadError, r"not the name 'big'"),
    ("positional-arg", _state_dict_file, "mlp(16)", ModelLoadError, r"pass arguments by keyword"),
    ("star-kwargs", _state_dict_file, "mlp(**{'width': 16})", ModelLoadError, r"\*\*kwargs"),
    ("bad-syntax", _state_dict_file, "mlp(width=", ModelLoadError,
     r"cannot parse arch.*invalid argument syntax"),
    ("bad-name", _state_dict_file, "mlp-2", ModelLoadError, r"cannot parse arch 'mlp-2'"),
    ("chained-call", _state_dict_file, "mlp(width=1)(depth=2)", ModelLoadError, r"one argument list"),
    ("bad-zoo-kwarg", _state_dict_file, "mlp(colour=1)", ModelLoadError, r"arch 'mlp\(colour=1\)'.*colour"),
    ("shape-mismatch", _state_dict_file, "mlp(width=32, depth=2, in_shape=(1, 8, 8))", ModelLoadError,
     r"does not match arch .*shape mismatch: '0\.weight'|does not match arch .*shape mismatch: '1\.weight'"),
    ("key-mismatch", _state_dict_file, "mlp(width=16, depth=1, in_shape=(1, 8, 8))", ModelLoadError,
     r"does not match arch .*unexpected key '7\.weight' \(\+\d+ more\)"),
    ("bare-tensor", _saved(torch.zeros(3, 4)), None, ModelLoadError,
     r"holds a bare tensor of shape \(3, 4\)"),
    ("list", _saved([torch.zeros(2), 1]), None, ModelLoadError, r"holds a list of 2 items"),
    ("dict-without-tensors", _saved({"epoch": 3, "lr": 0.1}), "mlp", ModelLoadError,
     r"holds a dict with 2 entries \(keys 'epoch', 'lr'\)"),
]


@pytest.mark.parametrize("make, arch, error, message", [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input(tmp_path, make, arch, error, message):
    path = make(tmp_path)
    with pytest.raises(error, match=message) as info:
        load_model(path, arch=arch)
    assert "\n" not in str(info.value), "error messages are one line"
    assert "Traceback" not in str(info.value)


def test_non_literal_arch_is_never_evaluated(tmp_path):
    marker = tmp_path / "MARKER"
    spec = f"mlp(width=__import__('os').system('touch {marker}'))"
    with pytest.raises(ModelLoadError, match=r"must be a literal"):
        parse_arch(spec)
    assert not marker.exists()


def test_unexpected_torch_error_keeps_its_cause(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(_write(tmp_path / "p.pt", b"\x80\x02garbage"))
    assert info.value.__cause__ is not None


def test_factory_raising_is_wrapped(tmp_path, monkeypatch):
    (tmp_path / "broken_arches.py").write_text("def build():\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_arches", raising=False)
    with pytest.raises(ModelLoadError, match=r"failed to build: RuntimeError: boom"):
        parse_arch("broken_arches:build")()
