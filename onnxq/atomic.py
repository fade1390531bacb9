"""Write a file so that it is either complete or absent: a temporary file in the target folder, renamed.

Used for every file onnxq writes besides models (reports, statistics, engines, JSON). An interruption,
Ctrl-C included, leaves no half-written file and no temporary behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from onnxq.errors import OnnxqError

__all__ = ["write_atomic"]


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike[str], data: bytes, what: str = "the file",
                 error: type[OnnxqError] = OnnxqError) -> Path:
    """Write `data` to `path` atomically, with the permissions a plain open() would give.

    Raises:
        `error`: the folder does not exist or the file cannot be written (one line naming the path).
    """
    path = Path(path)
    staged: str | None = None
    try:
        handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(staged, _default_mode())  # mkstemp creates 0600
        os.replace(staged, path)
    except BaseException as err:
        if staged is not None:
            Path(staged).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise error(f"{path}: cannot write {what} ({err.strerror or err})") from None
        raise
    return path
