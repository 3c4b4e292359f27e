"""The public API: every advertised name resolves, and importing submodules never shadows them."""

import importlib

import ternarize


def test_every_public_name_resolves():
    for name in ternarize.__all__:
        assert getattr(ternarize, name) is not None, name


def test_functions_stay_callable_after_their_modules_are_imported():
    for module in ("ternarize.pipeline", "ternarize.lowering", "ternarize.load", "ternarize.train.loop",
                   "ternarize.runtime", "ternarize.report", "ternarize.onnx", "ternarize.demo"):
        importlib.import_module(module)
    for name in ("compress", "lower", "load_model", "fit", "load_dataset"):
        assert callable(getattr(ternarize, name)), name
    assert isinstance(ternarize.Runtime, type) and isinstance(ternarize.MSA, type)


def test_submodules_named_in_the_docs_resolve_after_a_plain_import():
    import subprocess
    import sys

    code = "import ternarize; print(callable(ternarize.onnx.session), callable(ternarize.demo.run))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
