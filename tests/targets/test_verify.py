"""`QuantTarget.verify`: quantize refuses to return a model ONNX Runtime cannot run with its graph optimizations.

A target here is a built-in one whose `lower` breaks the written model the way issue 12's bugs did (a
dilated AveragePool between Q/DQ: ORT's QLinearAveragePool fusion makes the optimized graph invalid; a
per-channel scale on a rank-4 MatMul weight: it fails only when run). `quantize` must raise an
InternalError naming the node, not hand the model back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

import onnxq
from onnxq.options import HighPrecision
from onnxq.targets.ort_cpu import OrtCpu
from tests.regressions.graphs import feeds, model, weight
from tests.support.runtime import run_model


@dataclass(frozen=True)
class DilatesPools(OrtCpu):
    """ort-cpu, but every AveragePool gets dilations [1, 1] after Q/DQ insertion (the default, so the ONNX
    checker accepts it; ORT's QLinearAveragePool does not)."""

    name: str = "dilates-pools"

    def lower(self, graph: gs.Graph, high_precision: HighPrecision) -> gs.Graph:
        for node in graph.nodes:
            if node.op == "AveragePool":
                node.attrs["dilations"] = [1, 1]
        return graph


@dataclass(frozen=True)
class UnsqueezesWeights(OrtCpu):
    """ort-cpu, but every per-channel INT8 weight [K, N] is written as [1, 1, K, N] (axis moved along): what
    onnxq wrote for a rank-4 MatMul weight before issue 12. The ONNX checker accepts it; ORT's
    MatMulIntegerToFloat refuses it when run ("b zero point is not valid")."""

    name: str = "unsqueezes-weights"

    def lower(self, graph: gs.Graph, high_precision: HighPrecision) -> gs.Graph:
        for node in graph.nodes:
            weight = node.inputs[0]
            if node.op == "DequantizeLinear" and isinstance(weight, gs.Constant) and len(weight.shape) == 2:
                node.inputs[0] = gs.Constant(f"{weight.name}_4d", np.asarray(weight.values)[None, None])
                node.attrs["axis"] = int(node.attrs["axis"]) + 2
                node.outputs[0].shape = None
        return graph


def _conv_pool_conv():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("AveragePool", ["r1"], ["p"], name="pool", kernel_shape=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2")]
    return model(nodes, {"x": [1, 3, 9, 9]}, {"y": None}, [weight("w1", (3, 3, 1, 1), 1), weight("w2", (3, 3, 1, 1), 2)],
                 opset=19)


def _matmul():
    return model([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], {"x": [1, 1, 8, 16]}, {"y": None},
                 [weight("w", (16, 4))])


BROKEN = {"dilated pool (fails to load)": (DilatesPools(), _conv_pool_conv, "pool"),
          "rank-4 per-channel weight (fails when run)": (UnsqueezesWeights(), _matmul, "matmul")}


@pytest.mark.parametrize("case", BROKEN)
def test_a_model_ort_cannot_run_optimized_is_refused_naming_the_node(case: str) -> None:
    target, build, node = BROKEN[case]
    built = build()
    with pytest.raises(onnxq.InternalError, match=rf"cannot run with its graph optimizations on .*\b{node}\b"):
        onnxq.quantize(built, onnxq.FeedsSource(feeds(built)), onnxq.QuantConfig(target=target))


@pytest.mark.parametrize("case", BROKEN)
def test_the_built_in_target_writes_a_model_that_runs(case: str) -> None:
    _, build, _ = BROKEN[case]
    built = build()
    result = onnxq.quantize(built, onnxq.FeedsSource(feeds(built)), onnxq.QuantConfig(target="ort-cpu"))
    x = feeds(built, 1, seed=99)[0]
    (reference,), (quantized,) = run_model(built, x), run_model(result.model, x, optimized=True)
    assert quantized.shape == reference.shape


@pytest.mark.parametrize("case", BROKEN)
def test_the_latency_search_reports_its_broken_candidate_as_onnxqs_fault(case: str) -> None:
    """The latency search times partly quantized models before the final one is verified: one ORT cannot run
    is onnxq's (an InternalError naming the node), not a ModelError blaming the user's model."""
    target, build, node = BROKEN[case]
    built = build()
    with pytest.raises(onnxq.InternalError, match=rf"latency search built a model .*\b{node}\b"):
        onnxq.quantize(built, onnxq.FeedsSource(feeds(built)), onnxq.QuantConfig(target=target, latency_search=True))
