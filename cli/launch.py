"""The `onnxq` console script and `python -m onnxq_cli`: Ctrl-C handling first, then the command line.

Importing onnx, ml_dtypes and ONNX Runtime takes a second or more. A Ctrl-C in that time must end as one at
any other moment does: the one line "interrupted" on stderr, exit 130, no traceback. So this module imports
only the standard library and `interrupt`; the command line (`main`) is imported inside the handled block.
"""

from __future__ import annotations

import os
import sys

from . import interrupt


def _reserve_standard_descriptors() -> None:
    """Open /dev/null on a closed descriptor 0, 1 or 2 (`onnxq ... >&-`), so that no file onnxq opens, such as
    the model being written, gets its number and receives what a library prints to stdout."""
    for descriptor in (0, 1, 2):
        try:
            os.fstat(descriptor)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != descriptor:  # the lowest free number is this one unless a lower one was closed too
                os.dup2(opened, descriptor)
                os.close(opened)


def main() -> None:
    """Console-script entry point: run the command, exit with its code (130 on Ctrl-C, at any moment).

    Once a Ctrl-C came, or when a thread the command did not start outlives it, the process ends at once
    (`interrupt.exit_now`) rather than through the interpreter's teardown, which would wait for such threads.
    """
    interrupt.install()
    _reserve_standard_descriptors()
    code: int | None = None
    try:
        from .main import run

        code = run()
        interrupt.ignore()  # the command is complete: a later Ctrl-C can neither undo it nor print a traceback
    except BaseException:  # noqa: BLE001 - a Ctrl-C while importing may surface as another error
        if not interrupt.received():
            raise
        if code is None:
            interrupt.exit_now(interrupt.EXIT_INTERRUPTED, interrupt.MESSAGE)
    if interrupt.received() or _lingering_threads():  # the command is over: nothing may delay the exit
        interrupt.exit_now(code)
    sys.exit(code)


def _lingering_threads() -> bool:
    """Whether a thread the command did not end is still running (one a data-loader script started): the
    interpreter would wait for it at exit, possibly for ever."""
    threading = sys.modules.get("threading")
    if threading is None:
        return False
    main_thread = threading.main_thread()
    return any(thread.is_alive() and not thread.daemon for thread in threading.enumerate() if thread is not main_thread)
