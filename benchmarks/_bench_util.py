"""Helpers for the on-demand benchmarks: child processes watched for memory and time, figures that may be bounds.

A benchmark child prints `{"started": <epoch seconds>}` when its measured work begins and, on its last
line, a JSON object with at least `seconds` (wall time of the work) and `peak_rss_kib` (its own peak
RSS: VmHWM, not `ru_maxrss`, which carries the parent's peak across execve). `run_watched` starts it,
samples its VmRSS every `poll` seconds, kills it (by its pid) above an RSS cap or after a timeout, and
turns what happened into `Figure`s: exact values, or lower bounds for a run that was cut short.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class Figure:
    """A number, exact (`bound` ""), or known only to be above (">") or below ("<") `value`."""

    value: float
    bound: str = ""

    def text(self, fmt: str = "{:.1f}") -> str:
        """E.g. "12.3", ">41.0"."""
        return self.bound + fmt.format(self.value)


def divide(a: Figure | None, b: Figure | None) -> Figure | None:
    """a / b with the bounds carried through; None when they cannot be combined (or b is 0)."""
    if a is None or b is None or b.value == 0:
        return None
    kinds = {("", ""): "", (">", ""): ">", ("<", ""): "<", ("", ">"): "<", ("", "<"): ">"}
    kind = kinds.get((a.bound, b.bound))
    return None if kind is None else Figure(a.value / b.value, kind)


def per_unit(high: Figure | None, low: Figure | None, units: float) -> Figure | None:
    """(high - low) / units: the cost of one more unit with fixed costs cancelled (None if unknowable)."""
    if high is None or low is None or low.bound or (high.bound and high.value <= low.value):
        return None
    return Figure((high.value - low.value) / units, high.bound)


def verdict(figure: Figure | None, at_most: float | None = None, at_least: float | None = None) -> str:
    """"met", "NOT met" or "undecided" for `figure <= at_most` or `figure >= at_least`."""
    if figure is None:
        return "undecided"
    value, bound = figure.value, figure.bound
    if at_most is not None:
        if value <= at_most and bound in ("", "<"):
            return "met"
        if (value > at_most and bound in ("", ">")) or (value == at_most and bound == ">"):
            return "NOT met"
        return "undecided"
    assert at_least is not None
    if value >= at_least and bound in ("", ">"):
        return "met"
    if (value < at_least and bound in ("", "<")) or (value == at_least and bound == "<"):
        return "NOT met"
    return "undecided"


@dataclass(frozen=True)
class RunResult:
    """What one watched child run measured.

    Attributes:
        seconds: wall time of the child's work (a lower bound if it was killed).
        peak_rss: peak resident set size in bytes (a lower bound if it was killed).
        note: why the figures are bounds or missing ("killed at >12 GiB after 41 s"); "" for a clean run.
        extra: any other fields of the child's JSON line.
    """

    seconds: Figure | None
    peak_rss: Figure | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def vm_rss_bytes(pid: int) -> int:
    """VmRSS of process `pid` from /proc (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _json_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def busy_cpu_seconds() -> float:
    """CPU time spent busy by the whole machine since boot, all cores summed (from /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, cores: float = 0.2, window: float = 1.0) -> float:
    """Wait (up to `max_wait` s) until the machine is busy on fewer than `cores` cores over `window` s.

    Returns the seconds waited. Meant to be called while nothing of ours runs, so any load is others'.
    """
    started = time.monotonic()
    while time.monotonic() - started < max_wait:
        before = busy_cpu_seconds()
        time.sleep(window)
        if (busy_cpu_seconds() - before) / window < cores:
            break
    return time.monotonic() - started


def best_of(attempts: Sequence[RunResult]) -> RunResult:
    """Repeated runs of one configuration as one: the fastest wall time, the largest peak RSS."""
    if len(attempts) == 1 or any(a.note or a.seconds is None or a.peak_rss is None for a in attempts):
        return attempts[-1]
    fastest = min(attempts, key=lambda a: a.seconds.value)  # type: ignore[union-attr]
    peak = max(a.peak_rss.value for a in attempts)  # type: ignore[union-attr]
    return RunResult(fastest.seconds, Figure(peak), "", {**fastest.extra, "runs": len(attempts)})


def run_watched(argv: Sequence[str], rss_cap: int, timeout: float, poll: float = 0.2) -> RunResult:
    """Run `argv`, killing it above `rss_cap` bytes of VmRSS or after `timeout` seconds.

    When the child reports `cpu_seconds`, `extra["others_cores"]` is how many cores' worth of CPU the
    rest of the machine used meanwhile (contention that inflates the wall time).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy_before = busy_cpu_seconds()
        child = subprocess.Popen(list(argv), stdout=out, stderr=err)
        launched = time.monotonic()
        seen = 0
        reason = ""
        while child.poll() is None:
            rss = vm_rss_bytes(child.pid)
            seen = max(seen, rss)
            if rss > rss_cap:
                reason = f"killed at >{rss_cap / GIB:g} GiB"
            elif time.monotonic() - launched > timeout:
                reason = f"timed out ({timeout:g} s) at {seen / GIB:.1f} GiB"
            if reason:
                child.kill()
                child.wait()
                break
            time.sleep(poll)
        stopped, elapsed = time.time(), time.monotonic() - launched
        busy = busy_cpu_seconds() - busy_before
        out.seek(0)
        err.seek(0)
        records = _json_lines(out.read().decode(errors="replace"))
        errors = err.read().decode(errors="replace").strip().splitlines()
    if reason:
        starts = [r["started"] for r in records if "started" in r]
        worked = stopped - starts[0] if starts else time.monotonic() - launched
        return RunResult(Figure(worked, ">"), Figure(seen, ">"), f"{reason} after {worked:.0f} s")
    final = records[-1] if records and "seconds" in records[-1] else None
    if child.returncode != 0 or final is None:
        last = errors[-1] if errors else "no output"
        return RunResult(None, None, f"failed (exit {child.returncode}): {last[:120]}")
    extra = {k: v for k, v in final.items() if k not in ("seconds", "peak_rss_kib")}
    if "cpu_seconds" in final:
        extra["others_cores"] = max(0.0, busy - final["cpu_seconds"]) / elapsed
    return RunResult(Figure(final["seconds"]), Figure(final["peak_rss_kib"] * 1024), "", extra)


REPEAT_BELOW_S = 20.0  # runs shorter than this are repeated and the fastest is kept
CONTENDED_CORES = 0.25  # a run during which other processes used more CPU than this is "contended"


def contended(result: RunResult) -> bool:
    """Whether other processes took more than CONTENDED_CORES cores' worth of CPU during the run."""
    return result.extra.get("others_cores", 0.0) > CONTENDED_CORES


def measure(argv: Sequence[str], rss_cap: int, timeout: float, repeat: int, quiet_wait: float,
            earlier: Sequence[RunResult] = ()) -> list[RunResult]:
    """`earlier` plus new runs of `argv`, each after waiting up to `quiet_wait` s for the machine to idle.

    Runs again while fewer than `repeat` runs were made and the last one was clean and either shorter
    than REPEAT_BELOW_S or the only contended one so far. Keep `best_of` the result.
    """
    attempts = list(earlier)
    while True:
        wait_for_quiet(quiet_wait)
        attempts.append(run_watched(argv, rss_cap, timeout))
        last = attempts[-1]
        if last.note or last.seconds is None or len(attempts) >= repeat:
            return attempts
        if last.seconds.value >= REPEAT_BELOW_S and not (contended(last) and sum(map(contended, attempts)) == 1):
            return attempts
