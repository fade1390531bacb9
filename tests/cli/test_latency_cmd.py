"""`onnxq quantize --latency-search`: on by default for ort-cpu, refused where it cannot run, and the
summary of a real search."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import onnxq
from onnxq.steps.latency_search import SearchLatency
from tests.support.cli import assert_one_line_error, invoke
from tests.support.paths import REPO

PPOCR = REPO / "models" / "ppocr_mobile_v2_cls.onnx"
CALIB = REPO / "models" / "data" / "textlines" / "ppocr_cls_calib.npz"


def test_latency_search_needs_the_ort_cpu_target(tmp_path: Path) -> None:
    outcome = invoke("quantize", PPOCR, "--calib", CALIB, "-o", tmp_path / "q.onnx", "--latency-search")
    assert_one_line_error(outcome, 2, "--latency-search cannot run: it is not for --target trt")
    assert not any(tmp_path.iterdir())


def test_ort_cpu_searches_by_default_and_prints_every_class_and_the_verdict(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    outcome = invoke("quantize", PPOCR, "--calib", CALIB, "-o", out, "--target", "ort-cpu", "--batch-size", "8")
    assert outcome.code == 0, outcome
    lines = outcome.stdout.splitlines()
    summary = next(line for line in lines if line.startswith("  latency "))
    assert "ms on one batch" in summary and "layer classes kept INT8" in summary
    assert any(line.strip().startswith(("int8  Conv depthwise 5x5", "float Conv depthwise 5x5")) for line in lines)
    trials = [line[10:].split(" (")[0] for line in lines if line.startswith(("    int8 ", "    float "))]
    assert len(trials) >= 5
    final = {name: line.startswith("    int8 ") for name, line in
             zip(trials, (line for line in lines if line.startswith(("    int8 ", "    float "))))}
    # the count is over classes, each decided by its last trial (a second sweep may time a class again)
    assert f"{sum(final.values())} of {len(final)} layer classes kept INT8" in summary, (summary, final)
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
    assert "no latency search: a statistics file holds no batch to time" in outcome.stdout


@pytest.mark.parametrize(("flag", "target", "search", "requested"), [
    (None, "ort-cpu", True, False),  # the target's default: skipped with a note where it cannot run
    (None, "trt", False, None),
    (False, "ort-cpu", False, None),
    (True, "ort-cpu", True, True),  # asked for: refused where it cannot run
    (True, "trt", True, True),
])
def test_the_library_resolves_the_default_from_the_target(flag: bool | None, target: str, search: bool,
                                                          requested: bool | None) -> None:
    steps = onnxq.steps_for(onnxq.QuantConfig(target=target, latency_search=flag))
    found = [step for step in steps if isinstance(step, SearchLatency)]
    assert bool(found) is search
    if found:
        assert found[0].requested is requested


def test_latency_search_and_an_accuracy_target_compose_in_that_order() -> None:
    steps = onnxq.steps_for(onnxq.QuantConfig(target="ort-cpu", latency_search=True),
                            accuracy=onnxq.AccuracyGoal(min_cosine=0.9))
    assert [type(step).__name__ for step in steps] == ["Equalize", "SmoothQuant", "ChooseAttention", "SearchLatency",
                                                       "MeetAccuracy", "BiasCorrection"]


def test_latency_search_then_an_accuracy_target_on_one_run(tmp_path: Path) -> None:
    """Both steps run on one model: the latency search first, then the fallback from its plan; the summary
    shows both findings in that order and the written model meets the target on the held-back samples."""
    out = tmp_path / "q.onnx"
    outcome = invoke("quantize", PPOCR, "--calib", CALIB, "-o", out, "--target", "ort-cpu", "--min-cosine", "0.99",
                     "--held-back", "8")
    assert outcome.code == 0, outcome
    lines = outcome.stdout.splitlines()
    order = [i for i, line in enumerate(lines) if line.startswith(("  latency ", "  held back ", "  fallback "))]
    assert [lines[i].split()[0] for i in order] == ["latency", "held", "fallback"]
    assert "cosine >= 0.99: met" in lines[order[-1]]
    onnx.checker.check_model(str(out), full_check=True)
