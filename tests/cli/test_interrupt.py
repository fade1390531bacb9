"""Ctrl-C at any moment of any command: exit 130, one line on stderr, no output and no temporary file left,
and the process gone within a bounded time (no thread or child process holds it).

Real processes (`python -m onnxq_cli`, the console script's twin), a real SIGINT, a clock. The moments:
while onnx, ml_dtypes and ONNX Runtime import (seen as numpy's library appearing in the process's memory map,
so the signal lands after CPython's own start-up, which no Python code can handle), at fixed delays after
the start, and while a data-loader script feeds the calibration, the sensitivity runs or the latency search.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.support.cli import Workspace, finish, invoke, spawn_process

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGINT to a child and /proc/PID/maps: Linux only")

# How long a process may take to end after the SIGINT: a C extension's import (ml_dtypes: 0.5-1.2 s here)
# or one ONNX Runtime batch finishes first. Generous for a machine under load; a hang is minutes.
EXIT_WITHIN = 10.0

SLOW_LOADER = '''"""Touches a marker on each call, then yields the calibration feed slowly, without end."""
import time
from pathlib import Path
import numpy as np

def load_data():
    marker = Path({marker!r})
    marker.write_text(str(int(marker.read_text()) + 1) if marker.exists() else "1")
    feed = dict(np.load({calib!r}))
    while True:
        time.sleep(0.05)
        yield feed
'''

THREAD_LOADER = '''"""Starts a thread that never ends (not a daemon), then yields slowly: it must not hold the exit."""
import threading, time
from pathlib import Path
import numpy as np

def load_data():
    threading.Thread(target=time.sleep, args=(3600,), name="loader-worker").start()
    Path({marker!r}).write_text("1")
    feed = dict(np.load({calib!r}))
    while True:
        time.sleep(0.05)
        yield feed
'''


def _interrupt(args: list[str], cwd: Path, wait: Callable[[subprocess.Popen[str]], None]) -> tuple[int, str, str, float]:
    """Start `onnxq ARGS`, `wait` for the moment, send SIGINT; (exit code, stdout, stderr, seconds to exit)."""
    process = spawn_process(*args, cwd=cwd)
    try:
        wait(process)
        assert process.poll() is None, f"the command ended before the signal: {process.communicate()}"
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        return process.returncode, stdout, stderr, time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def after(seconds: float) -> Callable[[subprocess.Popen[str]], None]:
    return lambda process: time.sleep(seconds)


def while_importing(process: subprocess.Popen[str]) -> None:
    """Until numpy's library is mapped: the heavy imports have begun (onnx, ml_dtypes and ORT follow)."""
    deadline = time.monotonic() + 30
    maps = Path(f"/proc/{process.pid}/maps")
    while "_multiarray_umath" not in maps.read_text():
        assert time.monotonic() < deadline and process.poll() is None, "numpy was never imported"
        time.sleep(0.002)


def once_started(marker: Path, calls: int = 1, then: float = 0.3) -> Callable[[subprocess.Popen[str]], None]:
    """Until the loader script has been called `calls` times, then `then` seconds more."""
    def wait(process: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text() and int(marker.read_text()) >= calls):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the loader was not called"
            time.sleep(0.02)
        time.sleep(then)
    return wait


def assert_interrupted(outcome: tuple[int, str, str, float], folder: Path, before: set[Path]) -> None:
    """Exit 130, exactly the one line `interrupted` on stderr, quick, and no file added anywhere in `folder`."""
    code, _stdout, stderr, seconds = outcome
    assert code == 130, stderr
    assert stderr == "interrupted\n", stderr
    assert seconds < EXIT_WITHIN, f"{seconds:.1f} s from the signal to the exit"
    added = {path for path in folder.rglob("*") if path not in before and path.name != "started"}
    assert not added, sorted(map(str, added))


def _slow_loader(work: Workspace, template: str = SLOW_LOADER) -> tuple[str, Path]:
    loader, marker = work.folder / "loader.py", work.folder / "started"
    loader.write_text(template.format(marker=str(marker), calib=str(work.calib)))
    return f"{loader}:load_data", marker


def _commands(work: Workspace, loader: str) -> dict[str, list[str]]:
    """Every command, with arguments that make it do real work (build stops for want of TensorRT)."""
    stats = work.folder / "residual.onnxq.npz"
    if not stats.exists():
        assert invoke("calibrate", work.model, "--calib", work.calib, "-o", stats).code == 0
    return {
        "quantize": ["quantize", str(work.model), "--calib", loader, "-o", str(work.out / "q.onnx")],
        "calibrate": ["calibrate", str(work.model), "--calib", loader, "-o", str(work.out / "s.onnxq.npz")],
        "compare": ["compare", str(work.model), str(work.model), "--data", loader, "--json", str(work.out / "c.json")],
        "inspect": ["inspect", str(work.model)],
        "stats": ["stats", "show", str(stats)],
        "build": ["build", str(work.model), "-o", str(work.out / "m.plan")],
    }


COMMANDS = ["quantize", "calibrate", "compare", "inspect", "stats", "build"]


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_while_the_libraries_import(work: Workspace, command: str) -> None:
    """The issue's start-up case: a traceback and death by the signal before; now 130 and one line."""
    loader, _marker = _slow_loader(work)
    args = _commands(work, loader)[command]
    before = set(work.folder.rglob("*"))
    assert_interrupted(_interrupt(args, work.folder, while_importing), work.folder, before)


def _before_onnxq_ran(outcome: tuple[int, str, str, float]) -> bool:
    """The signal came inside CPython's own start-up (its `site` import; 10-40 ms here, longer under heavy
    load), before any onnxq code: the interpreter dies by it or reports a fatal error there."""
    code, _stdout, stderr, _seconds = outcome
    return "init_import_site" in stderr or (code == -signal.SIGINT and "onnxq" not in stderr)


@pytest.mark.parametrize("delay", [0.05, 0.3, 1.0])
def test_ctrl_c_at_fixed_delays_after_the_start(work: Workspace, delay: float) -> None:
    """A signal that fell into CPython's own start-up (recognised by `_before_onnxq_ran`) is repeated."""
    loader, _marker = _slow_loader(work)
    args = _commands(work, loader)["quantize"]
    before = set(work.folder.rglob("*"))
    for _attempt in range(5):
        outcome = _interrupt(args, work.folder, after(delay))
        if not _before_onnxq_ran(outcome):
            break
    assert_interrupted(outcome, work.folder, before)


@pytest.mark.parametrize("command", ["quantize", "calibrate", "compare"])
def test_ctrl_c_while_the_data_loader_feeds(work: Workspace, command: str) -> None:
    loader, marker = _slow_loader(work)
    args = _commands(work, loader)[command]
    before = set(work.folder.rglob("*"))
    assert_interrupted(_interrupt(args, work.folder, once_started(marker)), work.folder, before)


@pytest.mark.parametrize("stage", [
    pytest.param(["--min-cosine", "0.999999", "--max-samples", "48"], id="sensitivity"),
    pytest.param(["--target", "ort-cpu", "--latency-search", "--max-samples", "48"], id="latency-search"),
])
def test_ctrl_c_in_the_later_stages(work: Workspace, stage: list[str]) -> None:
    """Calibration over (the loader has been called again, by a later stage), then the signal."""
    loader, marker = _slow_loader(work)
    args = [*_commands(work, loader)["quantize"], *stage]
    before = set(work.folder.rglob("*"))
    assert_interrupted(_interrupt(args, work.folder, once_started(marker, calls=2, then=0.2)), work.folder, before)


def test_a_thread_of_the_loader_does_not_hold_the_exit(work: Workspace) -> None:
    loader, marker = _slow_loader(work, THREAD_LOADER)
    args = _commands(work, loader)["quantize"]
    before = set(work.folder.rglob("*"))
    outcome = _interrupt(args, work.folder, once_started(marker))
    assert_interrupted(outcome, work.folder, before)


def test_a_thread_of_a_failing_loader_does_not_hold_the_exit(work: Workspace) -> None:
    """No Ctrl-C: the loader starts a never-ending thread and then fails; exit 1 with its one line, at once."""
    loader = work.folder / "loader.py"
    loader.write_text("import threading, time\n"
                      "def load_data():\n"
                      "    threading.Thread(target=time.sleep, args=(3600,)).start()\n"
                      "    raise ValueError('no data today')\n")
    process = spawn_process("quantize", work.model, "--calib", f"{loader}:load_data", "-o", work.out / "q.onnx",
                            cwd=work.folder)
    code, stdout, stderr = finish(process)
    assert code == 1 and stdout == ""
    assert stderr == f"error: {loader}:load_data raised ValueError after 0 feeds: no data today\n"
    assert list(work.out.iterdir()) == []


def test_ctrl_c_during_eval_leaves_nothing(work: Workspace) -> None:
    """--eval is measured after calibration; its data here is the slow loader."""
    loader, marker = _slow_loader(work)
    args = ["quantize", str(work.model), "--calib", str(work.calib), "--eval", loader, "-o", str(work.out / "q.onnx")]
    before = set(work.folder.rglob("*"))
    assert_interrupted(_interrupt(args, work.folder, once_started(marker)), work.folder, before)


def test_ctrl_c_after_the_model_was_written_removes_it(work: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while the summary is printed, after the model and the report were written: exit 130 must
    leave neither (nor the report folder the run created)."""
    import click

    real_echo = click.echo

    def echo(message: object = None, *args: object, **kwargs: object) -> None:
        if str(message).startswith("  report"):
            assert (work.out / "q.onnx").is_file() and (work.out / "report" / "report.json").is_file()
            raise KeyboardInterrupt
        real_echo(message, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(click, "echo", echo)
    outcome = invoke(*work.quantize_args("-o", work.out / "q.onnx", "--report", work.out / "report"))
    assert outcome.code == 130 and outcome.stderr == "interrupted\n", outcome
    assert list(work.out.iterdir()) == []


def test_a_run_without_signal_still_writes_its_outputs(work: Workspace) -> None:
    """The counterpart: the same command, not interrupted, exits 0 with the model written."""
    loader = work.folder / "finite.py"
    loader.write_text(f"import numpy as np\ndef load_data():\n    return [dict(np.load({str(work.calib)!r}))]\n")
    process = spawn_process("quantize", work.model, "--calib", f"{loader}:load_data", "-o", work.out / "q.onnx",
                            cwd=work.folder)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stdout.startswith(f"wrote {work.out / 'q.onnx'}") and (work.out / "q.onnx").is_file()
    assert np.array_equal(sorted(p.name for p in work.out.iterdir()), ["q.onnx"])
