"""`--ray` on the command line: the same statistics file as without it, one-line errors, Ctrl-C."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import digest, invoke, signal_when_started, spawn_process
from tests.support.paths import MODELS, REPO

PPOCR = MODELS / "ppocr_mobile_v2_cls.onnx"
TEXTLINES = MODELS / "data/textlines/ppocr_cls_calib.npz"
#: For the usage errors that come after `--ray` has found Ray (without it, `--ray` stops first, exit 2).
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install -e '.[test,ray]'")


def test_calibrate_on_ray_writes_the_same_file_as_without(ray_session: object, tmp_path: Path) -> None:
    code, stdout, stderr = invoke("calibrate", PPOCR, "--calib", TEXTLINES, "-o", tmp_path / "ray.npz",
                                  "--ray", "--workers", "2")
    assert code == 0, stderr
    assert "64 samples in 8 batches" in stdout and stderr == ""
    assert invoke("calibrate", PPOCR, "--calib", TEXTLINES, "-o", tmp_path / "here.npz").code == 0
    assert digest(tmp_path / "ray.npz") == digest(tmp_path / "here.npz")


@pytest.mark.parametrize("args, message", [
    (("--workers", "2"), "--workers needs --ray"),
    (("--ray", "--shard", "0/2"), "give --ray or --shard, not both"),
])
@needs_ray
def test_ray_usage_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    code, stdout, stderr = invoke("calibrate", PPOCR, "--calib", TEXTLINES, "-o", tmp_path / "s.npz", *args)
    assert code == 2 and stdout == "" and message in stderr.splitlines()[-1]
    assert not (tmp_path / "s.npz").exists()


def test_ray_flag_without_ray_installed_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A `ray` module that fails to import, first on the path, stands for an install without the extra."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ray.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)])}
    result = subprocess.run([sys.executable, "-m", "onnxq_cli", "calibrate", str(PPOCR), "--calib", str(TEXTLINES),
                             "-o", str(tmp_path / "s.npz"), "--ray"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: the Ray backend (--ray) needs Ray, which is not installed: pip install 'onnxq[ray]'"]
    assert not (tmp_path / "s.npz").exists()


SLOW_LOADER = '''"""The PP-OCR calibration lines, one every half second, for any shard; a shard's call touches a marker."""
import time
from pathlib import Path
import numpy as np

def load_data(shard_index=0, num_shards=1):
    if num_shards > 1:
        Path({marker!r}).touch()
    x = np.load({calib!r})["x"]
    for row in range(shard_index, 64, num_shards):
        time.sleep(0.5)
        yield {{"x": x[row:row + 1]}}
'''


def _ray_processes(temp_dir: Path) -> list[int]:
    """Processes whose command line names `temp_dir` (the Ray instance's session folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(temp_dir) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="SIGINT to a child and /proc: Linux only")
def test_ctrl_c_during_a_ray_run_exits_130_with_one_line_and_stops_its_instance(ray_session: object,
                                                                                   tmp_path: Path) -> None:
    loader = tmp_path / "slow_loader.py"
    marker = tmp_path / "calibrating"
    loader.write_text(SLOW_LOADER.format(calib=str(TEXTLINES), marker=str(marker)))
    temp_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"onnxq-ray-{os.getpid()}"  # Ray's socket paths stay short
    os.environ["RAY_TMPDIR"] = str(temp_dir)
    try:
        process = spawn_process("calibrate", PPOCR, "--calib", f"{loader}:load_data", "-o", tmp_path / "s.npz",
                                "--ray", "--workers", "1", cwd=tmp_path)
    finally:
        del os.environ["RAY_TMPDIR"]
    def instance_running() -> None:
        assert _ray_processes(temp_dir), "no Ray process names the instance's folder"

    code, stdout, stderr = signal_when_started(process, marker, wait=60, timeout=60, before=instance_running,
                                               never="no worker started calibrating a shard")
    assert code == 130, stderr
    assert stderr.splitlines() == ["interrupted"] and stdout == ""
    assert not (tmp_path / "s.npz").exists()
    deadline = time.monotonic() + 20
    while _ray_processes(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ray_processes(temp_dir) == [], "the local Ray instance outlived the command"



@needs_ray
def test_ray_and_jobs_together_is_a_usage_error(tmp_path: Path) -> None:
    code, stdout, stderr = invoke("quantize", PPOCR, "--calib", TEXTLINES, "--eval", TEXTLINES, "--min-cosine", "0.99",
                                  "--ray", "--jobs", "2", "-o", tmp_path / "q.onnx")
    assert code == 2 and stdout == "" and "give one of them" in stderr.splitlines()[-1]
    assert not (tmp_path / "q.onnx").exists()


@needs_ray
def test_ray_with_an_accuracy_target_needs_eval_data(tmp_path: Path) -> None:
    code, stdout, stderr = invoke("quantize", PPOCR, "--calib", TEXTLINES, "--min-cosine", "0.99", "--ray",
                                  "-o", tmp_path / "q.onnx")
    assert code == 2 and stdout == "" and "must come from --eval DATA" in stderr.splitlines()[-1]
    assert not (tmp_path / "q.onnx").exists()


def test_a_large_model_is_refused_before_ray_starts(tmp_path: Path) -> None:
    # the large-model path (weights in external data) lowered to this small model: refused up front, exit 2
    env = {**os.environ, "ONNXQ_LARGE_MODEL_BYTES": "1000"}
    started = subprocess.run([sys.executable, "-m", "onnxq_cli", "calibrate", str(PPOCR), "--calib", str(TEXTLINES),
                              "--ray", "-o", str(tmp_path / "s.npz")], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=120)
    if "needs Ray, which is not installed" in started.stderr:
        pytest.skip("Ray is not installed: pip install -e '.[test,ray]'")
    assert started.returncode == 2 and started.stdout == "", started.stderr
    assert started.stderr.splitlines() == [started.stderr.splitlines()[-1]]
    assert "is not sent to Ray workers" in started.stderr and not (tmp_path / "s.npz").exists()
