"""The quantization report, built from real quantize runs of the residual CNN."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import models
import onnxq
from onnxq.calib.amax import entropy_amax, max_amax, mse_amax, percentile_amax
from onnxq.calib.histogram import Histogram
from onnxq.calib.stats import MaxStats
from onnxq.lower.scales import weight_amax
from onnxq.passes.equalize import equalize
from onnxq.report.document import TOP_N, build_report, rank_layers, to_json
from onnxq.report.files import write_report
from onnxq.report.markdown import to_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SECTIONS = ("# Quantization report: residual_cnn", "## Summary", "## Accuracy: float vs quantized",
            "## Per-layer sensitivity", "## Automatic fallback", "## Plan", "### Quantized nodes",
            "### Float nodes by reason", "## Activation ranges", "## INT8 weights")


@dataclass(frozen=True)
class FakeRow:
    """What onnxq.steps.accuracy.sensitivity will produce: only the attributes matter."""

    node_name: str
    op_type: str
    alone_cosine: float
    alone_sqnr_db: float
    recovered_cosine: float | None = None
    recovered_sqnr_db: float | None = None


def _run(method: onnxq.CalibMethod) -> tuple[object, onnxq.QuantResult, list[dict[str, np.ndarray]]]:
    model = models.BUILDERS["residual_cnn"]()
    feeds = [models.random_feeds(model, batch=4, seed=seed) for seed in range(3)]
    # SmoothQuant off: the weight checks below read the prepared model's own weights.
    config = onnxq.QuantConfig(calib=onnxq.CalibConfig(method=method, batch_size=4), smoothquant=False)
    return model, onnxq.quantize(model, onnxq.FeedsSource(feeds), config), feeds


@pytest.fixture(scope="module")
def entropy_run() -> tuple[object, onnxq.QuantResult, list[dict[str, np.ndarray]]]:
    return _run(onnxq.CalibMethod.ENTROPY)


@pytest.fixture(scope="module")
def max_run() -> tuple[object, onnxq.QuantResult, list[dict[str, np.ndarray]]]:
    return _run(onnxq.CalibMethod.MAX)


def _strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def _fake_rows(n: int) -> list[FakeRow]:
    rng = np.random.default_rng(0)
    return [FakeRow(f"layer{i:03d}", "Conv", 1 - float(rng.uniform(0, 0.01)), float(rng.uniform(10, 50)), 0.999, 40.0)
            for i in range(n)]


def test_json_lists_every_node_with_its_reason(entropy_run) -> None:
    _, result, _ = entropy_run
    document = _strict_json(to_json(build_report(result)))
    assert document["format"] == "onnxq-report" and document["model_name"] == "residual_cnn"
    assert document["target"] == "trt" and document["onnxq_version"] == onnxq.__version__
    decisions = [(d["node_name"], d["op_type"], d["quantized"], d["reason"]) for d in document["decisions"]]
    assert decisions == [(d.node_name, d.op_type, d.quantized, d.reason) for d in result.plan.decisions]
    assert len(decisions) == 17 and sum(q for _, _, q, _ in decisions) == 11
    assert document["calibration"] == {"samples": 12, "batches": 3, "providers": ["CPUExecutionProvider"],
                                       "seconds": result.calibration.seconds}


def test_per_method_amax_equals_the_amax_functions(entropy_run) -> None:
    _, result, _ = entropy_run
    report = build_report(result, percentile=99.9)
    assert report.method == "entropy"  # inferred: only entropy reproduces the ranges in the model
    rows = _strict_json(to_json(report))["activations"]
    assert [r["tensor_name"] for r in rows] == list(result.plan.activation_names)
    for row in rows:
        histogram = result.calibration.stats[row["tensor_name"]]
        assert isinstance(histogram, Histogram)
        assert row["amax_by_method"] == {"max": max_amax(histogram), "percentile": percentile_amax(histogram, 99.9),
                                         "entropy": entropy_amax(histogram), "mse": mse_amax(histogram)}
        assert row["amax"] == result.group_amax[row["group"]]
        assert row["num_values"] == histogram.num_values and row["nan_count"] == 0
    assert any(r["amax_by_method"]["entropy"] < r["amax_by_method"]["max"] for r in rows)
    assert any(r["amax_by_method"]["percentile"] != r["amax_by_method"]["mse"] for r in rows)


def test_max_calibration_has_no_other_method_columns(max_run) -> None:
    _, result, _ = max_run
    report = build_report(result)
    assert report.method == "max"
    for row in _strict_json(to_json(report))["activations"]:
        stats = result.calibration.stats[row["tensor_name"]]
        assert isinstance(stats, MaxStats)
        assert row["amax_by_method"] == {"max": stats.amax, "percentile": None, "entropy": None, "mse": None}
    table = to_markdown(report).split("## Activation ranges")[1].split("## INT8 weights")[0]
    assert table.count("| — | — | — |") == len(result.plan.activations)


def test_weight_amax_is_the_per_channel_max_of_the_float_weights(max_run) -> None:
    model, result, _ = max_run
    tensors = equalize(onnxq.prepare(model)).tensors()  # the float weights quantize quantized (equalized)
    report = build_report(result)
    assert len(report.weights) == len(result.plan.weights) == 7
    for row in report.weights:
        expected = weight_amax(np.asarray(tensors[row.tensor_name].values), row.axis)
        assert row.channels == expected.size
        np.testing.assert_allclose([row.amax_min, row.amax_median, row.amax_max],
                                   [expected.min(), np.median(expected), expected.max()], rtol=1e-6)


def test_markdown_has_every_section_and_metrics_stages(entropy_run) -> None:
    model, result, feeds = entropy_run
    metrics = onnxq.compare_models(model, result.model, feeds)
    broken = onnxq.OutputMetrics("logits", 12, math.nan, math.inf, 0.0, None)
    report = build_report(result, metrics={"before_fallback": [broken], "after_fallback": metrics},
                          fallback=[("head/fc", "alone SQNR 12.3 dB below the 20 dB threshold")])
    text = to_markdown(report)
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert "### before_fallback" in text and "### after_fallback" in text
    assert f"{metrics[0].cosine:.6f}" in text
    assert "- `head/fc`: alone SQNR 12.3 dB below the 20 dB threshold" in text
    for decision in result.plan.decisions:
        assert f"`{decision.node_name}`" in text and decision.reason in text
    document = _strict_json(to_json(report))
    assert document["metrics"]["before_fallback"][0]["cosine"] == "nan"
    assert document["metrics"]["before_fallback"][0]["sqnr_db"] == "inf"
    assert document["metrics"]["after_fallback"][0]["cosine"] == metrics[0].cosine
    assert document["fallback"] == [["head/fc", "alone SQNR 12.3 dB below the 20 dB threshold"]]


def test_sensitivity_rows_render_sorted_most_sensitive_first(entropy_run) -> None:
    _, result, _ = entropy_run
    rows = [FakeRow("b", "Conv", 0.99, 30.0), FakeRow("a", "Gemm", 0.95, 12.5, 0.999, 41.0),
            FakeRow("lossless", "Add", 1.0, math.inf), FakeRow("broken", "Conv", math.nan, math.nan),
            FakeRow("c", "Conv", 0.98, 30.0)]
    report = build_report(result, sensitivity=rows)
    assert [(r.rank, r.node_name) for r in report.sensitivity] == [
        (1, "broken"), (2, "a"), (3, "c"), (4, "b"), (5, "lossless")]  # ties on SQNR: lower cosine first
    text = to_markdown(report)
    positions = [text.index(f"| {rank} | `{name}` |") for rank, name in enumerate(("broken", "a", "c", "b"), 1)]
    assert positions == sorted(positions)
    assert "| 2 | `a` | Gemm | 0.950000 | 12.50 | 0.999000 | 41.00 |" in text
    ranked = _strict_json(to_json(report))["sensitivity"]
    assert ranked[0]["alone_sqnr_db"] == "nan" and ranked[-1]["alone_sqnr_db"] == "inf"


def test_markdown_stays_short_for_many_layers(entropy_run) -> None:
    _, result, _ = entropy_run
    report = build_report(result, sensitivity=_fake_rows(120))
    sqnr = [r.alone_sqnr_db for r in report.sensitivity]
    assert sqnr == sorted(sqnr) and [r.rank for r in report.sensitivity] == list(range(1, 121))
    lines = to_markdown(report).splitlines()
    top = lines[lines.index(f"### Top {TOP_N}"):lines.index("### All layers")]
    assert sum(line.startswith("| ") for line in top) == TOP_N + 1  # the header and the top rows
    assert "<details><summary>all 120 layers</summary>" in lines


def test_write_report_creates_nested_folders_and_the_chart(entropy_run, tmp_path: Path) -> None:
    _, result, _ = entropy_run
    folder = tmp_path / "does" / "not" / "exist"
    report = build_report(result, sensitivity=_fake_rows(12))
    written = write_report(report, folder)
    assert written[:2] == (folder / "report.json", folder / "report.md")
    assert _strict_json(written[0].read_text("utf-8"))["sensitivity"][0]["rank"] == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in written)  # no temporary left
    if not HAS_MATPLOTLIB:
        pytest.skip("matplotlib is not installed (pip install 'onnxq[report]'): the PNG is not drawn")
    assert written[2] == folder / "sensitivity.png"
    assert written[2].read_bytes().startswith(PNG_MAGIC)
    assert "![per-layer sensitivity](sensitivity.png)" in written[1].read_text("utf-8")


def test_without_matplotlib_the_text_report_still_works(entropy_run, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _, result, _ = entropy_run
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    written = write_report(build_report(result, sensitivity=_fake_rows(3)), tmp_path)
    assert [p.name for p in written] == ["report.json", "report.md"]
    assert not (tmp_path / "sensitivity.png").exists()
    markdown = written[1].read_text("utf-8")
    assert "matplotlib is not installed" in markdown and all(section in markdown for section in SECTIONS)


def test_no_chart_without_sensitivity_rows(max_run, tmp_path: Path) -> None:
    _, result, _ = max_run
    written = write_report(build_report(result), tmp_path / "report")
    assert [p.name for p in written] == ["report.json", "report.md"]
    assert "Not computed (so no chart)." in written[1].read_text("utf-8")
    assert _strict_json(written[0].read_text("utf-8"))["sensitivity"] == []


def test_chart_grows_with_the_number_of_layers() -> None:
    if not HAS_MATPLOTLIB:
        pytest.skip("matplotlib is not installed (pip install 'onnxq[report]')")
    from onnxq.report.chart import sensitivity_png

    def height(png: bytes) -> int:
        assert png.startswith(PNG_MAGIC)
        return int.from_bytes(png[20:24], "big")  # IHDR: width at 16, height at 20

    small, large = (height(sensitivity_png(rank_layers(_fake_rows(n)))) for n in (5, 150))
    assert large > 5 * small and large < 32768


def test_every_step_is_in_the_report_with_its_details() -> None:
    model = models.BUILDERS["outlier_encoder"]()
    result = onnxq.quantize(model, onnxq.FeedsSource([models.random_feeds(model, batch=32, seed=0)]),
                            onnxq.QuantConfig(target="ort-cpu"))
    report = build_report(result)
    rows = {row.step: row for row in report.steps}
    assert list(rows) == ["cross-layer equalization", "SmoothQuant", "attention", "bias correction"]
    smoothed = result.finding(onnxq.Smoothed)
    assert rows["SmoothQuant"].summary == smoothed.describe() and len(rows["SmoothQuant"].details) == 8
    assert all(detail.split(":")[0] in {c.tensor for c in smoothed.choices} for detail in rows["SmoothQuant"].details)
    assert "attention MatMul(s)" in rows["attention"].summary and "layer1/attn/scores" in rows["attention"].details
    corrected = result.finding(onnxq.BiasCorrected)
    assert len(rows["bias correction"].details) == len(corrected.layers) + len(corrected.skipped)
    document = _strict_json(to_json(report))
    assert [row["step"] for row in document["steps"]] == list(rows)
    markdown = to_markdown(report)
    assert "## Steps" in markdown and "- **SmoothQuant**: alpha measured per layer" in markdown
