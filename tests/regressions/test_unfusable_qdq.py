"""Issue 12, bug 7: Q/DQ around ops whose ONNX Runtime fusion breaks. ORT fuses DQ -> AveragePool -> Q into
QLinearAveragePool, which has no `dilations` (the optimized graph is invalid); its uint8 Resize breaks on
cubic mode (downscaling, once ORT moves it to NHWC) and on the opset-18 `axes` attribute (a Gather out of
bounds). Those ops stay float, saying why, and every written model runs optimized."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.regressions.graphs import TARGETS, cosine, feeds, model, quantize_and_run, weight
from tests.support.runtime import run_model


def _conv_op_conv(op: onnx.NodeProto, extra_inits=(), residual: bool = False, opset: int = 19) -> onnx.ModelProto:
    """x -> Conv -> Relu -> op -> Conv (-> Add with op's output): op between two integer kernels."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"), op,
             helper.make_node("Conv", ["p", "w2"], ["c2" if residual else "y"], name="conv2")]
    if residual:
        nodes.append(helper.make_node("Add", ["p", "c2"], ["y"], name="add"))
    return model(nodes, {"x": [1, 3, 8, 8]}, {"y": None},
                 [weight("w1", (3, 3, 1, 1), 1), weight("w2", (3, 3, 1, 1), 2), *extra_inits], opset=opset)


def _resize(mode: str, scales: list[float], axes: list[int] | None = None):
    attrs = {"mode": mode} if axes is None else {"mode": mode, "axes": axes}
    return (helper.make_node("Resize", ["r1", "", "scales"], ["p"], name="resize", **attrs),
            [numpy_helper.from_array(np.array(scales, np.float32), "scales")])


def _cases():
    yield "avgpool dilations", helper.make_node("AveragePool", ["r1"], ["p"], name="pool", kernel_shape=[2, 2],
                                                 dilations=[2, 2]), (), "pool", "dilations"
    node, inits = _resize("cubic", [1, 1, 0.5, 0.5])
    yield "cubic resize", node, inits, "resize", "cubic"
    node, inits = _resize("nearest", [2, 2], axes=[2, 3])
    yield "resize with axes", node, inits, "resize", "axes"


CASES = {name: rest for name, *rest in _cases()}


@pytest.mark.parametrize("residual", [False, True], ids=["conv", "residual add"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES)
def test_kept_float_with_a_reason_and_runs_optimized(case: str, target: str, residual: bool) -> None:
    op, inits, name, word = CASES[case]
    built = _conv_op_conv(op, inits, residual)
    result, (quantized,) = quantize_and_run(built, target)
    (reference,) = run_model(built, feeds(built, 1, seed=99)[0])
    assert quantized.shape == reference.shape and cosine(quantized, reference) > 0.99
    decision = result.plan.decision(name)
    assert not decision.quantized
    if target == "ort-cpu" or name == "pool":  # TensorRT's rules put no Q/DQ around a Resize in any case
        assert word in decision.reason and "ONNX Runtime" in decision.reason, decision.reason


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dilations", [None, [1, 1]], ids=["no dilations", "dilations 1"])
def test_plain_pools_and_resizes_stay_quantized(target: str, dilations: list[int] | None) -> None:
    attrs = {} if dilations is None else {"dilations": dilations}  # all 1s: the default, written out
    pool = helper.make_node("AveragePool", ["r1"], ["p"], name="pool", kernel_shape=[2, 2], **attrs)
    result, _ = quantize_and_run(_conv_op_conv(pool), target)
    assert result.plan.decision("pool").quantized
    if target == "ort-cpu":  # TensorRT moves no Q/DQ across a Resize
        node, inits = _resize("nearest", [1, 1, 2, 2])
        result, _ = quantize_and_run(_conv_op_conv(node, inits), target)
        assert result.plan.decision("resize").quantized


def test_a_softmax_between_quantized_tensors_reads_its_input_in_float() -> None:
    """Fuzz seed 580: x -> GlobalAveragePool (QLinear, uint8 output) -> Softmax over its size-1 last axis -> MatMul.
    With the pool's output quantized and the MatMul's input too, ORT fused DQ -> Softmax -> Q into QLinearSoftmax,
    which gave 0 where the probability is exactly 1: the MatMul's output was all zeros. The Softmax now reads
    the pool's float output, so no such group forms."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"], name="pool"),
             helper.make_node("Softmax", ["g"], ["s"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="matmul")]
    built = model(nodes, {"x": [2, 3, 5, 5]}, {"y": None}, [weight("w", (1, 6), 3)], opset=13)
    result, (quantized,) = quantize_and_run(built, "ort-cpu")
    (reference,) = run_model(built, feeds(built, 1, seed=99)[0])
    assert cosine(quantized, reference) > 0.99 and np.abs(quantized).max() > 0.1
    pool_output = result.plan.decision("pool")
    assert pool_output.quantized
    readers = {(n.op_type, i) for n in result.model.graph.node for i, name in enumerate(n.input) if name == "g"}
    assert ("Softmax", 0) in readers  # the float pool output itself, not its DequantizeLinear
