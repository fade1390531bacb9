"""`onnxq` command line: a thin click front end over the onnxq library.

Exit codes: 0 success, 1 runtime error, 2 usage error or missing optional dependency, 130 on Ctrl-C.
No traceback is shown unless `--debug` is given. `onnxq` or a command without arguments prints its
help on stderr and exits 2, like any other usage error.

The commands are imported on first use, inside `run`, so that a Ctrl-C while the heavy libraries
(onnx, ONNX Runtime) load still exits 130 without a traceback, and `--help`/`--version` stay fast.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import click

from onnxq import __version__
from onnxq.errors import ConfigError, InternalError, MissingDependencyError, OnnxqError

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

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


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxq")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors: no warnings and no progress bar.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors. Give it before the command.")
def cli(verbose: int, quiet: bool, debug: bool) -> None:
    """Post-training INT8 quantization of ONNX models for TensorRT (explicit Q/DQ).

    \b
    Exit codes: 0 success, 1 runtime error, 2 usage error or missing optional
    dependency, 130 interrupted (Ctrl-C).
    """
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)
    from onnx_graphsurgeon.logger import G_LOGGER

    from onnxq.runtime.session import set_runtime_log_level

    set_runtime_log_level(verbose=verbose >= 2)
    # onnx-graphsurgeon prints its messages to stdout, into the command's output: errors only unless -v.
    G_LOGGER.severity = G_LOGGER.WARNING if verbose else G_LOGGER.ERROR


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


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of raising (with `--debug`, errors are re-raised)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _wants_debug(args)
    try:
        result = cli.main(args=args, prog_name="onnxq", standalone_mode=False)
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as err:  # a usage error: its traceback would only show click's parser
        err.show()
        return err.exit_code
    except (ConfigError, MissingDependencyError) as err:
        if debug:
            raise
        return _fail(str(err), EXIT_USAGE)
    except OnnxqError as err:
        if debug:
            raise
        return _fail(str(err), EXIT_RUNTIME_ERROR)
    except Exception as err:  # an onnxq bug or an unexpected library failure
        if debug:
            raise
        return _fail(_internal_error(err), EXIT_RUNTIME_ERROR)
    # Without standalone mode, click returns the code of `--help`/`--version` (ctx.exit) as an int.
    return result if isinstance(result, int) else EXIT_OK


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
