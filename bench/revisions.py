"""Benchmark: the numpy runtime of the working tree against the one of a git revision (not a test).

On a shared machine single timings wander by 15 % and more, and runs made minutes apart by more
still, so a change to the runtime is judged by a ratio measured in one process. This script
extracts ``ternarize/`` of REV (``git archive``) into a temporary folder and imports it under
another name (the runtime's own imports are relative), writes the models of
``bench/runtime.py`` (the paper MLP and the VGG-style CNN, weights projected to ternary at
``--density`` non-zero) with the working tree's writer, loads each file with both runtimes
(``sparse="auto"``, the default) and times them in alternating rounds: a warm-up run, then
``--block`` timed runs of one, then of the other, the order swapped every round. It prints per
model and batch the median ms of both, the median over rounds of the paired ratio (working tree ÷
REV: below 1 the working tree is faster), the ratio of the fastest runs and the largest
difference between their outputs. REV is resolved to a commit before anything else (a REV that
starts with '-' is refused) and a revision whose runtime cannot be imported, load the files or run
them is one line on stderr with exit code 2, as is any bad option; ``--json`` is checked before the
timing.

Example::

    python bench/revisions.py HEAD~3                      # MLP and VGG at batch 1: about a minute
    python bench/revisions.py main --batch 1,4,64 --rounds 20 --json out.json
"""

import os
import sys

# bench/ holds onnx.py: drop this directory from the path so that a package named onnx is found
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ternarize import _scripts, lower, tern  # noqa: E402
from ternarize._text import one_line  # noqa: E402
from ternarize.errors import ConfigError  # noqa: E402
from ternarize.runtime import Runtime  # noqa: E402
from ternarize.testing import project, synthetic  # noqa: E402

BASE = "ternarize_base"  # the name REV's package is imported under
ROOT = Path(_HERE).parent  # the git repository REV is looked up in


def resolve(rev: str) -> str:
    """The commit SHA that ``rev`` names in ROOT (ConfigError when it names none). A ``rev``
    starting with '-' is refused, so that git never reads it as an option."""
    if not rev or rev.startswith("-"):
        raise ConfigError(f"{rev!r} is not a git revision; give a commit, branch or tag (see git log)")
    got = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", "--end-of-options",
                          f"{rev}^{{commit}}"], capture_output=True, text=True)
    if got.returncode:
        raise ConfigError(f"{rev!r} names no commit of the repository at {ROOT}; give a commit, branch or tag "
                          "(see git log)")
    return got.stdout.strip()


def _failed(rev: str, what: str, e: BaseException) -> ConfigError:
    return ConfigError(f"the runtime at {rev!r} cannot {what} ({type(e).__name__}: {one_line(e)}); "
                       "pick a newer revision")


def base_runtime(rev: str, folder: Path):
    """``Runtime`` of ``ternarize/`` at ``rev``, extracted into ``folder``; ConfigError when ``rev``
    names no commit or its runtime cannot be imported."""
    sha = resolve(rev)
    got = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", sha, "ternarize"],
                         capture_output=True)
    if got.returncode:
        message = got.stderr.decode(errors="replace").strip().splitlines() or ["git archive failed"]
        raise ConfigError(f"cannot read ternarize/ at {rev!r}: {one_line(message[-1])}; pick a revision that has it")
    with tarfile.open(fileobj=io.BytesIO(got.stdout)) as tar:
        try:
            tar.extractall(folder, filter="data")
        except TypeError:  # Python before 3.11.4: no extraction filters (the archive is git's own)
            tar.extractall(folder)
    package = folder / "ternarize"
    spec = importlib.util.spec_from_file_location(BASE, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    for name in [n for n in sys.modules if n == BASE or n.startswith(BASE + ".")]:
        del sys.modules[name]  # left by an earlier call in this process
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules[BASE] = module
        spec.loader.exec_module(module)
        return importlib.import_module(f"{BASE}.runtime").Runtime
    except Exception as e:  # any failure of old code: a syntax error, an exception at import, no Runtime
        raise _failed(rev, "be imported", e) from e


def model_file(name: str, width: float, density: float, folder: Path) -> Path:
    model, shape = synthetic(name, width)
    graph = lower(model, torch.zeros(1, *shape), discrete=project(model, "ternary", density))
    path = folder / f"{name}.tern"
    tern.write(graph, path, deflate=False)  # a plain header: the readers of older revisions know no flags
    return path


def compare(head, base, batch: int, rounds: int, block: int, rev: str = "REV") -> dict:
    """Alternating rounds of ``head.run`` and ``base.run`` on one random batch (ConfigError when
    ``base`` fails on it)."""
    x = np.random.default_rng(3).standard_normal((batch, *head.input_shape)).astype(np.float32)
    ours = head.run(x)
    try:
        theirs = base.run(x)
    except Exception as e:  # an older runtime may fail on what the working tree writes
        raise _failed(rev, f"run batch {batch}", e) from e
    diff = float(np.abs(ours - theirs).max())
    times = {"head": [], "base": []}
    for k in range(rounds):
        for side in (("head", "base") if k % 2 == 0 else ("base", "head")):
            rt = head if side == "head" else base
            rt.run(x)  # untimed: warms the caches after the other one ran
            block_times = []
            for _ in range(block):
                t = time.perf_counter()
                rt.run(x)
                block_times.append(time.perf_counter() - t)
            times[side].append(block_times)
    ratio = statistics.median(statistics.median(h) / statistics.median(b)
                              for h, b in zip(times["head"], times["base"]))
    flat = {side: [t for b in blocks for t in b] for side, blocks in times.items()}
    return {"batch": batch, "head_ms": 1e3 * statistics.median(flat["head"]),
            "base_ms": 1e3 * statistics.median(flat["base"]), "x": ratio,
            "min_x": min(flat["head"]) / min(flat["base"]), "max_diff": diff}


def batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of batch sizes, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return values


def main(argv=None) -> None:
    ap = _scripts.parser(__file__, __doc__)
    ap.add_argument("rev", help="the git revision to compare with (a commit, branch or tag)")
    _scripts.model_options(ap)
    ap.add_argument("--density", type=_scripts.fraction, default=0.05, help="non-zero fraction of the weights")
    ap.add_argument("--batch", type=batches, default=[1], help="comma-separated batch sizes (default 1)")
    ap.add_argument("--rounds", type=_scripts.positive_int, default=40, help="alternating rounds per model and batch")
    ap.add_argument("--block", type=_scripts.positive_int, default=5, help="timed runs per side and round")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    _scripts.check_output(args.json)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_cls = base_runtime(args.rev, Path(tmp) / "base")
        for name in args.models:
            with _scripts.out_of_memory("choose a smaller --width or --vgg-width"):
                path = model_file(name, args.width if name == "mlp" else args.vgg_width, args.density, Path(tmp))
            head = Runtime.load(path)
            try:
                base = base_cls.load(path)
            except Exception as e:  # an older reader may refuse what the working tree writes
                raise _failed(args.rev, f"load the {name} file", e) from e
            for batch in args.batch:
                rows.append({"model": name, **compare(head, base, batch, args.rounds, args.block, args.rev)})
    print(f"working tree vs {args.rev} (numpy {np.__version__}; ternary {100 * args.density:g} % non-zero, "
          f"{args.rounds} rounds of {args.block} runs each); x = working tree / {args.rev}")
    head = f"{'model':6} {'batch':>5} {'tree ms':>9} {'rev ms':>9} {'x':>6} {'min x':>6} {'max |diff|':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:6} {r['batch']:>5} {r['head_ms']:>9.3f} {r['base_ms']:>9.3f} {r['x']:>6.3f} "
              f"{r['min_x']:>6.3f} {r['max_diff']:>10.1e}")
    if args.json:
        _scripts.write_json(args.json, {"rev": args.rev, "numpy": np.__version__, "rows": rows})


if __name__ == "__main__":
    sys.exit(_scripts.main(main))
