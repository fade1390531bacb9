"""What a command leaves behind: all of its output files, or none; and a stdout whose reader may be gone.

A command registers each file it has written (`written`); when the command does not finish (an error, a
Ctrl-C during the evaluation or the report after the model was saved), `transaction` removes them again,
so a non-zero exit never leaves an output behind. A file the command is about to replace (`-o` naming an
earlier result) is first kept under a hidden name in its folder (`replacing`: a hard link, else a copy) and
put back if the command fails, so a failure never loses what was there; on success the copy is deleted.
Every file is itself written to a temporary file in its folder and renamed (`onnxq.atomic`, `onnxq.io`),
so none is ever half-written.

stdout only carries the summary of what was written. A reader that has exited (`onnxq ... | head -1`) or a
closed stdout (`>&-`) must neither stop a command whose files are complete nor make it fail after they
were written: writes to such a stdout are dropped and the command finishes (exit 0). Other write errors
(a full disk behind `> summary.txt`) fail the command like any runtime error, and its outputs are removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

__all__ = ["StdoutError", "StdoutGuard", "replacing", "transaction", "written"]

_written: list[Path] | None = None
_backups: list[tuple[Path, Path]] | None = None
# errno values that mean nobody reads stdout any more.
_READER_GONE = {errno.EPIPE, errno.EBADF, errno.ECONNRESET}


class StdoutError(Exception):
    """stdout cannot be written for a reason other than its reader being gone (e.g. a full disk)."""


def written(path: str | os.PathLike[str]) -> Path:
    """Record a complete output file of the running command, or a folder it created for its outputs (removed
    again if the command fails: files first, then the folder if it is empty)."""
    path = Path(path)
    if _written is not None:
        _written.append(path)
    return path


def replacing(*paths: str | os.PathLike[str]) -> None:
    """Before writing: keep each existing file among `paths` under a hidden name beside it, to be put back
    if the running command fails (a hard link, so no data is copied where the file system has them)."""
    if _backups is None:
        return
    for path in map(Path, paths):
        if not path.is_file() or any(kept == path for kept, _ in _backups):
            continue
        backup = path.with_name(f".{path.name}.onnxq-kept-{os.getpid()}")
        try:
            backup.unlink(missing_ok=True)
            try:
                os.link(path, backup)
            except OSError:
                shutil.copy2(path, backup)
        except OSError:  # cannot keep it: the write below proceeds as before, atomically
            continue
        _backups.append((path, backup))


@contextmanager
def transaction() -> Iterator[None]:
    """Run a command: if it raises anything (Ctrl-C included), remove the files it recorded with `written`
    and put back the files it replaced (`replacing`); either way, delete the kept copies."""
    global _written, _backups
    outer, _written = _written, []
    outer_backups, _backups = _backups, []
    try:
        yield
    except BaseException:
        for path in reversed(_written):
            try:
                if path.is_dir():
                    path.rmdir()  # a folder the command created, emptied by now; never one with other files
                else:
                    path.unlink(missing_ok=True)
            except OSError:  # removing is best effort: the error being reported is the one that matters
                pass
        for path, backup in _backups:
            try:
                os.replace(backup, path)
            except OSError:
                pass
        raise
    finally:
        for _, backup in _backups:
            try:
                backup.unlink(missing_ok=True)
            except OSError:
                pass
        _written, _backups = outer, outer_backups


class StdoutGuard:
    """A stand-in for sys.stdout that drops writes once the reader is gone, instead of raising."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.reader_gone = stream is None

    def _attempt(self, action: str, *args: Any) -> Any:
        if self.reader_gone:
            return None
        try:
            return getattr(self.stream, action)(*args)
        except ValueError:  # the stream was closed
            self.reader_gone = True
        except OSError as err:
            if err.errno not in _READER_GONE:
                raise StdoutError(f"cannot write to stdout ({err.strerror or err})") from err
            self.reader_gone = True
        return None

    def write(self, text: str) -> int:
        self._attempt("write", text)
        return len(text)

    def flush(self) -> None:
        self._attempt("flush")

    def isatty(self) -> bool:
        return not self.reader_gone and bool(self._attempt("isatty"))

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, fileno...
        return getattr(self.stream, name)

    def release(self) -> None:
        """Restore sys.stdout; if the reader is gone, point fd 1 at /dev/null so the exit flush stays quiet."""
        sys.stdout = self.stream  # type: ignore[assignment]
        if self.reader_gone and self.stream is not None:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass
