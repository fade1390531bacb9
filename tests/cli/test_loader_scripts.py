"""A `--calib loader.py:function` that ends the process, fails, gives nothing, gives the wrong thing or never
ends: one line naming the script and what it did, exit 1, no output; never exit 0 without the model.
And `--max-samples N`, which makes an endless generator a documented use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import onnxq.data.sources
from tests.support.cli import CALIB_SAMPLES, Workspace, assert_one_line_error, assert_qdq_model, invoke

HEADER = "import sys\nimport numpy as np\n"

ENDLESS = '''
def load_data():
    feed = dict(np.load({calib!r}))
    while True:
        yield feed
'''


def _loader(work: Workspace, body: str) -> str:
    script = work.folder / "loader.py"
    script.write_text(HEADER + body.format(calib=str(work.calib)))
    return f"{script}:load_data"


@pytest.mark.parametrize(("body", "fragment"), [
    ("def load_data():\n    sys.exit(0)\n", "loader.py:load_data called sys.exit(0) (SystemExit) after 0 feeds"),
    ("def load_data():\n    sys.exit(3)\n", "loader.py:load_data called sys.exit(3) (SystemExit) after 0 feeds"),
    ("def load_data():\n    raise SystemExit('x')\n", "loader.py:load_data called sys.exit('x') (SystemExit) after 0 feeds"),
    ("def load_data():\n    yield dict(np.load({calib!r}))\n    sys.exit()\n",
     "loader.py:load_data called sys.exit(None) (SystemExit) after 1 feeds"),
    ("sys.exit(0)\ndef load_data():\n    return []\n", "loader.py: importing the data loader called sys.exit(0) (SystemExit)"),
    ("def load_data():\n    raise ValueError('no such folder')\n",
     "loader.py:load_data raised ValueError after 0 feeds: no such folder"),
    ("def load_data():\n    return []\n", "loader.py:load_data produced no feeds"),
    ("def load_data():\n    yield [1, 2]\n", "loader.py:load_data feed 0 is a list, not a dict of input name"),
    ("def load_data():\n    return None\n", "loader.py:load_data returned NoneType"),
], ids=["exit-0", "exit-3", "SystemExit-x", "exit-after-a-feed", "exit-on-import", "ValueError", "empty",
        "non-dict", "None"])
def test_a_failing_loader_is_one_line_and_exit_1(work: Workspace, body: str, fragment: str) -> None:
    loader = _loader(work, body)
    outcome = invoke("quantize", work.model, "--calib", loader, "-o", work.out / "q.onnx")
    assert_one_line_error(outcome, 1, fragment)
    if "sys.exit" in fragment:
        assert "a data loader must return or yield its feeds, not end the process" in outcome.stderr
    assert list(work.out.iterdir()) == []


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_sys_exit_0_in_a_real_process_is_exit_1_without_output(work: Workspace, command: str) -> None:
    """The issue's case: `sys.exit(0)` inside the loader made the process exit 0 with no model written."""
    loader = _loader(work, "def load_data():\n    sys.exit(0)\n")
    result = subprocess.run([sys.executable, "-m", "onnxq_cli", command, str(work.model), "--calib", loader,
                             "-o", str(work.out / "out")], cwd=work.folder, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "loader.py:load_data called sys.exit(0) (SystemExit)" in result.stderr
    assert list(work.out.iterdir()) == []


def test_an_endless_generator_with_max_samples_calibrates_on_the_first_n(work: Workspace) -> None:
    loader = _loader(work, ENDLESS)
    outcome = invoke("quantize", work.model, "--calib", loader, "--max-samples", "20", "--batch-size", "8",
                     "-o", work.out / "q.onnx")
    assert outcome.code == 0, outcome.stderr
    assert "  calibration  20 samples in 3 batches" in outcome.stdout
    assert_qdq_model(work.out / "q.onnx")


def test_max_samples_takes_the_first_n_of_any_source(work: Workspace) -> None:
    """An .npz of CALIB_SAMPLES: --max-samples 5 calibrates on 5; a larger N on all of them."""
    for limit, expected in ((5, 5), (CALIB_SAMPLES + 100, CALIB_SAMPLES)):
        outcome = invoke("calibrate", work.model, "--calib", work.calib, "--max-samples", str(limit),
                         "-o", work.out / "s.onnxq.npz")
        assert outcome.code == 0, outcome.stderr
        assert f"{expected} samples in" in outcome.stdout


def test_an_endless_generator_without_max_samples_is_stopped_with_a_hint(work: Workspace,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The default limit (100000 samples) lowered to 64 for the test: the run stops and says what to do."""
    monkeypatch.setattr(onnxq.data.sources, "SCRIPT_SAMPLE_LIMIT", 64)
    loader = _loader(work, ENDLESS)
    outcome = invoke("quantize", work.model, "--calib", loader, "-o", work.out / "q.onnx")
    assert_one_line_error(outcome, 1, "loader.py:load_data gave more than 64 samples without stopping",
                          "--max-samples N")
    assert list(work.out.iterdir()) == []


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-samples", "0"], "Invalid value for '--max-samples': 0 is not in the range x>=1."),
    (["--stats", "s.npz", "--max-samples", "4"], "--max-samples applies to --calib data, not to --stats"),
])
def test_max_samples_usage_errors(work: Workspace, extra: list[str], message: str) -> None:
    args = ["quantize", work.model, *(["--calib", work.calib] if "--stats" not in extra else []), *extra]
    outcome = invoke(*args)
    assert outcome.code == 2 and outcome.stderr.splitlines()[-1] == f"Error: {message}", outcome.stderr


def test_max_samples_is_documented() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "| `--max-samples N` |" in readme
    outcome = invoke("quantize", "--help")
    assert "--max-samples N" in outcome.stdout and "endless generator" in " ".join(outcome.stdout.split())
