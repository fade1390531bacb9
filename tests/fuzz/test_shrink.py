"""Hypothesis shrinks a random model to the smallest graph that still shows a property: here a stand-in for a
failure (a model with a depthwise Conv) whose minimal graph is known. The
search is derandomized, so these run the same every time; benchmarks/fuzz.py --shrink uses it on real
failures."""

from __future__ import annotations

import onnx

from tests.fuzz.shrink import shrink


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node if node.op_type != "Constant"]


def test_shrinks_to_a_single_depthwise_conv():
    found = shrink(lambda example: "conv_depthwise" in example[1].features, examples=200)
    assert found is not None
    model, description = found
    assert _ops(model) == ["Conv"]
    (conv,) = [node for node in model.graph.node if node.op_type == "Conv"]
    group = next(a.i for a in conv.attribute if a.name == "group")
    assert group == description.input_shapes[0]["input_0"][1]  # one group per input channel
    onnx.checker.check_model(model, full_check=True)

