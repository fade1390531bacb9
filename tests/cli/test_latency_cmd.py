"""`onnxq quantize --latency-search`: refused where it cannot run, and the summary of a real search."""

from __future__ import annotations

from pathlib import Path

import onnx

from tests.cli.test_cli import assert_one_line_error, invoke

REPO = Path(__file__).parents[2]
PPOCR = REPO / "models" / "ppocr_mobile_v2_cls.onnx"
CALIB = REPO / "models" / "data" / "textlines" / "ppocr_cls_calib.npz"


def test_latency_search_needs_the_ort_cpu_target(tmp_path: Path) -> None:
    outcome = invoke("quantize", PPOCR, "--calib", CALIB, "-o", tmp_path / "q.onnx", "--latency-search")
    assert_one_line_error(outcome, 2, "--latency-search is for --target ort-cpu")
    assert not any(tmp_path.iterdir())


def test_latency_search_prints_every_class_and_the_verdict(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    outcome = invoke("quantize", PPOCR, "--calib", CALIB, "-o", out, "--target", "ort-cpu", "--latency-search",
                     "--batch-size", "8")
    assert outcome.code == 0, outcome
    lines = outcome.stdout.splitlines()
    summary = next(line for line in lines if line.startswith("  latency "))
    assert "ms on one batch" in summary and "layer classes kept INT8" in summary
    assert any(line.strip().startswith(("int8  Conv depthwise 5x5", "float Conv depthwise 5x5")) for line in lines)
    assert sum(line.startswith("    int8 ") or line.startswith("    float ") for line in lines) >= 5
    onnx.checker.check_model(str(out), full_check=True)
