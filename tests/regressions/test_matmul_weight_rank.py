"""Issue 12, bug 5: a MatMul whose constant weight has rank >= 3 (here [1, 1, 16, 4], an Unsqueeze of a
[16, 4] weight) got a per-channel scale on its last axis. ONNX Runtime fuses DQ -> MatMul into
MatMulIntegerToFloat / QLinearMatMul, which take a per-column scale only for a 2-D weight ("b zero point
is not valid"), so the written model failed at run time, for both targets."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxq
from tests.regressions.graphs import TARGETS, cosine, feeds, model, quantize_and_run, weight
from tests.support.runtime import run_model


def _unsqueezed_weight(x_shape: list[int], weight_shape: tuple[int, ...] = (16, 4), axes: tuple[int, ...] = (0, 1)):
    nodes = [helper.make_node("Unsqueeze", ["w", "axes"], ["w_unsqueezed"], name="unsqueeze"),
             helper.make_node("MatMul", ["x", "w_unsqueezed"], ["y"], name="matmul")]
    axes_init = numpy_helper.from_array(np.array(axes, np.int64), "axes")
    return model(nodes, {"x": x_shape}, {"y": None}, [weight("w", weight_shape), axes_init])


@pytest.mark.parametrize("target", TARGETS)
def test_a_leading_ones_weight_is_quantized_per_channel_and_runs_optimized(target: str) -> None:
    built = _unsqueezed_weight([1, 1, 8, 16])
    result, (quantized,) = quantize_and_run(built, target)
    (reference,) = run_model(built, feeds(built, 1, seed=99)[0])
    assert quantized.shape == reference.shape == (1, 1, 8, 4)
    assert cosine(quantized, reference) > 0.99
    (use,) = result.plan.weights
    assert use.consumer == "matmul" and use.axis == 1  # the weight, squeezed to [16, 4], per column
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert any(v.dtype == np.int8 and v.shape == (16, 4) for v in inits.values())


@pytest.mark.parametrize("target", TARGETS)
def test_a_weight_with_more_batch_dims_than_the_input_stays_float(target: str) -> None:
    # x [8, 16] @ w [1, 1, 16, 4] is [1, 1, 8, 4]: squeezing the weight would change the output's rank
    built = _unsqueezed_weight([8, 16])
    result, (quantized,) = quantize_and_run(built, target)
    (reference,) = run_model(built, feeds(built, 1, seed=99)[0])
    assert quantized.shape == reference.shape == (1, 1, 8, 4)
    decision = result.plan.decision("matmul")
    assert not decision.quantized and "rank 4" in decision.reason and "2-D" in decision.reason
    np.testing.assert_allclose(quantized, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_a_batched_constant_weight_stays_float(target: str) -> None:
    # w [2, 16, 4]: one weight per batch entry; no 2-D form, and ORT's integer MatMul wants a 2-D one
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")]
    built = model(nodes, {"x": [2, 8, 16]}, {"y": None}, [weight("w", (2, 16, 4))])
    result, (quantized,) = quantize_and_run(built, target)
    (reference,) = run_model(built, feeds(built, 1, seed=99)[0])
    assert not result.plan.decision("matmul").quantized
    np.testing.assert_allclose(quantized, reference, rtol=1e-5, atol=1e-5)


def test_the_latency_search_runs_on_a_model_with_an_unsqueezed_weight() -> None:
    built = _unsqueezed_weight([1, 1, 8, 16])
    config = onnxq.QuantConfig(target="ort-cpu", latency_search=True)
    result = onnxq.quantize(built, onnxq.FeedsSource(feeds(built)), config)
    assert result.latency is not None and [t.nodes for t in result.latency.trials] == [("matmul",)]  # INT8 timed
    (quantized,) = run_model(result.model, feeds(built, 1, seed=99)[0], optimized=True)
    assert quantized.shape == (1, 1, 8, 4)
