"""Progress bars on stderr for the library's (stage, done, total) callback."""

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


class RunProgress:
    """The accuracy stage's bars: one for the sensitivity runs (total known), one for the fallback search."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.total: int | None = -1
        self.offset = 0

    def __call__(self, done: int, total: int | None) -> None:
        if total != self.total:
            self.close()
            self.bar = _RunBar("sensitivity" if total is not None else "fallback", unit="runs")
            self.total, self.offset = total, done - 1
        assert self.bar is not None
        self.bar(done - self.offset, None if total is None else total - self.offset)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _RunBar(Progress):
    def _rate(self, _: object) -> str:
        return f"{(time.perf_counter() - self.started) / max(self.done, 1):.1f} s/run"


class StageProgress:
    """The library's one (stage, done, total) callback as a bar per stage: a new stage closes the last bar.

    The accuracy stage gets `RunProgress`; the others a `Progress` labelled with the stage's name.
    """

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar: Progress | RunProgress | None = None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = RunProgress() if stage == "measuring accuracy" else Progress(
                stage, unit="classes" if stage.startswith("timing") else "samples")
        assert self.bar is not None
        self.bar(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
