"""Structural checks on quantized models, shared by the tests.

They read the written ONNX model (not the plan), so they check what TensorRT will actually parse.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


class ModelView:
    """Producers, initializers and attributes of a ModelProto's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def attr(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def dq_feeding(self, node: onnx.NodeProto, index: int) -> onnx.NodeProto | None:
        if index >= len(node.input):
            return None
        producer = self.producer.get(node.input[index])
        return producer if producer is not None and producer.op_type == "DequantizeLinear" else None

    def is_quantized_input(self, node_name: str, index: int) -> bool:
        return self.dq_feeding(self.by_name[node_name], index) is not None


def expected_weight_axis(node: onnx.NodeProto, view: ModelView, rank: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if view.attr(node, "transB", 0) else 1
    return rank - 1


def check_activation_pair(view: ModelView, dq: onnx.NodeProto) -> None:
    """DQ(Q(x)) with positive scalar float scale and explicit INT8 zero point 0."""
    q = view.producer.get(dq.input[0])
    assert q is not None and q.op_type == "QuantizeLinear", f"{dq.name}: input is not a QuantizeLinear"
    for node in (q, dq):
        assert len(node.input) == 3, f"{node.name}: zero point missing"
        scale, zero_point = view.inits[node.input[1]], view.inits[node.input[2]]
        assert scale.ndim == 0 and scale > 0, f"{node.name}: scale {scale}"
        assert zero_point.dtype == np.int8 and np.all(zero_point == 0), f"{node.name}: zero point {zero_point}"
    assert q.input[1] == dq.input[1], "Q and DQ of one pair must share the scale"


def check_weight_dq(view: ModelView, consumer: onnx.NodeProto, dq: onnx.NodeProto) -> None:
    """INT8 initializer -> DequantizeLinear(per-channel scale, INT8 zeros, explicit axis)."""
    weights = view.inits.get(dq.input[0])
    assert weights is not None and weights.dtype == np.int8, f"{consumer.name}: weight is not an INT8 initializer"
    axis = view.attr(dq, "axis")
    assert axis is not None, f"{dq.name}: per-channel DequantizeLinear without explicit axis"
    assert axis == expected_weight_axis(consumer, view, weights.ndim), f"{consumer.name}: axis {axis}"
    scale, zero_point = view.inits[dq.input[1]], view.inits[dq.input[2]]
    assert scale.shape == (weights.shape[axis],), f"{consumer.name}: scale shape {scale.shape}"
    assert np.all(scale > 0)
    assert zero_point.dtype == np.int8 and zero_point.shape == scale.shape and np.all(zero_point == 0)


def check_trt_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Check every TensorRT placement rule that can be read off the model; return op counts."""
    view = ModelView(model)
    weighted = 0
    for node in view.nodes:
        if node.op_type == "DequantizeLinear" and node.input[0] not in view.inits:
            check_activation_pair(view, node)
        if node.op_type not in WEIGHTED:
            continue
        weight_dq = view.dq_feeding(node, 1)
        if weight_dq is not None and weight_dq.input[0] in view.inits:
            check_weight_dq(view, node, weight_dq)
            weighted += 1
            assert view.dq_feeding(node, 0) is not None, f"{node.name}: weight quantized but not its input"
        if len(node.input) > 2 and node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            assert view.dq_feeding(node, 2) is None, f"{node.name}: bias must stay float"
    for output in model.graph.output:
        producer = view.producer.get(output.name)
        assert producer is None or producer.op_type not in ("QuantizeLinear", "DequantizeLinear"), output.name
    counts: dict[str, int] = {"weighted_int8": weighted}
    for node in view.nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def float_weighted_with_constant_weight(float_graph_model: onnx.ModelProto) -> set[str]:
    """Names of weighted nodes whose weight is an initializer in the (prepared) float model."""
    inits = {t.name for t in float_graph_model.graph.initializer}
    return {n.name for n in float_graph_model.graph.node
            if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in inits}
