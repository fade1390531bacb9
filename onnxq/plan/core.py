"""Plan where Q/DQ goes: an analysis that reads the graph and returns a frozen `QuantPlan`.

Every node gets a `NodeDecision` with a reason, whether it is quantized or left in float.
The stages, in order:
  1. weighted ops (Conv, ConvTranspose, Gemm, MatMul): activation input per-tensor, constant weight
     per-channel on its output-channel axis;
  2. residual Adds: the skip input only;
  3. pooling: its input, when its output reaches a quantized input (through data movement);
  4. Concat: quantized inputs and the quantized output share one scale group.
Graph outputs and biases never get Q/DQ; consumers outside the plan keep reading the float tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.config import Selection, Target
from onnxq.graph.query import GraphIndex, is_constant, is_float
from onnxq.plan.residual import feeds_softmax, is_silu_mul, residual_skip_input
from onnxq.plan.rules import DEFAULT_FLOAT_REASON, FLOAT_REASONS, PASS_THROUGH_OPS, POOLING_OPS, WEIGHTED_OPS
from onnxq.plan.scale_groups import scale_groups

__all__ = [
    "ActivationTarget", "WeightTarget", "BiasTarget", "NodeDecision", "QuantPlan", "PlanDraft", "plan_quantization",
]


@dataclass(frozen=True)
class ActivationTarget:
    """A tensor that gets one QuantizeLinear -> DequantizeLinear pair, read by `consumers`."""

    tensor_name: str
    consumers: tuple[tuple[str, int], ...]
    group: str
    reason: str


@dataclass(frozen=True)
class WeightTarget:
    """A constant weight stored as INT8 + per-channel DequantizeLinear for one consumer input."""

    tensor_name: str
    consumer: str
    input_index: int
    axis: int
    reason: str


@dataclass(frozen=True)
class BiasTarget:
    """A float bias stored as INT32 with scale s_input * s_weight (ONNX Runtime's QLinearConv/QGemm)."""

    tensor_name: str
    consumer: str
    input_index: int
    activation_name: str
    weight_name: str
    axis: int


@dataclass(frozen=True)
class NodeDecision:
    node_name: str
    op_type: str
    quantized: bool
    reason: str


@dataclass(frozen=True)
class QuantPlan:
    activations: tuple[ActivationTarget, ...]
    weights: tuple[WeightTarget, ...]
    decisions: tuple[NodeDecision, ...]
    biases: tuple[BiasTarget, ...] = ()

    @property
    def activation_names(self) -> tuple[str, ...]:
        return tuple(t.tensor_name for t in self.activations)

    @property
    def quantized_nodes(self) -> tuple[NodeDecision, ...]:
        return tuple(d for d in self.decisions if d.quantized)

    @property
    def float_nodes(self) -> tuple[NodeDecision, ...]:
        return tuple(d for d in self.decisions if not d.quantized)

    def decision(self, node_name: str) -> NodeDecision:
        for decision in self.decisions:
            if decision.node_name == node_name:
                return decision
        raise KeyError(node_name)


@dataclass
class PlanDraft:
    """Mutable working state of one planning run (never leaves this module)."""

    index: GraphIndex
    edges: dict[str, dict[tuple[str, int], str]] = field(default_factory=dict)  # tensor -> {(node, i): why}
    weights: list[WeightTarget] = field(default_factory=list)
    biases: list[BiasTarget] = field(default_factory=list)
    quantize_attention: bool = False
    decisions: dict[str, NodeDecision] = field(default_factory=dict)

    def quantize_input(self, node: gs.Node, input_index: int, reason: str) -> None:
        tensor = node.inputs[input_index]
        self.edges.setdefault(tensor.name, {})[(node.name, input_index)] = reason

    def decide(self, node: gs.Node, quantized: bool, reason: str) -> None:
        self.decisions[node.name] = NodeDecision(node.name, node.op, quantized, reason)


def _on_softmax_path(node: gs.Node, index: GraphIndex) -> bool:
    """An attention BMM: its output feeds a Softmax (through scaling/masking), or an input comes from one."""
    if feeds_softmax(node.outputs[0], index):
        return True
    for tensor in node.inputs:
        producer = index.producer(tensor)
        while producer is not None and producer.op in ("Cast", "Reshape", "Transpose", "Identity"):
            producer = index.producer(producer.inputs[0])
        if producer is not None and producer.op == "Softmax":
            return True
    return False


def _plan_weighted(node: gs.Node, draft: PlanDraft) -> str | None:
    """Quantize a weighted op's inputs, or return why it stays float."""
    rule = WEIGHTED_OPS[node.op]
    if len(node.inputs) <= rule.weight_input:
        return "has no weight input"
    activation, weight = node.inputs[rule.activation_input], node.inputs[rule.weight_input]
    if not is_float(activation):
        return f"input '{activation.name}' is not a float tensor"
    if is_constant(activation):
        return f"input '{activation.name}' is a constant"
    if not is_constant(weight):
        if node.op == "MatMul" and is_float(weight):
            if not draft.quantize_attention and _on_softmax_path(node, draft.index):
                return ("attention MatMul on the Softmax path: kept float by default, like Softmax itself "
                        "(--quantize-attention quantizes it)")
            draft.quantize_input(node, 0, "activation x activation MatMul: both inputs per-tensor")
            draft.quantize_input(node, 1, "activation x activation MatMul: both inputs per-tensor")
            return None
        return f"weight '{weight.name}' is computed at run time: TensorRT needs constant INT8 weights"
    weight_values = np.asarray(weight.values)
    if weight_values.dtype.kind != "f":
        return f"weight '{weight.name}' is {weight_values.dtype}, not float"
    if weight_values.ndim < 2:
        return f"weight '{weight.name}' has rank {weight_values.ndim}; per-channel needs rank >= 2"
    axis = rule.weight_axis(node, weight_values.ndim)
    draft.quantize_input(node, rule.activation_input, f"activation input of {node.op}: per-tensor")
    draft.weights.append(WeightTarget(
        weight.name, node.name, rule.weight_input, axis,
        f"{node.op} weight {rule.layout}: per-channel on axis {axis}"))
    return None


def _reaches_quantized_input(tensor: gs.Tensor, draft: PlanDraft) -> bool:
    """True if `tensor`, through pass-through ops, is read by an input the plan quantizes."""
    for node, index in draft.index.uses(tensor):
        if (node.name, index) in draft.edges.get(tensor.name, {}):
            return True
        if node.op in PASS_THROUGH_OPS and any(_reaches_quantized_input(t, draft) for t in node.outputs):
            return True
    return False


def _plan_pooling(nodes: list[gs.Node], draft: PlanDraft) -> None:
    # Reverse topological order lets a chain of pools (SPPF) follow the last one's consumer.
    for node in reversed(nodes):
        if node.op not in POOLING_OPS or node.name in draft.decisions:
            continue
        if is_float(node.inputs[0]) and _reaches_quantized_input(node.outputs[0], draft):
            draft.quantize_input(node, 0, f"{node.op} between quantized ops: DQ -> pool -> Q runs in INT8")
            draft.decide(node, True, "pooling next to quantized ops: input quantized so it runs in INT8")
        else:
            draft.decide(node, False, "pooling with no quantized consumer: kept float")


def _float_reason(node: gs.Node, index: GraphIndex) -> str:
    if node.outputs and not any(is_float(t) for t in node.outputs):
        return "works on integer/shape tensors: nothing to quantize"
    if is_silu_mul(node, index) is not None:
        return "SiLU (x * Sigmoid(x)): TensorRT fuses it into the preceding layer"
    return FLOAT_REASONS.get(node.op, DEFAULT_FLOAT_REASON)


def plan_quantization(graph: gs.Graph, selection: Selection = Selection(), target: Target = Target.TRT) -> QuantPlan:
    """Decide, for every node of the main graph, whether and where it is quantized, and why."""
    if target is Target.ORT_CPU:
        from onnxq.targets.ort_cpu import plan_ort_cpu

        return plan_ort_cpu(graph, selection)
    return _plan_trt(graph, selection)


def _plan_trt(graph: gs.Graph, selection: Selection) -> QuantPlan:
    draft = PlanDraft(GraphIndex.build(graph), quantize_attention=selection.quantize_attention is True)
    nodes = list(graph.nodes)
    for node in nodes:
        excluded = selection.excluded_by(node.name, node.op)
        if excluded is not None:
            draft.decide(node, False, excluded)
        elif node.op in WEIGHTED_OPS:
            why_not = _plan_weighted(node, draft)
            draft.decide(node, why_not is None, why_not or f"{node.op}: INT8 kernel (TensorRT rule 1)")
    # Only a GEMM/conv with a constant weight has an epilogue an Add can be fused into.
    weighted = frozenset(w.consumer for w in draft.weights)
    for node in nodes:
        if node.op == "Add" and node.name not in draft.decisions:
            skip, reason = residual_skip_input(node, draft.index, weighted)
            if skip is not None and is_float(node.inputs[skip]):
                draft.quantize_input(node, skip, reason)
            draft.decide(node, skip is not None, reason)
    _plan_pooling(nodes, draft)
    for node in nodes:
        if node.name not in draft.decisions:
            draft.decide(node, False, _float_reason(node, draft.index))
    groups = scale_groups(nodes, draft.edges, draft.index)
    activations = tuple(
        ActivationTarget(name, tuple(sorted(uses)), groups.get(name, name), "; ".join(sorted(set(uses.values()))))
        for name, uses in draft.edges.items()
    )
    return QuantPlan(activations, tuple(draft.weights), tuple(draft.decisions[n.name] for n in nodes))
