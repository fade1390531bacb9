"""A progress bar on stderr for the library's (done, total) callbacks."""

from __future__ import annotations

import sys
import time

import click


def plural(count: int, word: str, plural_form: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural_form or word + 's'}"


class Progress:
    """A click progress bar on stderr driven by the library's (done, total) callback.

    Drawn only when stderr is a terminal and `-q` was not given, so logs and pipes stay clean.
    """

    def __init__(self, label: str, quiet: bool | None = None, unit: str = "samples") -> None:
        if quiet is None:
            context = click.get_current_context(silent=True)
            quiet = bool(context and context.find_root().params.get("quiet"))
        self.label, self.bar, self.done, self.started = label, None, 0, time.perf_counter()
        self.unit = unit
        self.stream = sys.stderr
        self.hidden = quiet or self.stream is None or not self.stream.isatty()  # None: no console (pythonw)

    def __call__(self, done: int, total: int | None) -> None:
        if self.hidden:
            return
        if self.bar is None:
            # An unsized iterable makes a bar of unknown length (position and rate only).
            unsized = (item for item in ())
            self.bar = click.progressbar(unsized if total is None else None, length=total, label=self.label,
                                         file=self.stream, show_pos=True, item_show_func=self._rate)
            self.bar.__enter__()
        step, self.done = done - self.done, done
        self.bar.update(step)

    def _rate(self, _: object) -> str:
        return f"{self.done / max(time.perf_counter() - self.started, 1e-9):.1f} {self.unit}/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
