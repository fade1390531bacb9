"""`onnxq quantize --min-cosine C --jobs N`: the accuracy target measured in N processes.

Real processes on the PP-OCR classifier: the same summary as `--jobs 1`; a Ctrl-C while the measuring
processes run exits 130 with one line and leaves none of them; a measuring process killed from outside
ends the command with one `error:` line, exit 1, nothing written.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import finish, invoke, spawn_process
from tests.support.paths import MODELS

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc: Linux only")

PPOCR = MODELS / "ppocr_mobile_v2_cls.onnx"
TEXTLINES = MODELS / "data" / "textlines"


def _args(output: Path, *extra: str, held_back: int = 200) -> list[str | os.PathLike[str]]:
    """A target that needs 6 of 72 layers float; 200 held-back samples keep the processes measuring for seconds."""
    return ["quantize", PPOCR, "--calib", TEXTLINES / "ppocr_cls_calib.npz", "--eval", TEXTLINES / "ppocr_cls_eval.npz",
            "--method", "entropy", "--min-cosine", "0.9995", "--held-back", str(held_back), "-o", output, *extra]


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _measuring(process: subprocess.Popen[str], then: float) -> list[int]:
    """Wait until the command has its two measuring processes, then `then` seconds more; their pids."""
    deadline = time.monotonic() + 120
    while len(children := _children(process.pid)) < 2:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no measuring processes were started"
        time.sleep(0.02)
    time.sleep(then)
    assert process.poll() is None, f"the command ended before the signal: {process.communicate()}"
    return children


def _gone(pids: list[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_jobs_2_prints_what_jobs_1_prints(tmp_path: Path) -> None:
    serial = invoke(*_args(tmp_path / "serial.onnx", held_back=32))
    parallel = invoke(*_args(tmp_path / "parallel.onnx", "--jobs", "2", held_back=32))
    assert serial.code == parallel.code == 0, parallel.stderr
    assert (tmp_path / "serial.onnx").read_bytes() == (tmp_path / "parallel.onnx").read_bytes()

    def figures(stdout: str) -> list[str]:  # the summary without the output's name, the timings and the run count
        return [re.sub(r"\d+\.\d s\b|\(\d+ runs( \(\d+ measured ahead, unused\))?", "", line)
                for line in stdout.splitlines()[1:]]

    def search_runs(stdout: str) -> tuple[int, int]:  # the fallback's runs, and those measured ahead and unused
        found = re.search(r"layers in float \((\d+) runs(?: \((\d+) measured ahead, unused\))?,", stdout)
        assert found is not None, stdout
        return int(found[1]), int(found[2] or 0)

    assert "met with 6 of 72 layers in float" in parallel.stdout
    assert figures(parallel.stdout) == figures(serial.stdout)
    (serial_runs, none), (parallel_runs, wasted) = search_runs(serial.stdout), search_runs(parallel.stdout)
    assert none == 0 and wasted > 0 and parallel_runs - wasted == serial_runs


@pytest.mark.parametrize(("group", "then"), [(False, 1.5), (True, 1.5), (True, 0.0)],
                         ids=["to-the-process", "to-its-group", "to-its-group-as-they-start"])
def test_ctrl_c_while_the_processes_measure(tmp_path: Path, group: bool, then: float) -> None:
    """SIGINT to the command alone, or to its whole process group as a terminal's Ctrl-C sends it, also while
    the measuring processes still import (in sessions of their own, they do not get it: no traceback)."""
    process = spawn_process(*_args(tmp_path / "q.onnx", "--jobs", "2"), cwd=tmp_path, own_group=group)
    children = _measuring(process, then=then)
    if group:
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code, _stdout, stderr = finish(process)
    assert code == 130 and stderr == "interrupted\n", stderr
    assert time.monotonic() - sent < 10
    assert _gone(children), [pid for pid in children if _alive(pid)]
    assert list(tmp_path.iterdir()) == []


def test_a_killed_measuring_process_is_one_error_line(tmp_path: Path) -> None:
    process = spawn_process(*_args(tmp_path / "q.onnx", "--jobs", "2"), cwd=tmp_path)
    children = _measuring(process, then=1.5)
    os.kill(children[0], signal.SIGKILL)
    code, stdout, stderr = finish(process)
    assert code == 1 and stdout == "", stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: measuring process "), stderr
    assert f"(pid {children[0]}) was killed by SIGKILL while " in lines[0]
    assert _gone(children)
    assert list(tmp_path.iterdir()) == []


def test_jobs_needs_a_target_and_at_least_one(tmp_path: Path) -> None:
    no_target = invoke("quantize", PPOCR, "--calib", TEXTLINES / "ppocr_cls_calib.npz", "--jobs", "2",
                       "-o", tmp_path / "q.onnx")
    assert no_target.code == 2 and "Error: --jobs needs an accuracy target" in no_target.stderr
    zero = invoke(*_args(tmp_path / "q.onnx", "--jobs", "0"))
    assert zero.code == 2 and "--jobs" in zero.stderr
    assert list(tmp_path.iterdir()) == []
