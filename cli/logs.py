"""The log levels of the libraries a command runs, from the global `-v`: set when the command starts.

Not in the group's callback: that runs before a command's `--help` too, and these imports load onnx and
ONNX Runtime, which `--help` does not need.
"""

from __future__ import annotations

import logging

import click


def quiet_libraries() -> None:
    """ONNX Runtime: fatal errors only unless -vv; onnx-graphsurgeon (which prints to stdout, into the command's
    output): errors only unless -v; Ray (`--ray`; its notices about the instance it starts): errors only
    unless -vv."""
    from onnx_graphsurgeon.logger import G_LOGGER

    from onnxq.runtime.session import set_runtime_log_level

    context = click.get_current_context(silent=True)
    verbose = int(context.find_root().params.get("verbose") or 0) if context is not None else 0
    set_runtime_log_level(verbose=verbose >= 2)
    G_LOGGER.severity = G_LOGGER.WARNING if verbose else G_LOGGER.ERROR
    logging.getLogger("ray").setLevel(logging.NOTSET if verbose >= 2 else logging.ERROR)
