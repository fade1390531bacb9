"""`onnxq` command line: a thin click front end over the onnxq library.

Exit codes: 0 success, 1 runtime error, 2 usage error or missing optional dependency, 130 on Ctrl-C.
No traceback is shown unless `--debug` is given.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from onnxq import __version__
from onnxq.errors import ConfigError, MissingDependencyError, OnnxqError

from .inspect import inspect_cmd
from .quantize import quantize_cmd

EXIT_RUNTIME_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxq")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(verbose: int, quiet: bool, debug: bool) -> None:
    """Post-training INT8 quantization of ONNX models for TensorRT (explicit Q/DQ)."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)
    from onnxq.calib.session import set_runtime_log_level

    set_runtime_log_level(verbose=verbose >= 2)


cli.add_command(quantize_cmd)
cli.add_command(inspect_cmd)


def _fail(message: str, code: int) -> int:
    click.echo(f"error: {message}", err=True)
    return code


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of raising."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="onnxq", standalone_mode=False)
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as err:
        if debug:
            raise
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
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return _fail(f"internal error: {type(err).__name__}: {first_line} (run with --debug for the traceback)",
                     EXIT_RUNTIME_ERROR)
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
