"""The `onnxq` command line: exit codes, one-line errors, safe output writing, help text and real runs.

Most tests run `onnxq_cli.main.run` in-process in click's CliRunner isolation; those that need a real process
(Ctrl-C, tracebacks, a plain non-TTY stderr) run `python -m onnxq_cli`, the `onnxq` console script's twin.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime
import pytest

from onnxq.pipeline import prepare
from onnxq_cli.main import cli
from tests.support.cli import (CALIB_SAMPLES, Workspace, assert_one_line_error, assert_qdq_model, digest, invoke,
                               run_process, signal_when_started, spawn_process)
from tests.support.paths import REPO

PPOCR_MODEL = REPO / "models" / "ppocr_mobile_v2_cls.onnx"
TEXTLINES = REPO / "models" / "data" / "textlines"


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name in group.list_commands(click.Context(group)):
        command = group.get_command(click.Context(group), name)
        paths += _command_paths(command, (*prefix, name)) if isinstance(command, click.Group) else [(*prefix, name)]
    return paths


COMMAND_PATHS = _command_paths(cli)


def test_quantize_writes_a_checked_qdq_model(work: Workspace) -> None:
    """Success: exit 0, a one-screen summary on stdout, nothing on a non-TTY stderr, input untouched."""
    before = digest(work.model)
    outcome = invoke(*work.quantize_args("-o", work.out / "q.onnx"))
    assert outcome.code == 0 and outcome.stderr == "", outcome.stderr  # no progress bar text on a non-TTY
    assert outcome.stdout.startswith(f"wrote {work.out / 'q.onnx'}\n")
    assert f"calibration  {CALIB_SAMPLES} samples in 1 batch on CPUExecutionProvider" in outcome.stdout
    assert_qdq_model(work.out / "q.onnx")
    assert [path.name for path in work.out.iterdir()] == ["q.onnx"]
    assert digest(work.model) == before


def test_default_output_is_beside_the_input_in_a_real_process(work: Workspace) -> None:
    """Without -o the model goes to `<stem>.int8.onnx` beside the input, not into the working folder."""
    elsewhere = work.folder / "elsewhere"
    elsewhere.mkdir()
    before = work.listing()
    done = run_process("quantize", work.model, "--calib", work.calib, cwd=elsewhere)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith(f"wrote {work.folder / 'residual.int8.onnx'}\n")
    assert work.listing() == before | {"residual.int8.onnx"}
    assert_qdq_model(work.folder / "residual.int8.onnx")


@pytest.mark.slow
def test_real_ppocr_classifier_keeps_top1_agreement(tmp_path: Path) -> None:
    """The PP-OCR direction classifier quantizes and its INT8 top-1 agrees with float on the eval lines."""
    out = tmp_path / "ppocr.int8.onnx"
    before = digest(PPOCR_MODEL)
    outcome = invoke("quantize", PPOCR_MODEL, "--calib", TEXTLINES / "ppocr_cls_calib.npz",
                     "--eval", TEXTLINES / "ppocr_cls_eval.npz", "-o", out)
    assert outcome.code == 0, outcome.stderr
    lines = outcome.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("float vs int8 on 200 samples"))
    header, row = lines[start + 1].split(), lines[start + 2].split()
    assert header[-1] == "top-1" and row[-1].endswith("%"), outcome.stdout
    assert float(row[-1].rstrip("%")) >= 95.0
    assert_qdq_model(out)
    assert digest(PPOCR_MODEL) == before


def plan_rows(text: str) -> dict[str, tuple[str, str, str]]:
    """`inspect` output's node table as node name -> (op type, yes/no, reason)."""
    table = text.split("\n\n")[0].splitlines()
    assert table[0].split() == ["node", "op", "int8", "reason"]
    return {name: (op, int8, reason) for name, op, int8, reason in (line.split(None, 3) for line in table[1:])}


def test_inspect_lists_every_node_with_a_reason_and_summarizes(work: Workspace) -> None:
    """Every prepared node is listed with op type, decision and reason; `--summary` groups the float ones."""
    outcome = invoke("inspect", work.model)
    assert outcome.code == 0 and outcome.stderr == ""
    rows = plan_rows(outcome.stdout)
    nodes = prepare(onnx.load(str(work.model))).nodes
    assert set(rows) == {node.name for node in nodes}
    for node in nodes:
        op_type, int8, reason = rows[node.name]
        assert op_type == node.op and int8 in {"yes", "no"} and reason.strip()
    quantized = sum(int8 == "yes" for _, int8, _ in rows.values())
    assert 0 < quantized < len(rows)
    assert outcome.stdout.rstrip().splitlines()[-1].startswith(f"{quantized} nodes quantized")
    summary = invoke("inspect", work.model, "--summary")
    assert summary.code == 0
    lines = summary.stdout.splitlines()
    assert lines[0].startswith(f"{quantized} nodes quantized")
    groups = [re.fullmatch(r"\s+(\d+) x (\S+)\s+(\S.*)", line)
              for line in lines[lines.index("left float, by reason:") + 1:]]
    assert groups and all(groups), summary.stdout
    assert sum(int(group[1]) for group in groups) == len(rows) - quantized
    assert not [name for name in rows if name in summary.stdout]  # no single node listed


@pytest.mark.parametrize(("option", "value", "selected", "reason"), [
    ("--exclude-op-types", "Conv", lambda name, op_type: op_type == "Conv", "excluded by the user: op type Conv"),
    ("--exclude-nodes", "^block1/", lambda name, op_type: name.startswith("block1/"),
     "excluded by the user: name matches '^block1/'"),
], ids=["op-type", "node-regex"])
def test_inspect_reflects_exclusions(work: Workspace, option: str, value: str,
                                     selected: Callable[[str, str], bool], reason: str) -> None:
    """Excluded nodes are listed as float with the user's exclusion as the reason, in both views."""
    baseline = plan_rows(invoke("inspect", work.model).stdout)
    rows = plan_rows(invoke("inspect", work.model, option, value).stdout)
    hit = {name for name, (op_type, _, _) in rows.items() if selected(name, op_type)}
    assert any(baseline[name][1] == "yes" for name in hit)  # the exclusion changes something
    assert all(rows[name][1:] == ("no", reason) for name in hit), rows
    assert reason in invoke("inspect", work.model, option, value, "--summary").stdout


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "kl"], "Invalid value for '--method'"),
    (["--target", "ort"], "Invalid value for '--target'"),
    (["--exclude-op-types", "Relu,Convv"], "'Convv' is not an ONNX op type. Hint: did you mean 'Conv'?"),
    (["--exclude-nodes", "block1/("], "--exclude-nodes: invalid regular expression 'block1/('"),
    (["--providers", "cpu,nosuchep"], "--providers: unknown execution provider 'nosuchep'"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
], ids=["method", "target", "op-type", "regex", "provider", "batch-size"])
def test_usage_errors_exit_2(work: Workspace, extra: list[str], message: str) -> None:
    """Bad option values exit 2 with the problem on one line, no traceback, and nothing written."""
    before = work.listing()
    outcome = invoke(*work.quantize_args(*extra))
    assert outcome.code == 2 and outcome.stdout == "" and "Traceback" not in outcome.stderr
    assert len([line for line in outcome.stderr.splitlines() if message in line]) == 1, outcome.stderr
    if message.startswith("Invalid value"):  # click's own parsing: --debug adds no parser traceback
        assert invoke("--debug", *work.quantize_args(*extra)) == outcome
    assert work.listing() == before


def write_bad_inputs(folder: Path) -> None:
    """Files the runtime-error cases refer to: a text file named .onnx, an empty one, mismatched arrays."""
    (folder / "notes.onnx").write_text("not a model\n")
    (folder / "empty.onnx").write_bytes(b"")
    np.savez(folder / "small.npz", input=np.zeros((2, 3, 16, 16), np.float32))
    np.savez(folder / "named.npz", image=np.zeros((2, 3, 32, 32), np.float32))
    np.savez(folder / "eval64.npz", input=np.zeros((2, 3, 32, 32), np.float64))


@pytest.mark.parametrize(("args", "fragments"), [
    ("quantize absent.onnx --calib calib.npz", ["absent.onnx: no such model file"]),
    ("inspect absent.onnx", ["absent.onnx: no such model file"]),
    ("quantize notes.onnx --calib calib.npz", ["notes.onnx: not a readable ONNX model"]),
    ("inspect empty.onnx", ["empty.onnx: not an ONNX model"]),
    ("quantize residual.onnx --calib small.npz", ["small.npz: input 'input' has shape (2, 3, 16, 16)"]),
    ("quantize residual.onnx --calib named.npz", ["named.npz: array 'image' is not a model input", "'input'"]),
    ("quantize residual.onnx --calib calib.npz --eval eval64.npz", ["eval64.npz: input 'input' has dtype float64"]),
    ("quantize residual.onnx --calib calib.npz -o nope/q.onnx", ["nope/q.onnx", "nope does not exist"]),
], ids=["missing-model", "inspect-missing-model", "not-onnx", "empty-onnx", "calib-shape", "calib-name",
        "eval-dtype", "missing-output-folder"])
def test_runtime_errors_exit_1_naming_the_culprit(work: Workspace, args: str, fragments: list[str]) -> None:
    """Bad models, mismatched data and a missing output folder exit 1 with one line naming the file and tensor.

    Nothing is written: the eval data and the output folder are checked before calibration.
    """
    write_bad_inputs(work.folder)
    before = work.listing()
    argv = [str(work.folder / arg) if arg.endswith((".onnx", ".npz")) else arg for arg in args.split()]
    assert_one_line_error(invoke(*argv), 1, *fragments)
    assert work.listing() == before


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink", "calib-data"])
def test_output_naming_an_input_is_refused(work: Workspace, spelling: str) -> None:
    """`-o` naming the input (any spelling or link) or the calibration file exits 2; inputs stay intact."""
    target = {"same": work.model, "dotdot": work.out / ".." / work.model.name, "symlink": work.out / "link.onnx",
              "hardlink": work.out / "hard.onnx", "calib-data": work.calib}[spelling]
    if spelling == "symlink":
        target.symlink_to(work.model)
    elif spelling == "hardlink":
        os.link(work.model, target)
    digests = {path: digest(path) for path in (work.model, work.calib)}
    before = work.listing()
    assert_one_line_error(invoke(*work.quantize_args("-o", target)), 2, f"-o {target}", "refusing to overwrite")
    assert {path: digest(path) for path in digests} == digests
    assert work.listing() == before


@pytest.mark.parametrize(("error", "code", "message"), [
    (OSError(errno.ENOSPC, "No space left on device"), 1, "cannot write the model (No space left on device)"),
    (KeyboardInterrupt(), 130, "interrupted"),
], ids=["disk-full", "ctrl-c"])
def test_failed_save_leaves_no_partial_file(work: Workspace, monkeypatch: pytest.MonkeyPatch,
                                            error: BaseException, code: int, message: str) -> None:
    """A save that dies half-way leaves neither the output nor its temporary file behind."""
    def half_save(model: onnx.ModelProto, path: str, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"half a model")
        raise error

    monkeypatch.setattr(onnx, "save_model", half_save)
    outcome = invoke(*work.quantize_args("-o", work.out / "q.onnx"))
    assert outcome.code == code and message in outcome.stderr and "Traceback" not in outcome.stderr
    assert list(work.out.iterdir()) == []


LOADER = '''"""Says it started, then yields the calibration feed slowly; a Ctrl-C of its own after `stop` feeds."""
import time
from pathlib import Path
import numpy as np

def load_data():
    print("loader started", flush=True)
    Path({marker!r}).touch()
    feed = dict(np.load({calib!r}))
    for count in range(1_000_000):
        if count == {stop}:
            raise KeyboardInterrupt
        time.sleep({delay})
        yield feed
'''


def write_loader(work: Workspace, stop: int = -1, delay: float = 0.05) -> tuple[Path, Path]:
    """A `loader.py` and the marker file it touches when it starts."""
    loader, marker = work.folder / "loader.py", work.folder / "started"
    loader.write_text(LOADER.format(marker=str(marker), calib=str(work.calib), stop=stop, delay=delay))
    return loader, marker


@pytest.mark.parametrize("global_options", [[], ["--debug"]], ids=["plain", "debug"])
def test_ctrl_c_inside_calibration_exits_130(work: Workspace, global_options: list[str]) -> None:
    """A KeyboardInterrupt raised within the library's calibration loop maps to 130, even with --debug."""
    loader, marker = write_loader(work, stop=1, delay=0)
    outcome = invoke(*global_options, "quantize", work.model, "--calib", f"{loader}:load_data",
                     "--batch-size", "2", "-o", work.out / "q.onnx")
    assert outcome.code == 130 and marker.exists()
    assert outcome.stderr.strip() == "interrupted"
    assert list(work.out.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery to a child process is POSIX-only")
def test_sigint_to_a_real_process_exits_130_and_writes_nothing(work: Workspace) -> None:
    """Ctrl-C during calibration of a real `onnxq quantize`: exit 130, no traceback, no output, no temp file."""
    loader, marker = write_loader(work)
    process = spawn_process("quantize", work.model, "--calib", f"{loader}:load_data", "-o", work.out / "q.onnx",
                            cwd=work.folder)
    code, stdout, stderr = signal_when_started(process, marker, settle=0.3)  # let a few batches run
    assert code == 130, stderr
    assert "Traceback" not in stderr and stderr.strip() == "interrupted"
    assert stdout == "loader started\n"
    assert list(work.out.iterdir()) == []
    assert not [path for path in work.folder.rglob("*") if path.name.endswith(".tmp")]


def test_traceback_only_with_debug(work: Workspace) -> None:
    """Errors are one line without --debug; with it, the full traceback; the exit code is the same."""
    args = ("quantize", "absent.onnx", "--calib", work.calib.name)
    plain = run_process(*args, cwd=work.folder)
    debug = run_process("--debug", *args, cwd=work.folder)
    assert plain.returncode == debug.returncode == 1
    assert plain.stderr == "error: absent.onnx: no such model file\n"
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().endswith("ModelError: absent.onnx: no such model file")


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda path: " ".join(("onnxq", *path)))
def test_every_command_and_option_has_help(path: tuple[str, ...]) -> None:
    """`--help`/`-h` exit 0 with help on stdout; no arguments is a usage error (exit 2, three lines on stderr: the
    usage, where the help is, the error); every option has help."""
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.get_command(click.Context(command), name)
    assert command is not None and command.help and command.help.strip()
    usage = " ".join(("Usage: onnxq", *path))
    bare = invoke(*path)
    error = "Error: Missing command." if isinstance(command, click.Group) else "Error: Missing argument '"
    lines = bare.stderr.splitlines()
    assert bare.code == 2 and bare.stdout == "" and len(lines) == 3, bare
    assert lines[0].startswith(usage) and lines[1] == f"Try '{' '.join(('onnxq', *path))} --help' for help."
    assert lines[2].startswith(error), lines
    for flag in ("--help", "-h"):
        outcome = invoke(*path, flag)
        assert outcome.code == 0 and outcome.stderr == "" and outcome.stdout.startswith(usage)
    assert outcome.stdout.splitlines()[0] == bare.stderr.splitlines()[0]
    options = [param for param in command.params if isinstance(param, click.Option)]
    assert options or isinstance(command, click.Group)
    for option in options:
        assert option.help and option.help.strip(), f"{option.name} has no help text"
        assert max(option.opts, key=len) in outcome.stdout


@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
                    reason="this onnxruntime build does not list CUDAExecutionProvider")
def test_cuda_request_without_a_gpu_still_succeeds_and_says_so(work: Workspace) -> None:
    """`--providers cuda,cpu` runs; when CUDA cannot be loaded the summary says so and names the fallback."""
    outcome = invoke(*work.quantize_args("--providers", "cuda,cpu"))
    assert outcome.code == 0, outcome.stderr
    assert_qdq_model(work.folder / "residual.int8.onnx")
    calibration = next(line for line in outcome.stdout.splitlines() if line.startswith("  calibration"))
    note = "note         CUDAExecutionProvider requested but could not be loaded: calibration ran on CPU"
    assert (note in outcome.stdout) != ("CUDAExecutionProvider" in calibration)  # noted unless CUDA did load
