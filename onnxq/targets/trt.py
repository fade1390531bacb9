"""TensorRT explicit quantization: symmetric INT8 Q/DQ where TensorRT fuses it.

The placement follows TensorRT's explicit-quantization guidance (TensorRT Developer Guide, "Q/DQ
placement recommendations"; the rule tables are in `onnxq.plan.rules`):
  1. weighted ops (Conv, ConvTranspose, Gemm, MatMul): activation input per-tensor, constant weight
     per-channel on its output-channel axis; outputs are not quantized;
  2. residual Adds: the skip input only (the Conv branch fuses into the Add's epilogue);
  3. pooling: its input, when its output reaches a quantized input (through data movement);
  4. Concat: quantized inputs and the quantized output share one scale group.
What is not quantized runs in the type the ONNX file gives it (strongly typed networks), so
`--high-precision fp16` converts the float rest to float16 after Q/DQ insertion.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxq.graph.query import GraphIndex, is_float
from onnxq.lower.scales import INT8_SYMMETRIC, ActivationScheme
from onnxq.lower.to_fp16 import FP16_MIN_OPSET, to_fp16
from onnxq.options import HighPrecision, Selection
from onnxq.passes.upgrade_opset import upgrade_graph_opset
from onnxq.plan.core import PlanDraft, QuantPlan, float_reason, plan_pooling, plan_rule_ops, plan_weighted
from onnxq.plan.residual import residual_skip_input
from onnxq.plan.rules import WEIGHTED_OPS, default_float_reason, float_reasons
from onnxq.plan.scale_groups import scale_groups
from onnxq.targets.base import QuantTarget

__all__ = ["TensorRT"]

_RUNTIME = "TensorRT"
_FLOAT_REASONS = float_reasons(_RUNTIME)
_DEFAULT_FLOAT_REASON = default_float_reason(_RUNTIME)


def _plan(graph: gs.Graph, selection: Selection, quantize_attention: bool) -> QuantPlan:
    draft = PlanDraft(GraphIndex.build(graph), _RUNTIME, quantize_attention)
    nodes = list(graph.nodes)
    plan_rule_ops(nodes, draft, selection, WEIGHTED_OPS, plan_weighted, "{op}: INT8 kernel (TensorRT rule 1)")
    # Only a GEMM/conv with a constant weight has an epilogue an Add can be fused into.
    weighted = frozenset(w.consumer for w in draft.weights)
    for node in nodes:
        if node.op == "Add" and node.name not in draft.decisions:
            skip, reason = residual_skip_input(node, draft.index, weighted)
            if skip is not None and is_float(node.inputs[skip]):
                draft.quantize_input(node, skip, reason)
            draft.decide(node, skip is not None, reason)
    plan_pooling(nodes, draft)
    for node in nodes:
        if node.name not in draft.decisions:
            draft.decide(node, False, float_reason(node, draft, _FLOAT_REASONS, _DEFAULT_FLOAT_REASON))
    return draft.finish(nodes, scale_groups(nodes, draft.edges, draft.index).find)


@dataclass(frozen=True)
class TensorRT(QuantTarget):
    """TensorRT 10/11 strongly typed networks: symmetric INT8 activations and weights, float or float16 rest."""

    name: str = "trt"
    runtime: str = _RUNTIME
    scheme: ActivationScheme = INT8_SYMMETRIC
    latency_search_unsupported: str = "TensorRT times its own kernel choices"
    high_precisions: frozenset[HighPrecision] = frozenset({HighPrecision.FP32, HighPrecision.FP16})

    def plan(self, graph: gs.Graph, selection: Selection) -> QuantPlan:
        return _plan(graph, selection, self.attention_quantized(selection))

    def lower(self, graph: gs.Graph, high_precision: HighPrecision) -> gs.Graph:
        """With fp16: the float rest in float16 (opset raised to 19 for float16 Q/DQ scales)."""
        if high_precision is HighPrecision.FP16:
            return to_fp16(upgrade_graph_opset(graph, FP16_MIN_OPSET))
        return graph
