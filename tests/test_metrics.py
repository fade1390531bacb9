"""Tests for onnxq.metrics: metrics against hand-computed values, streaming, edge cases, real models."""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from onnxq.runtime.session import open_session
from onnxq.errors import CalibrationError, ModelError
from onnxq.metrics import MetricsAccumulator, OutputMetrics, compare_models, format_metrics
from tests.support.paths import MODELS

EFFICIENTNET = MODELS / "efficientnet_lite0.onnx"


def metrics_of(ref: list, cand: list, name: str = "out") -> OutputMetrics:
    return MetricsAccumulator().update(np.array(ref, np.float32), np.array(cand, np.float32)).result(name)


# --- hand-computed values ---------------------------------------------------------------------


def test_one_extra_unit_vector() -> None:
    # ref=[1,0,0], cand=[1,1,0]: dot 1, |ref| 1, |cand| sqrt(2) -> cosine 1/sqrt(2);
    # signal 1, noise 1 -> 0 dB; max |diff| 1.
    metrics = metrics_of([[1, 0, 0]], [[1, 1, 0]])
    assert metrics.cosine == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert metrics.sqnr_db == pytest.approx(0.0, abs=1e-12)
    assert metrics.max_abs_error == 1.0
    assert metrics.samples == 1


def test_scaled_and_offset_values() -> None:
    # ref=[3,4], cand=[3,3]: dot 9+12=21, |ref|=5, |cand|=sqrt(18) -> cosine 21/(5*sqrt(18)) = 0.98995;
    # signal 25, noise 1 -> 10*log10(25) = 13.9794 dB; max |diff| 1.
    metrics = metrics_of([3, 4], [3, 3])
    assert metrics.cosine == pytest.approx(21 / (5 * math.sqrt(18)), rel=1e-12)
    assert metrics.cosine == pytest.approx(0.989949, abs=1e-6)
    assert metrics.sqnr_db == pytest.approx(13.979400, abs=1e-6)
    assert metrics.max_abs_error == 1.0
    assert metrics.top1_agreement is None  # rank 1


def test_opposite_output_has_cosine_minus_one() -> None:
    # ref=[1,2], cand=[-1,-2]: cosine -1; noise = 4+16 = 20, signal 5 -> 10*log10(0.25) = -6.0206 dB.
    metrics = metrics_of([1, 2], [-1, -2])
    assert metrics.cosine == pytest.approx(-1.0, abs=1e-12)
    assert metrics.sqnr_db == pytest.approx(-6.020600, abs=1e-6)
    assert metrics.max_abs_error == 4.0


def test_top1_agreement_counts_matching_rows() -> None:
    # Row argmaxes: ref 2, 0, 1, 1; cand 2, 1, 1, 0 -> rows 0 and 2 agree -> 2/4.
    ref = [[0, 1, 5], [9, 1, 2], [0, 3, 1], [1, 4, 0]]
    cand = [[0, 1, 4], [1, 9, 2], [0, 2, 1], [4, 1, 0]]
    metrics = metrics_of(ref, cand)
    assert metrics.top1_agreement == 0.5
    assert metrics.samples == 4


def test_top1_only_for_rank_two_with_two_classes() -> None:
    assert metrics_of([[1.0], [2.0]], [[1.0], [2.0]]).top1_agreement is None  # one class
    assert metrics_of([[[1, 2]]], [[[1, 2]]]).top1_agreement is None  # rank 3
    assert metrics_of([[1, 2]], [[2, 1]]).top1_agreement == 0.0


def test_top1_only_when_the_output_has_one_row_per_sample() -> None:
    ref = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert MetricsAccumulator().update(ref, ref, samples=2).result("y").top1_agreement == 1.0
    per_layer = MetricsAccumulator().update(ref, ref, samples=5).result("y")  # e.g. a state [layers, hidden]
    assert per_layer.samples == 5 and per_layer.top1_agreement is None


# --- streaming --------------------------------------------------------------------------------


def test_three_batches_equal_one_big_batch_exactly() -> None:
    rng = np.random.default_rng(0)
    # Small integers: every float64 sum is exact, so the order of summation cannot matter.
    ref = rng.integers(-8, 8, size=(12, 10)).astype(np.float32)
    cand = ref + rng.integers(-2, 3, size=(12, 10)).astype(np.float32)
    whole = MetricsAccumulator().update(ref, cand)
    streamed = MetricsAccumulator()
    for start, stop in ((0, 5), (5, 6), (6, 12)):
        streamed = streamed.update(ref[start:stop], cand[start:stop])
    assert streamed == whole
    assert streamed.result("logits") == whole.result("logits")
    assert whole.samples == 12


def test_merge_of_separate_accumulators_equals_sequential_updates() -> None:
    first = MetricsAccumulator().update(np.array([[1.0, 2.0]]), np.array([[1.0, 3.0]]))
    second = MetricsAccumulator().update(np.array([[4.0, 0.0]]), np.array([[0.0, 4.0]]))
    merged = first.merge(second)
    assert merged == first.update(np.array([[4.0, 0.0]]), np.array([[0.0, 4.0]]))
    # ref=[1,2,4,0], cand=[1,3,0,4]: signal 21, noise 0+1+16+16=33, max 4, argmax agrees in row 0 only.
    result = merged.result("y")
    assert result.sqnr_db == pytest.approx(10 * math.log10(21 / 33), abs=1e-12)
    assert result.max_abs_error == 4.0
    assert result.top1_agreement == 0.5


def test_max_abs_error_is_the_largest_over_all_batches() -> None:
    # Errors 5, then 1, then 2: the maximum seen first must survive later, smaller batches.
    accumulator = MetricsAccumulator()
    for ref, cand in (([0.0, 5.0], [0.0, 0.0]), ([1.0, 1.0], [0.0, 1.0]), ([2.0, 0.0], [0.0, 0.0])):
        accumulator = accumulator.update(np.array(ref), np.array(cand))
    assert accumulator.result("y").max_abs_error == 5.0
    assert accumulator.result("y").samples == 6


def test_update_leaves_the_accumulator_unchanged() -> None:
    empty = MetricsAccumulator()
    empty.update(np.ones((2, 2)), np.zeros((2, 2)))
    assert empty == MetricsAccumulator()
    assert empty.samples == 0


# --- edge cases -------------------------------------------------------------------------------


def test_zero_reference_and_zero_candidate_are_identical() -> None:
    metrics = metrics_of([0, 0, 0], [0, 0, 0])
    assert metrics.cosine == 1.0
    assert metrics.sqnr_db == math.inf
    assert metrics.max_abs_error == 0.0


def test_zero_against_non_zero_has_cosine_zero() -> None:
    assert metrics_of([0, 0], [1, 0]).cosine == 0.0
    assert metrics_of([1, 0], [0, 0]).cosine == 0.0
    assert metrics_of([0, 0], [1, 0]).sqnr_db == -math.inf  # no signal, some noise


def test_identical_output_gives_exact_cosine_one() -> None:
    values = np.random.default_rng(1).standard_normal((3, 7)).astype(np.float32)
    metrics = MetricsAccumulator().update(values, values.copy()).result("y")
    assert metrics.cosine == 1.0
    assert metrics.sqnr_db == math.inf
    assert metrics.top1_agreement == 1.0


@pytest.mark.parametrize("in_reference", [True, False])
def test_nan_makes_metrics_nan_and_warns(in_reference: bool, caplog: pytest.LogCaptureFixture) -> None:
    clean = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    dirty = clean.copy()
    dirty[1, 0] = np.nan
    ref, cand = (dirty, clean) if in_reference else (clean, dirty)
    accumulator = MetricsAccumulator().update(clean, clean).update(ref, cand)
    with caplog.at_level(logging.WARNING, logger="onnxq.metrics"):
        metrics = accumulator.result("scores")
    assert math.isnan(metrics.cosine) and math.isnan(metrics.sqnr_db) and math.isnan(metrics.max_abs_error)
    assert metrics.top1_agreement is not None and math.isnan(metrics.top1_agreement)
    assert metrics.samples == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'scores'" in warnings[0].getMessage()
    assert ("reference" if in_reference else "candidate") in warnings[0].getMessage()


def test_shape_mismatch_in_update_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"\(2, 3\).*\(3, 2\)"):
        MetricsAccumulator().update(np.zeros((2, 3)), np.zeros((3, 2)))


def test_empty_accumulator_result_is_nan() -> None:
    metrics = MetricsAccumulator().result("y")
    assert metrics.samples == 0 and math.isnan(metrics.cosine) and metrics.top1_agreement is None


def test_format_metrics_aligns_columns() -> None:
    table = format_metrics(
        [
            OutputMetrics("logits", 192, 0.9991234, 27.456, 0.0123456, 0.984375),
            OutputMetrics("a_much_longer_output_name", 2, 1.0, math.inf, 0.0, None),
        ]
    )
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["output", "samples", "cosine", "SQNR", "dB", "max", "abs", "err", "top-1"]
    assert lines[1].split() == ["logits", "192", "0.999123", "27.46", "0.01235", "98.44%"]
    assert lines[2].split() == ["a_much_longer_output_name", "2", "1.000000", "inf", "0", "-"]
    # Right-aligned numeric columns: the cosine column ends at the same offset on every row.
    cosine_ends = {line.index(cell) + len(cell) for line, cell in zip(lines, ["cosine", "0.999123", "1.000000"])}
    assert len(cosine_ends) == 1


# --- compare_models on a real model -----------------------------------------------------------


def random_feeds(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"input": rng.standard_normal((1, 3, 224, 224), dtype=np.float32)} for _ in range(count)]


@pytest.fixture(scope="module")
def efficientnet() -> onnx.ModelProto:
    return onnx.load(EFFICIENTNET)


def test_model_against_itself_is_identical(efficientnet: onnx.ModelProto) -> None:
    (logits,) = compare_models(efficientnet, efficientnet, random_feeds(2))
    assert logits.name == "logits"
    assert logits.samples == 2
    assert logits.cosine == 1.0
    assert logits.sqnr_db == math.inf
    assert logits.max_abs_error == 0.0
    assert logits.top1_agreement == 1.0


def test_perturbed_conv_weight_lowers_cosine(efficientnet: onnx.ModelProto) -> None:
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(efficientnet)
    first_conv = next(node for node in perturbed.graph.node if node.op_type == "Conv")
    weight = next(init for init in perturbed.graph.initializer if init.name == first_conv.input[1])
    values = onnx.numpy_helper.to_array(weight)
    noise = np.random.default_rng(2).standard_normal(values.shape).astype(np.float32) * values.std()
    weight.CopyFrom(onnx.numpy_helper.from_array(values + noise, weight.name))
    with open_session(efficientnet) as reference:  # a Session is accepted as well as a ModelProto
        (logits,) = compare_models(reference, perturbed, random_feeds(2))
    assert logits.cosine < 1.0
    assert math.isfinite(logits.sqnr_db)
    assert logits.max_abs_error > 0.0


def test_missing_candidate_output_is_a_model_error(efficientnet: onnx.ModelProto) -> None:
    renamed = onnx.ModelProto()
    renamed.CopyFrom(efficientnet)
    last = renamed.graph.node[-1]
    last.output[0] = renamed.graph.output[0].name = "scores"
    with pytest.raises(ModelError, match="'logits' of the reference model is missing"):
        compare_models(efficientnet, renamed, random_feeds(1))


def test_no_feeds_is_a_calibration_error(efficientnet: onnx.ModelProto) -> None:
    with pytest.raises(CalibrationError):
        compare_models(efficientnet, efficientnet, iter(()))


def _tiny_model(output_shape: list[int]) -> onnx.ModelProto:
    """x[2,2] -> Reshape(output_shape) -> y."""
    from onnx import TensorProto, helper

    shape = onnx.numpy_helper.from_array(np.array(output_shape, np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_output_shape_mismatch_between_models_names_the_output() -> None:
    feeds = [{"x": np.ones((2, 2), np.float32)}]
    with pytest.raises(ModelError, match=r"output 'y'.*\(4,\).*\(1, 4\)"):
        compare_models(_tiny_model([4]), _tiny_model([1, 4]), feeds)
