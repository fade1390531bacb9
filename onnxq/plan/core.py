"""What a plan is, and the planning helpers every target's planner shares.

A plan is an analysis: it reads the graph and returns a frozen `QuantPlan` in which every node has a
`NodeDecision` with a reason, whether it is quantized or left in float. Each target's planner
(`onnxq.targets.trt`, `onnxq.targets.ort_cpu`) fills a `PlanDraft` with its own rule tables and these
public helpers:
  * `plan_weighted`: a weighted op's (Conv, ConvTranspose, Gemm, MatMul) activation input per-tensor
    and constant weight per-channel on its output-channel axis;
  * `plan_pooling`: a pooling input, when its output reaches a quantized input;
  * `float_reason`: why a node outside the rules stays float, from the target's reason table;
  * `PlanDraft.finish`: the frozen plan, with scale groups.
Graph outputs and biases never get Q/DQ; consumers outside the plan keep reading the float tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.query import GraphIndex, is_constant, is_float
from onnxq.options import Selection
from onnxq.plan.residual import feeds_softmax, is_silu_mul
from onnxq.plan.rules import PASS_THROUGH_OPS, POOLING_OPS, WEIGHTED_OPS, ort_fusion_break

__all__ = [
    "QuantizedActivation", "QuantizedWeight", "QuantizedBias", "NodeDecision", "QuantPlan", "PlanDraft",
    "plan_weighted", "plan_pooling", "plan_rule_ops", "float_reason", "on_softmax_path",
]


@dataclass(frozen=True)
class QuantizedActivation:
    """A tensor that gets one QuantizeLinear -> DequantizeLinear pair, read by `consumers`."""

    tensor_name: str
    consumers: tuple[tuple[str, int], ...]
    group: str
    reason: str


@dataclass(frozen=True)
class QuantizedWeight:
    """A constant weight stored as INT8 + per-channel DequantizeLinear for one consumer input."""

    tensor_name: str
    consumer: str
    input_index: int
    axis: int
    reason: str


@dataclass(frozen=True)
class QuantizedBias:
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
    activations: tuple[QuantizedActivation, ...]
    weights: tuple[QuantizedWeight, ...]
    decisions: tuple[NodeDecision, ...]
    biases: tuple[QuantizedBias, ...] = ()

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
    """Mutable working state of one planning run (a planner's own; only `finish` leaves it).

    Attributes:
        index: the graph's producer/consumer index.
        runtime: the runtime's name as the reasons say it ("TensorRT", "ONNX Runtime").
        quantize_attention: whether attention MatMuls on the Softmax path are quantized.
        edges: tensor -> {(consumer, input index): why} for every quantized input slot.
        weights, biases: the quantized weights and INT32 biases so far.
        decisions: node name -> decision so far.
    """

    index: GraphIndex
    runtime: str
    quantize_attention: bool = False
    edges: dict[str, dict[tuple[str, int], str]] = field(default_factory=dict)
    weights: list[QuantizedWeight] = field(default_factory=list)
    biases: list[QuantizedBias] = field(default_factory=list)
    decisions: dict[str, NodeDecision] = field(default_factory=dict)

    def quantize_input(self, node: gs.Node, input_index: int, reason: str) -> None:
        tensor = node.inputs[input_index]
        self.edges.setdefault(tensor.name, {})[(node.name, input_index)] = reason

    def decide(self, node: gs.Node, quantized: bool, reason: str) -> None:
        self.decisions[node.name] = NodeDecision(node.name, node.op, quantized, reason)

    def finish(self, nodes: list[gs.Node], group_of: Callable[[str], str]) -> QuantPlan:
        """The frozen plan: one `QuantizedActivation` per quantized tensor (its scale group from
        `group_of`), the weights and biases, and the decisions in graph order."""
        activations = tuple(
            QuantizedActivation(name, tuple(sorted(uses)), group_of(name), "; ".join(sorted(set(uses.values()))))
            for name, uses in self.edges.items())
        return QuantPlan(activations, tuple(self.weights), tuple(self.decisions[n.name] for n in nodes),
                         tuple(self.biases))


def on_softmax_path(node: gs.Node, index: GraphIndex) -> bool:
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


def _constant_type(constant: gs.Constant) -> tuple[np.dtype, int]:
    """A constant's dtype and rank, without loading a lazy one's values (a large model's weights stay in
    the model instead of being copied into the graph, see `onnxq.io.to_graph`)."""
    try:
        return np.dtype(constant.dtype), len(constant.shape)
    except TypeError:  # a type numpy has no dtype for: as numpy loads it
        values = np.asarray(constant.values)
        return values.dtype, values.ndim


def plan_weighted(node: gs.Node, draft: PlanDraft) -> str | None:
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
            if not draft.quantize_attention and on_softmax_path(node, draft.index):
                return ("attention MatMul on the Softmax path: kept float by default, like Softmax itself "
                        "(--quantize-attention quantizes it)")
            draft.quantize_input(node, 0, "activation x activation MatMul: both inputs per-tensor")
            draft.quantize_input(node, 1, "activation x activation MatMul: both inputs per-tensor")
            return None
        return f"weight '{weight.name}' is computed at run time: {draft.runtime} needs constant INT8 weights"
    dtype, rank = _constant_type(weight)
    if dtype.kind != "f":
        return f"weight '{weight.name}' is {dtype}, not float"
    if rank < 2:
        return f"weight '{weight.name}' has rank {rank}; per-channel needs rank >= 2"
    if rule.weight_ranks is not None and rank not in rule.weight_ranks:
        return rule.weight_rank_reason.format(weight=weight.name, rank=rank)
    axis = rule.weight_axis(node, rank)
    draft.quantize_input(node, rule.activation_input, f"activation input of {node.op}: per-tensor")
    draft.weights.append(QuantizedWeight(
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


def plan_pooling(nodes: list[gs.Node], draft: PlanDraft) -> None:
    """Quantize each pooling input whose output reaches a quantized input; the others stay float."""
    # Reverse topological order lets a chain of pools (SPPF) follow the last one's consumer.
    for node in reversed(nodes):
        if node.op not in POOLING_OPS or node.name in draft.decisions:
            continue
        unfusable = ort_fusion_break(node)
        if unfusable is not None:
            draft.decide(node, False, unfusable)
            continue
        if is_float(node.inputs[0]) and _reaches_quantized_input(node.outputs[0], draft):
            draft.quantize_input(node, 0, f"{node.op} between quantized ops: DQ -> pool -> Q runs in INT8")
            draft.decide(node, True, "pooling next to quantized ops: input quantized so it runs in INT8")
        else:
            draft.decide(node, False, "pooling with no quantized consumer: kept float")


def float_reason(node: gs.Node, draft: PlanDraft, reasons: Mapping[str, str], default: str) -> str:
    """Why `node`, outside the planner's rules, stays float: from the target's `reasons` table by op type."""
    if node.outputs and not any(is_float(t) for t in node.outputs):
        return "works on integer/shape tensors: nothing to quantize"
    if is_silu_mul(node, draft.index) is not None:
        return f"SiLU (x * Sigmoid(x)): {draft.runtime} fuses it into the preceding layer"
    return reasons.get(node.op, default)


def plan_rule_ops(nodes: list[gs.Node], draft: PlanDraft, selection: Selection, ops: Container[str],
                  plan_one: Callable[[gs.Node, PlanDraft], str | None], why_quantized: str) -> None:
    """The first pass of every planner: each node the user excludes stays float saying so; each node of
    `ops` is planned by `plan_one` (None: quantized, saying `why_quantized` with {op} filled in; else
    the reason it stays float). Other nodes are left for later passes."""
    for node in nodes:
        excluded = selection.excluded_by(node.name, node.op)
        if excluded is not None:
            draft.decide(node, False, excluded)
        elif node.op in ops:
            why_not = plan_one(node, draft)
            draft.decide(node, why_not is None, why_not or why_quantized.format(op=node.op))
