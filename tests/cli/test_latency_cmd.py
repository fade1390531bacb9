"""`onnxq quantize --latency-search`: on by default for ort-cpu, refused where it cannot run, and the
summary of a real search."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxq.config import Target
from onnxq_cli.quantize import _latency_search
from tests.support.cli import assert_one_line_error, invoke
from tests.support.paths import REPO

PPOCR = REPO / "models" / "ppocr_mobile_v2_cls.onnx"
CALIB = REPO / "models" / "data" / "textlines" / "ppocr_cls_calib.npz"


def test_latency_search_needs_the_ort_cpu_target(tmp_path: Path) -> None:
    outcome = invoke("quantize", PPOCR, "--calib", CALIB, "-o", tmp_path / "q.onnx", "--latency-search")
    assert_one_line_error(outcome, 2, "--latency-search is for --target ort-cpu")
    assert not any(tmp_path.iterdir())


def test_ort_cpu_searches_by_default_and_prints_every_class_and_the_verdict(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    outcome = invoke("quantize", PPOCR, "--calib", CALIB, "-o", out, "--target", "ort-cpu", "--batch-size", "8")
    assert outcome.code == 0, outcome
    lines = outcome.stdout.splitlines()
    summary = next(line for line in lines if line.startswith("  latency "))
    assert "ms on one batch" in summary and "layer classes kept INT8" in summary
    assert any(line.strip().startswith(("int8  Conv depthwise 5x5", "float Conv depthwise 5x5")) for line in lines)
    assert sum(line.startswith("    int8 ") or line.startswith("    float ") for line in lines) >= 5
    onnx.checker.check_model(str(out), full_check=True)


def test_no_latency_search_writes_the_rule_based_plan(tmp_path: Path) -> None:
    outcome = invoke("quantize", PPOCR, "--calib", CALIB, "-o", tmp_path / "q.onnx", "--target", "ort-cpu",
                     "--no-latency-search")
    assert outcome.code == 0, outcome
    assert not any(line.startswith("  latency ") for line in outcome.stdout.splitlines())


def test_ort_cpu_from_a_statistics_file_says_why_it_did_not_search(tmp_path: Path) -> None:
    stats = tmp_path / "s.onnxq.npz"
    assert invoke("calibrate", PPOCR, "--calib", CALIB, "-o", stats, "--target", "ort-cpu").code == 0
    outcome = invoke("quantize", PPOCR, "--stats", stats, "-o", tmp_path / "q.onnx", "--target", "ort-cpu")
    assert outcome.code == 0, outcome
    assert "no latency search: --stats holds no batch to time" in outcome.stdout


@pytest.mark.parametrize(("flag", "target", "from_stats", "accuracy", "search", "skipped"), [
    (None, Target.ORT_CPU, False, False, True, False),
    (None, Target.ORT_CPU, True, False, False, True),
    (None, Target.ORT_CPU, False, True, False, True),
    (None, Target.TRT, False, False, False, False),
    (False, Target.ORT_CPU, False, False, False, False),
    (True, Target.ORT_CPU, False, True, True, False),  # explicit: the library refuses the combination
    (True, Target.TRT, False, False, True, False),
])
def test_the_default_is_resolved_from_target_data_and_accuracy(flag: bool | None, target: Target, from_stats: bool,
                                                              accuracy: bool, search: bool, skipped: bool) -> None:
    decided, note = _latency_search(flag, target, from_stats, accuracy)
    assert decided is search and (note is not None) is skipped
