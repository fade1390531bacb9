"""Running the `onnxq` command line in tests: in-process (`invoke`) or as a real process (`run_process`).

The `work` fixture (tests/cli/conftest.py) builds a `Workspace` with `make_workspace`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from click.testing import CliRunner
from onnx_graphsurgeon.logger import G_LOGGER

from models import BUILDERS, random_feeds
from onnxq_cli.main import run

__all__ = ["CALIB_SAMPLES", "Outcome", "Workspace", "make_workspace", "invoke", "run_process", "digest",
           "assert_qdq_model", "assert_one_line_error"]

# Samples in a Workspace's calibration file.
CALIB_SAMPLES = 8


class Outcome(NamedTuple):
    """What one CLI run produced; unpacks as (code, stdout, stderr)."""

    code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Workspace:
    """A small float model (`residual_cnn`), matching `.npz` calibration data and an empty `out` folder."""

    folder: Path
    model: Path
    calib: Path
    out: Path

    def listing(self) -> set[str]:
        """Every path under the folder, relative to it."""
        return {path.relative_to(self.folder).as_posix() for path in self.folder.rglob("*")}

    def quantize_args(self, *extra: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
        """`quantize MODEL --calib DATA` followed by `extra`."""
        return ["quantize", self.model, "--calib", self.calib, *extra]


def make_workspace(folder: Path) -> Workspace:
    """The synthetic residual CNN (input `input`, N x 3 x 32 x 32) and CALIB_SAMPLES random samples for it."""
    residual_model = BUILDERS["residual_cnn"]()
    model, calib, out = folder / "residual.onnx", folder / "calib.npz", folder / "out"
    onnx.save(residual_model, str(model))
    np.savez(calib, **random_feeds(residual_model, batch=CALIB_SAMPLES, seed=1))
    out.mkdir()
    return Workspace(folder, model, calib, out)


def invoke(*args: str | os.PathLike[str]) -> Outcome:
    """Run `onnxq ARGS` in-process through `run`; the global logging state is restored afterwards."""
    root = logging.getLogger()
    handlers, level, graphsurgeon_severity = root.handlers[:], root.level, G_LOGGER.severity
    try:
        with CliRunner().isolation() as (stdout, stderr, _):
            code = run([os.fspath(arg) for arg in args])
            sys.stdout.flush()
            sys.stderr.flush()
            return Outcome(code, stdout.getvalue().decode(), stderr.getvalue().decode())
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        G_LOGGER.severity = graphsurgeon_severity


def run_process(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `onnxq ARGS` as a real process with stdout and stderr captured (neither is a TTY)."""
    command = [sys.executable, "-m", "onnxq_cli", *(os.fspath(arg) for arg in args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def finish(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    """Wait for `process` to end: (exit code, stdout, stderr). A process still running after `timeout`
    seconds (the assertion that follows then fails) is killed and reaped, so none is left behind."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stdout, stderr


def signal_when_started(process: subprocess.Popen[str], marker: Path, sent: int = signal.SIGINT, *,
                        settle: float = 0.0, wait: float = 30, timeout: float = 30,
                        before: Callable[[], None] | None = None,
                        never: str = "the loader never started") -> tuple[int, str, str]:
    """Wait (up to `wait` seconds) until `marker` exists, i.e. the process has reached the moment under test;
    let it run `settle` seconds more, call `before()` (a check made at that moment), send `sent`, then
    `finish` it: (exit code, stdout, stderr). A process left running by a failed check is killed and reaped."""
    try:
        deadline = time.monotonic() + wait
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, never
            time.sleep(0.02)
        time.sleep(settle)
        if before is not None:
            before()
        process.send_signal(sent)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.communicate()
        raise
    return finish(process, timeout)


def spawn_process(*args: str | os.PathLike[str], cwd: Path, own_group: bool = False) -> subprocess.Popen[str]:
    """Start `onnxq ARGS` as a real process (stdout and stderr piped) that a test can send SIGINT to.

    `own_group`: in a process group (and session) of its own, whose id is its pid, so that `os.killpg` can
    signal it and everything it started, as a terminal's Ctrl-C does, without reaching the test runner.
    """
    command = [sys.executable, "-m", "onnxq_cli", *(os.fspath(arg) for arg in args)]
    # preexec_fn: a SIGINT ignored by a background CI job would be inherited, and Python would ignore it too.
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), start_new_session=own_group)


def digest(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_qdq_model(path: Path) -> None:
    """`path` passes the full ONNX checker and carries Q/DQ pairs."""
    onnx.checker.check_model(str(path), full_check=True)
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types


def assert_one_line_error(outcome: Outcome, code: int, *fragments: str) -> None:
    """Exit `code`, nothing on stdout, and stderr is a single `error:` line holding every fragment."""
    assert outcome.code == code, outcome
    assert outcome.stdout == ""
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
