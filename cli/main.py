"""`onnxq` command line: a thin click front end over the onnxq library.

Exit codes: 0 success, 1 runtime error, 2 usage error or missing optional dependency, 130 on Ctrl-C.
No traceback is shown unless `--debug` is given. `onnxq` or a command without its arguments is a usage
error like any other: click's short usage and the error, exit 2.

The commands are imported on first use, and they import the library (onnx, ONNX Runtime) only when they
run, so `--help` and `--version` stay fast; the console script (`launch.py`) installs the Ctrl-C handling
before any of it, so a Ctrl-C while those libraries load exits 130 without a traceback, as at any other
moment. A command either finishes with all of its output files written (exit 0) or leaves none of them
(`outputs.transaction`); a stdout whose reader is gone does not change that (`outputs.StdoutGuard`).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import click

from onnxq import __version__
from onnxq.errors import ConfigError, InternalError, MissingDependencyError, OnnxqError

from . import interrupt
from .outputs import StdoutError, StdoutGuard, transaction

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = interrupt.EXIT_INTERRUPTED

# command name -> "module:attribute", relative to this package; listed in this order by `--help`.
_COMMANDS = {"quantize": ".quantize:quantize_cmd", "calibrate": ".calibrate:calibrate_cmd",
             "stats": ".stats:stats_group", "inspect": ".inspect:inspect_cmd", "build": ".build:build_cmd",
             "compare": ".compare:compare_cmd"}


class _LazyGroup(click.Group):
    """A group whose commands are imported when they are first looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name, __package__), attribute)
        if not isinstance(command, click.Command):
            raise InternalError(f"{target} is not a click command")
        return command


@click.group(cls=_LazyGroup, no_args_is_help=False, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxq")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors: no warnings and no progress bar.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors. Give it before the command.")
def cli(verbose: int, quiet: bool, debug: bool) -> None:
    """Post-training INT8 quantization of ONNX models (explicit Q/DQ) for TensorRT or ONNX Runtime's CPU provider.

    \b
    Exit codes: 0 success, 1 runtime error, 2 usage error or missing optional
    dependency, 130 interrupted (Ctrl-C).
    """
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)


def _fail(message: str, code: int) -> int:
    click.echo(f"error: {message}", err=True)
    return code


def _wants_debug(args: Sequence[str]) -> bool:
    """Whether `--debug` is among the global options, i.e. before the command name."""
    for arg in args:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False
    return False


def _internal_error(err: Exception) -> str:
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else ""
    return f"internal error: {type(err).__name__}: {first_line} (run with --debug for the traceback)"


def _invoke(args: list[str]) -> object:
    """Parse `args` and run the command; click's own error handling (`main`) is left out so that every
    outcome, Ctrl-C and a broken stdout included, is decided in `run` alone."""
    with cli.make_context("onnxq", args) as context:
        return cli.invoke(context)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of raising (with `--debug`, errors are re-raised)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _wants_debug(args)
    stdout = StdoutGuard(sys.stdout)
    sys.stdout = stdout  # type: ignore[assignment]
    try:
        with transaction():
            result = _invoke(args)
            stdout.flush()  # a write error still in the buffer (a full disk) fails the command too
    except (click.Abort, KeyboardInterrupt):
        return _interrupted()
    except click.exceptions.Exit as done:  # --help, --version
        return done.exit_code
    except click.UsageError as err:  # its traceback would only show click's parser
        _show_usage_error(err)
        return err.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except (ConfigError, MissingDependencyError) as err:
        if debug:
            raise
        return _fail(str(err), EXIT_USAGE)
    except (OnnxqError, StdoutError) as err:
        if debug:
            raise
        return _interrupted() if interrupt.received() else _fail(str(err), EXIT_RUNTIME_ERROR)
    except Exception as err:  # an onnxq bug or an unexpected library failure
        if debug:
            raise
        # A Ctrl-C that a library turned into another error is still an interruption.
        return _interrupted() if interrupt.received() else _fail(_internal_error(err), EXIT_RUNTIME_ERROR)
    finally:
        stdout.release()
    return result if isinstance(result, int) else EXIT_OK


def _show_usage_error(err: click.UsageError) -> None:
    """Three lines on stderr: the command's usage, where the help is, and the error (click's text without
    its blank line)."""
    lines = []
    if err.ctx is not None:
        lines.append(err.ctx.get_usage())
        help_option = max(err.ctx.help_option_names, key=len, default=None)
        if err.ctx.command.get_help_option(err.ctx) is not None and help_option is not None:
            lines.append(f"Try '{err.ctx.command_path} {help_option}' for help.")
    lines.append(f"Error: {err.format_message()}")
    click.echo("\n".join(lines), err=True)


def _interrupted() -> int:
    click.echo(interrupt.MESSAGE, err=True)
    return EXIT_INTERRUPTED


def main() -> None:
    """Run the command line (the console script is `launch.main`, which also handles Ctrl-C at start-up)."""
    sys.exit(run())
