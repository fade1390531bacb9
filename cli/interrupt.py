"""Ctrl-C (SIGINT) for the `onnxq` process: installed first, before anything heavy is imported.

The first Ctrl-C raises KeyboardInterrupt wherever the main thread is (an import, a calibration batch, a
save); every later one is ignored, so that the cleanup that exception triggers (temporary files removed,
an output already written removed again) cannot itself be cut short. `received()` tells whether a Ctrl-C
came: a library that turns a KeyboardInterrupt into another error (a C extension's import can) is still
reported as interrupted.

Only the standard library is imported here: this runs while onnx, ml_dtypes and ONNX Runtime still load.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import NoReturn

EXIT_INTERRUPTED = 130
MESSAGE = "interrupted"

_received = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT as described above, unless the process was started with it ignored (`nohup`, `cmd &`)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_sigint)


def received() -> bool:
    """Whether a Ctrl-C has been received in this process."""
    return _received


def ignore() -> None:
    """Ignore Ctrl-C from now on: the command has finished (its outputs complete) and the process is exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def exit_now(code: int, message: str | None = None) -> NoReturn:
    """Print `message` (if any) on stderr, flush, and end the process with `code` at once.

    Used once a Ctrl-C came: the command has already cleaned up (its exception unwound every `finally`),
    and `os._exit` rather than `sys.exit` means no thread left running, such as one a data-loader script
    started, and no interpreter teardown can hold the exit back.
    """
    ignore()
    for stream in (sys.stdout, sys.stderr):
        try:
            if message is not None and stream is sys.stderr:
                stream.write(message + "\n")
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed, broken or absent (pythonw)
            pass
    os._exit(code)
