"""A closed or broken stdout, a command without its arguments, and what `--help` costs.

stdout only carries the summary: a reader that has gone (`| head -1`) or a closed stdout (`>&-`) lets the
command finish, exit 0 with its files complete; a stdout that fails otherwise (a full disk) fails the command
with one line on stderr and no output left. Never an output written and a failure exit together.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxq.compare import Backend
from onnxq.config import AccuracyGoal
from onnxq.data.images import Layout
from onnxq_cli.compare import BACKENDS
from onnxq_cli.options import DEFAULT_HELD_BACK, LAYOUTS
from tests.support.cli import Workspace, assert_qdq_model, invoke

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="closed descriptors and /dev/full: Linux")


def _onnxq(args: list[str], cwd: Path, **streams: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxq_cli", *args], cwd=cwd, text=True, timeout=180, check=False,
                          **streams)  # type: ignore[call-overload]


def _file_commands(work: Workspace) -> dict[str, tuple[list[str], Path]]:
    """Commands that write a file, with the file."""
    stats = work.folder / "a.onnxq.npz"
    if not stats.exists():
        assert invoke("calibrate", work.model, "--calib", work.calib, "-o", stats).code == 0
    return {
        "quantize": (["quantize", str(work.model), "--calib", str(work.calib), "-o", str(work.out / "q.onnx")],
                     work.out / "q.onnx"),
        "calibrate": (["calibrate", str(work.model), "--calib", str(work.calib), "-o", str(work.out / "s.onnxq.npz")],
                      work.out / "s.onnxq.npz"),
        "stats merge": (["stats", "merge", str(stats), str(stats), "-o", str(work.out / "m.onnxq.npz")],
                        work.out / "m.onnxq.npz"),
        "compare": (["compare", str(work.model), str(work.model), "--data", str(work.calib), "--warmup", "0",
                     "--iterations", "1", "--json", str(work.out / "c.json")], work.out / "c.json"),
    }


def _check_written(command: str, path: Path) -> None:
    assert path.is_file()
    if command == "quantize":
        assert_qdq_model(path)
        onnx.checker.check_model(str(path), full_check=True)


@pytest.mark.parametrize("command", ["quantize", "calibrate", "stats merge", "compare"])
def test_a_reader_that_has_gone_lets_the_command_finish(work: Workspace, command: str) -> None:
    """stdout is a pipe whose read end is closed before the run: every write would raise EPIPE."""
    args, output = _file_commands(work)[command]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = _onnxq(args, work.folder, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    _check_written(command, output)
    assert sorted(path.name for path in work.out.iterdir()) == [output.name]


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_a_closed_stdout_lets_the_command_finish(work: Workspace, command: str) -> None:
    """`onnxq ... >&-`: no stdout at all; and the model file must not land on descriptor 1 either."""
    args, output = _file_commands(work)[command]
    line = " ".join(f"'{arg}'" for arg in [sys.executable, "-m", "onnxq_cli", *args]) + " >&-"
    result = subprocess.run(line, shell=True, cwd=work.folder, stderr=subprocess.PIPE, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    _check_written(command, output)


def test_with_stdout_closed_what_c_code_prints_goes_nowhere(work: Workspace) -> None:
    """A C library printf()s to descriptor 1, here a loader's os.write(1, ...): with `>&-` that descriptor
    must be /dev/null, not free (EBADF) nor a file onnxq opened (the bytes would land in it)."""
    loader = work.folder / "loader.py"
    loader.write_text("import os\nimport numpy as np\n"
                      "def load_data():\n"
                      f"    feed = dict(np.load({str(work.calib)!r}))\n"
                      "    for _ in range(3):\n"
                      "        os.write(1, b'progress from C code\\n')\n"
                      "        yield feed\n")
    output = work.out / "q.onnx"
    args = [sys.executable, "-m", "onnxq_cli", "quantize", str(work.model), "--calib", f"{loader}:load_data",
            "-o", str(output)]
    line = " ".join(f"'{arg}'" for arg in args) + " >&-"
    result = subprocess.run(line, shell=True, cwd=work.folder, stderr=subprocess.PIPE, text=True, timeout=180)
    assert (result.returncode, result.stderr) == (0, "")
    assert b"progress from C code" not in output.read_bytes()
    _check_written("quantize", output)


def test_a_stdout_that_cannot_be_written_fails_and_leaves_nothing(work: Workspace) -> None:
    """/dev/full: every write fails with ENOSPC. One line, exit 1, and the model that was saved is removed."""
    args, _output = _file_commands(work)["quantize"]
    with open("/dev/full", "w") as full:
        result = _onnxq(args, work.folder, stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 1
    assert result.stderr == "error: cannot write to stdout (No space left on device)\n"
    assert list(work.out.iterdir()) == []


def test_inspect_into_a_reader_that_has_gone(work: Workspace) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = _onnxq(["inspect", str(work.model)], work.folder, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("args", [["quantize"], ["calibrate"], ["compare"], ["inspect"], ["build"], ["stats"],
                                  ["stats", "merge"], ["stats", "show"], []], ids=" ".join)
def test_a_command_without_its_arguments_is_a_short_usage_error(tmp_path: Path, args: list[str]) -> None:
    """The issue: `onnxq quantize` printed the whole help (~100 lines) to stderr."""
    result = _onnxq(args, tmp_path, capture_output=True)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert lines[0].startswith(" ".join(["Usage: onnxq", *args]))
    assert lines[2].startswith(("Error: Missing argument", "Error: Missing command"))


def test_help_loads_neither_onnx_nor_onnx_runtime(tmp_path: Path) -> None:
    """`--help` of every command, in a fresh process: onnx and onnxruntime are never imported."""
    code = ("import sys\nfrom onnxq_cli.main import run, cli\n"
            "import click\n"
            "for name in ['quantize', 'calibrate', 'compare', 'inspect', 'build', 'stats']:\n"
            "    assert run([name, '--help']) == 0\n"
            "assert run(['stats', 'merge', '--help']) == 0\n"
            "heavy = sorted(m for m in ('onnx', 'onnxruntime', 'onnx_graphsurgeon', 'numpy') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "HEAVY []"


def test_the_choices_written_out_for_help_are_the_librarys() -> None:
    assert LAYOUTS == tuple(member.value for member in Layout)
    assert BACKENDS == tuple(member.value for member in Backend)
    assert DEFAULT_HELD_BACK == AccuracyGoal().samples


def test_selection_without_exclusions_lists_no_schemas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run builds a Selection; listing every ONNX schema (~40 ms) is only for a misspelling's hint."""
    from onnxq.options import Selection
    from onnxq.errors import ConfigError

    listed = []
    real = onnx.defs.get_all_schemas_with_history
    monkeypatch.setattr(onnx.defs, "get_all_schemas_with_history", lambda: listed.append(1) or real())
    Selection()
    Selection(exclude_op_types=("Conv", "LinearClassifier", "FlexAttention", "Upsample"))  # every domain, old ops
    assert listed == []
    with pytest.raises(ConfigError, match="'Gemmm' is not an ONNX op type. Hint: did you mean 'Gemm'"):
        Selection(exclude_op_types=("Gemmm",))
    assert listed == [1]



def test_a_failure_after_the_save_puts_back_the_file_it_replaced(work: Workspace) -> None:
    """-o naming an earlier result, then a failure after the new model was saved (stdout on /dev/full): the earlier
    file is back, byte for byte, and no kept copy is left in the folder."""
    args, output = _file_commands(work)["quantize"]
    output.write_bytes(b"an earlier result")
    with open("/dev/full", "w") as full:
        result = _onnxq(args, work.folder, stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 1 and "cannot write to stdout" in result.stderr
    assert output.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in work.out.iterdir()) == [output.name]
    replaced = _onnxq(args, work.folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert replaced.returncode == 0 and output.read_bytes() != b"an earlier result"
    assert sorted(p.name for p in work.out.iterdir()) == [output.name]  # the kept copy deleted on success
