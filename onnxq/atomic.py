"""Write a file so that it is either complete or absent: a temporary file in the target folder, renamed.

Used for every file onnxq writes besides models (reports, statistics, engines, JSON). An interruption,
Ctrl-C included, leaves no half-written file and no temporary behind.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from onnxq.errors import OnnxqError

__all__ = ["staging_name", "write_atomic"]


def staging_name(path: Path) -> Path:
    """A fresh hidden name beside `path` for a file or folder written before it is renamed to `path`."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


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
    # The name is chosen before the file exists, so an interruption at any moment after os.open still
    # knows what to remove (mkstemp returns the name only once the file is there).
    staged = staging_name(path)
    try:
        handle = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(staged, _default_mode())  # created 0600, as mkstemp would
        os.replace(staged, path)
    except BaseException as err:
        staged.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise error(f"{path}: cannot write {what} ({err.strerror or err})") from None
        raise
    return path
