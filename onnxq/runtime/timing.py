"""Latency of models run on one fixed input: interleaved timed runs and their statistics.

`time_interleaved` warms every model up and then times them in turn (A, B, A, B, ...), so that a burst
of load from elsewhere on the machine, a clock change or a thermal throttle lands on all of them
alike instead of on whichever happened to run last. A model is given as a `Timer`: a function that
runs it once and returns how long that run took in milliseconds. `wall_clock_timer` makes one from
any callable with `time.perf_counter_ns`; a GPU backend can return times from its own events instead.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from onnxq.errors import ConfigError

__all__ = ["LatencyStats", "Timer", "format_latency", "percentile", "speedup", "time_interleaved",
           "wall_clock_timer"]

Timer = Callable[[], float]
"""Runs a model once and returns the duration of that run in milliseconds."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile of `values`, linearly interpolated between the two nearest ranks.

    The value at rank `(n - 1) * q / 100` of the sorted values (NumPy's default "linear" method): the
    50th percentile of [1, 2, 3, 4] is 2.5, the 90th of 1..10 is 9.1.

    Args:
        values: at least one number.
        q: the percentile, 0 to 100.

    Raises:
        ConfigError: `values` is empty or `q` is outside 0..100.
    """
    if len(values) == 0:
        raise ConfigError("a percentile of no values is undefined")
    if not 0.0 <= q <= 100.0:
        raise ConfigError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(float(value) for value in values)
    rank = (len(ordered) - 1) * q / 100.0
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


@dataclass(frozen=True)
class LatencyStats:
    """Timed runs of one model and their summary, all in milliseconds.

    Attributes:
        runs_ms: every timed run, in the order they ran.
        median_ms: the 50th percentile.
        p90_ms: the 90th percentile (interpolated, see `percentile`).
        mean_ms: the arithmetic mean.
        min_ms: the fastest run.
        max_ms: the slowest run.
    """

    runs_ms: tuple[float, ...]
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, runs_ms: Sequence[float]) -> LatencyStats:
        """Summarise `runs_ms` (at least one run).

        Raises:
            ConfigError: there are no runs.
        """
        runs = tuple(float(value) for value in runs_ms)
        if not runs:
            raise ConfigError("latency statistics need at least one timed run")
        return cls(runs_ms=runs, median_ms=percentile(runs, 50.0), p90_ms=percentile(runs, 90.0),
                   mean_ms=math.fsum(runs) / len(runs), min_ms=min(runs), max_ms=max(runs))


def speedup(reference: LatencyStats, candidate: LatencyStats) -> float:
    """How many times faster `candidate` is than `reference`: the ratio of their medians.

    Above 1 the candidate is faster. +inf when the candidate's median is 0 and the reference's is not;
    NaN when both are 0.
    """
    if candidate.median_ms == 0.0:
        return math.nan if reference.median_ms == 0.0 else math.inf
    return reference.median_ms / candidate.median_ms


def wall_clock_timer(run: Callable[[], object]) -> Timer:
    """A `Timer` that calls `run` once and measures the call with `time.perf_counter_ns`."""

    def timed() -> float:
        started = time.perf_counter_ns()
        run()
        return (time.perf_counter_ns() - started) / 1e6

    return timed


def time_interleaved(timers: Sequence[Timer], warmup: int, iterations: int) -> tuple[LatencyStats, ...]:
    """Warm up, then time every model `iterations` times, taking turns: A, B, A, B, ...

    The warm-up runs take turns as well. Python's garbage collector is paused while the runs take
    place (as `timeit` does), so a collection cannot land inside one model's timed run.

    Args:
        timers: one per model; each runs its model once and returns the run's duration in ms.
        warmup: untimed runs per model first (0 or more).
        iterations: timed runs per model (1 or more).

    Returns:
        One LatencyStats per timer, in the order of `timers`.

    Raises:
        ConfigError: no timers, `warmup` < 0, `iterations` < 1, or a timer returned a negative or
            non-finite duration.
    """
    if not timers:
        raise ConfigError("nothing to time: no models given")
    if warmup < 0 or iterations < 1:
        raise ConfigError(f"timing needs warm-up >= 0 and iterations >= 1, got {warmup} and {iterations}")
    runs: list[list[float]] = [[] for _ in timers]
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(warmup):
            for timer in timers:
                timer()
        for _ in range(iterations):
            for timer, durations in zip(timers, runs):
                durations.append(float(timer()))
    finally:
        if collecting:
            gc.enable()
    for durations in runs:
        invalid = [value for value in durations if not (math.isfinite(value) and value >= 0.0)]
        if invalid:
            raise ConfigError(f"a timer returned an invalid duration: {invalid[0]} ms")
    return tuple(LatencyStats.of(durations) for durations in runs)


def format_latency(rows: Sequence[tuple[str, LatencyStats]]) -> str:
    """An aligned text table: one row per (label, stats) with median, p90, min and max in ms."""
    header = ("model", "median ms", "p90 ms", "min ms", "max ms")
    cells = [header] + [
        (label, *(f"{value:.2f}" for value in (s.median_ms, s.p90_ms, s.min_ms, s.max_ms))) for label, s in rows
    ]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = []
    for row in cells:
        parts = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)

