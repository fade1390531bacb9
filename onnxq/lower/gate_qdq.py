"""Insert a plan's Q/DQ with every quantized input behind a switch, for accuracy experiments.

Each input slot the plan quantizes (an activation read through Q -> DQ, an INT8 weight, an INT32
bias) reads `Where(gate, dequantized, float)` instead of the DequantizeLinear output directly:

    x ─▶ Q ─▶ DQ ─▶ x_dq ─┐
    x ──────────────────── Where(Gather(gates, i)) ─▶ consumer input
                                   ▲
    onnxq_gates: bool[slots] ──────┘   (a graph input)

so one ONNX Runtime session runs any mix of quantized and float inputs, chosen per run by the bool
vector fed as `onnxq_gates`: no re-export and no re-calibration, the calibrated scales unchanged. With
every gate on the outputs are those of the ungated `insert_qdq` model bit for bit; with every gate
off, those of the float graph. The gated model is for measurements only, never for deployment.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.names import unique_name
from onnxq.config import Selection, Target
from onnxq.errors import InternalError
from onnxq.plan.core import ActivationTarget, QuantPlan, plan_quantization
from onnxq.lower.scales import ActivationParams
from onnxq.lower.insert_qdq import insert_qdq

__all__ = ["GATES_INPUT", "GateSlot", "GatedGraph", "gate_slots", "gate_qdq", "exclude_nodes", "restrict_plan", "Layer",
           "LayerMap"]

Key = tuple[str, int]

GATES_INPUT = "onnxq_gates"


@dataclass(frozen=True)
class GateSlot:
    """One input slot a plan quantizes.

    Attributes:
        kind: "activation", "weight" or "bias".
        tensor_name: the float tensor the slot reads when its gate is off.
        consumer: the node reading the slot.
        input_index: which input of `consumer`.
    """

    kind: str
    tensor_name: str
    consumer: str
    input_index: int

    @property
    def key(self) -> tuple[str, int]:
        """(consumer, input index): unique per slot within a graph."""
        return (self.consumer, self.input_index)


@dataclass(frozen=True)
class GatedGraph:
    """The gated graph and the slot each element of the `gates_input` vector switches."""

    graph: gs.Graph
    slots: tuple[GateSlot, ...]
    gates_input: str


def gate_slots(plan: QuantPlan) -> tuple[GateSlot, ...]:
    """Every input slot `plan` quantizes, in a fixed order: activations, weights, biases."""
    slots = [GateSlot("activation", a.tensor_name, node, index)
             for a in plan.activations for node, index in a.consumers]
    slots += [GateSlot("weight", w.tensor_name, w.consumer, w.input_index) for w in plan.weights]
    slots += [GateSlot("bias", b.tensor_name, b.consumer, b.input_index) for b in plan.biases]
    return tuple(slots)


def _float_source(slot: GateSlot, tensors: dict[str, gs.Tensor], originals: Mapping[str, gs.Tensor]) -> gs.Tensor:
    """The float tensor a slot reads with its gate off, re-created as a constant if cleanup dropped it."""
    if slot.tensor_name in tensors:
        return tensors[slot.tensor_name]
    original = originals.get(slot.tensor_name)
    if not isinstance(original, gs.Constant):
        raise InternalError(f"gated slot {slot.consumer}[{slot.input_index}]: float tensor '{slot.tensor_name}' "
                            "is missing from the quantized graph")
    constant = gs.Constant(slot.tensor_name, original.values)  # shares the array: no copy of the weights
    tensors[slot.tensor_name] = constant
    return constant


def _gate(graph: gs.Graph, gates: gs.Variable, index: int, taken: set[str],
          quantized: gs.Tensor, floating: gs.Tensor) -> gs.Variable:
    position = gs.Constant(unique_name(f"{gates.name}_index_{index}", taken), np.array(index, dtype=np.int64))
    gate = gs.Variable(unique_name(f"{gates.name}_{index}", taken), dtype=np.bool_, shape=())
    graph.nodes.append(gs.Node("Gather", unique_name(f"{gates.name}_Gather_{index}", taken), {"axis": 0},
                               inputs=[gates, position], outputs=[gate]))
    chosen = gs.Variable(unique_name(f"{quantized.name}_gated", taken), dtype=quantized.dtype, shape=quantized.shape)
    graph.nodes.append(gs.Node("Where", unique_name(f"{quantized.name}_Where_{index}", taken),
                               inputs=[gate, quantized, floating], outputs=[chosen]))
    return chosen


def gate_qdq(graph: gs.Graph, plan: QuantPlan, group_params: Mapping[str, float | ActivationParams]) -> GatedGraph:
    """Insert the plan's Q/DQ as `insert_qdq` does, each quantized input behind its own gate.

    Args:
        graph: the prepared float graph the plan was made for (not changed).
        plan: where Q/DQ goes.
        group_params: per activation group, as for `insert_qdq`.

    Returns:
        The gated graph, with one extra graph input (bool, one element per slot), and the slots.
        A slot the quantized graph does not read through a DequantizeLinear (a bias `insert_qdq`
        leaves float) keeps its element in the vector, which then has no effect.
    """
    quantized = insert_qdq(graph, plan, group_params)
    slots = gate_slots(plan)
    tensors = quantized.tensors()
    taken = set(tensors) | {node.name for node in quantized.nodes}
    gates = gs.Variable(unique_name(GATES_INPUT, taken), dtype=np.bool_, shape=(len(slots),))
    nodes = {node.name: node for node in quantized.nodes}
    originals = graph.tensors()
    for index, slot in enumerate(slots):
        node = nodes.get(slot.consumer)
        if node is None:
            raise InternalError(f"gated slot: node '{slot.consumer}' is missing from the quantized graph")
        current = node.inputs[slot.input_index]
        producer = current.inputs[0] if current.inputs else None
        if producer is None or producer.op != "DequantizeLinear":
            continue
        floating = _float_source(slot, tensors, originals)
        node.inputs[slot.input_index] = _gate(quantized, gates, index, taken, current, floating)
    quantized.inputs.append(gates)
    return GatedGraph(quantized.cleanup().toposort(), slots, gates.name)


# --- which gates are on when some layers are float --------------------------------------------------

def exclude_nodes(selection: Selection, node_names: Iterable[str]) -> Selection:
    """`selection` plus one anchored, escaped pattern per node name."""
    patterns = tuple(f"^{re.escape(name)}$" for name in sorted(node_names))
    return replace(selection, exclude_node_patterns=selection.exclude_node_patterns + patterns)


@dataclass(frozen=True)
class Layer:
    """A quantized node of the plan and the gate slots that go float with it.

    Attributes:
        node_name: the node.
        op_type: its op type.
        slots: positions in `LayerMap.slots` of the plan's slots that excluding the node removes.
        tensors: the tensors those slots read.
    """

    node_name: str
    op_type: str
    slots: tuple[int, ...]
    tensors: tuple[str, ...]


def restrict_plan(plan: QuantPlan, allowed: Container[Key],
                  why: str = "after the fallback its Q/DQ would need a placement the accuracy measurements "
                             "did not cover") -> QuantPlan:
    """`plan` without the slots outside `allowed` (a node left with none is marked float, saying `why`)."""
    activations = []
    for target in plan.activations:
        consumers = tuple(c for c in target.consumers if c in allowed)
        if consumers:
            activations.append(replace(target, consumers=consumers))
    weights = tuple(w for w in plan.weights if (w.consumer, w.input_index) in allowed)
    biases = tuple(b for b in plan.biases if (b.consumer, b.input_index) in allowed)
    kept = {slot.consumer for slot in gate_slots(QuantPlan(tuple(activations), weights, (), biases))}
    before = {slot.consumer for slot in gate_slots(plan)}
    decisions = tuple(replace(d, quantized=False, reason=f"kept float: {why}")
                      if d.quantized and d.node_name in before - kept else d for d in plan.decisions)
    return replace(plan, activations=tuple(activations), weights=weights, decisions=decisions, biases=biases)


class LayerMap:
    """The plan's layers, and the gates of the plan `quantize` makes with any set of them excluded.

    Falling back a set S of layers means re-planning with S excluded (`plan_without`): the plan stays
    valid (a tensor another quantized node reads keeps its Q/DQ) and may even quantize an input the
    full plan did not (a residual Add whose fused Conv went float now fuses into the other branch).
    So the gated graph is built from `gated_plan`: the full plan plus every activation slot that
    excluding one layer adds, each extra tensor with a scale of its own. `calibrated_names` lists the
    tensors calibration must cover; a slot whose tensor has no statistics (`available`) is dropped.
    The model built for S is `final_plan(S)`, which `gates(S)` switches on exactly.

    Args:
        graph: the prepared float graph.
        plan: the full plan.
        selection: the user's selection (the exclusions are added to it).
        target: the placement target.
        available: tensors with calibration statistics (None: all).
        plans: plans already made, by excluded set (shared between maps of one graph).
    """

    def __init__(self, graph: gs.Graph, plan: QuantPlan, selection: Selection, target: Target,
                 available: Container[str] | None = None,
                 plans: dict[frozenset[str], QuantPlan] | None = None) -> None:
        self.graph, self.plan, self.selection, self.target = graph, plan, selection, target
        self._plans = {frozenset(): plan} if plans is None else plans
        singles = {d.node_name: self.plan_without([d.node_name]) for d in plan.quantized_nodes}
        self.gated_plan = _union(plan, singles.values(), available)
        self.slots = gate_slots(self.gated_plan)
        self._allowed = frozenset(slot.key for slot in self.slots)
        self._position = {slot.key: i for i, slot in enumerate(self.slots)}
        self._gates: dict[frozenset[str], np.ndarray] = {}
        full = self.gates(())
        layers = []
        for decision in plan.quantized_nodes:
            owned = np.flatnonzero(full & ~self.gates([decision.node_name]))
            if owned.size:
                tensors = tuple(dict.fromkeys(self.slots[i].tensor_name for i in owned))
                layers.append(Layer(decision.node_name, decision.op_type, tuple(int(i) for i in owned), tensors))
        self.layers: tuple[Layer, ...] = tuple(layers)

    @property
    def calibrated_names(self) -> tuple[str, ...]:
        """The activation tensors the gated plan quantizes: what calibration must cover."""
        return self.gated_plan.activation_names

    def restricted(self, available: Container[str]) -> LayerMap:
        """The same map without the extra slots whose tensors have no statistics."""
        return LayerMap(self.graph, self.plan, self.selection, self.target, available, self._plans)

    def plan_without(self, float_layers: Iterable[str]) -> QuantPlan:
        """The plan `quantize` makes with these nodes also excluded (cached)."""
        key = frozenset(float_layers)
        if key not in self._plans:
            self._plans[key] = plan_quantization(self.graph, exclude_nodes(self.selection, key), self.target)
        return self._plans[key]

    def final_plan(self, float_layers: Iterable[str]) -> QuantPlan:
        """`plan_without`, minus any slot the gated graph lacks (rare: interactions of several exclusions)."""
        return restrict_plan(self.plan_without(float_layers), self._allowed)

    def gates(self, float_layers: Iterable[str]) -> np.ndarray:
        """The gate vector that reproduces `final_plan(float_layers)`."""
        key = frozenset(float_layers)
        if key not in self._gates:
            gates = np.zeros(len(self.slots), dtype=np.bool_)
            for slot in gate_slots(self.plan_without(key)):
                position = self._position.get(slot.key)
                if position is not None:
                    gates[position] = True
            self._gates[key] = gates
        return self._gates[key]

    def only(self, layer: Layer) -> np.ndarray:
        """Gates with only `layer`'s slots on: it alone quantized, everything else float."""
        gates = np.zeros(len(self.slots), dtype=np.bool_)
        gates[list(layer.slots)] = True
        return gates


def _union(plan: QuantPlan, others: Iterable[QuantPlan], available: Container[str] | None) -> QuantPlan:
    """`plan` plus the activation slots of `others` it lacks (extra tensors get a scale group of their own)."""
    known = {slot.key for slot in gate_slots(plan)}
    extra: dict[str, dict[Key, str]] = {}
    for other in others:
        for target in other.activations:
            if available is not None and target.tensor_name not in available:
                continue
            for key in target.consumers:
                if key not in known:
                    extra.setdefault(target.tensor_name, {})[key] = target.reason
    if not extra:
        return plan
    activations = []
    for target in plan.activations:
        added = extra.pop(target.tensor_name, {})
        activations.append(replace(target, consumers=tuple(sorted({*target.consumers, *added}))) if added else target)
    activations += [ActivationTarget(name, tuple(sorted(uses)), name, "; ".join(sorted(set(uses.values()))))
                    for name, uses in extra.items()]
    return replace(plan, activations=tuple(activations))
