"""The layers of a plan for accuracy experiments: which gate slots go float with each quantized node.

A *layer* is a node the plan quantizes; its slots are the quantized inputs that disappear when the node
is excluded and the graph re-planned (`onnxq.plan.replan`). `LayerMap` builds the gated plan that covers
every such re-plan, so one session of the gated model (`onnxq.lower.gate_qdq`) measures them all.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.plan.core import QuantizedActivation, QuantPlan
from onnxq.plan.replan import Key, Replanner, gate_slots, restrict_plan, with_reasons

__all__ = ["Layer", "LayerMap"]


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
        replanner: the target's plans for the prepared graph.
        base: nodes already float before the fallback (e.g. by the latency search), each with its
            reason; the full plan is `replanner.plan_without(base)` and every fallback adds to it.
        available: tensors with calibration statistics (None: all).
    """

    def __init__(self, replanner: Replanner, base: Mapping[str, str] | None = None,
                 available: Container[str] | None = None) -> None:
        self.replanner, self.reasons = replanner, dict(base or {})
        self.base = frozenset(self.reasons)
        self.plan = plan = with_reasons(replanner.plan_without(self.base), self.reasons)
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
    def graph(self) -> gs.Graph:
        """The prepared float graph."""
        return self.replanner.graph

    @property
    def calibrated_names(self) -> tuple[str, ...]:
        """The activation tensors the gated plan quantizes: what calibration must cover."""
        return self.gated_plan.activation_names

    def restricted(self, available: Container[str]) -> LayerMap:
        """The same map without the extra slots whose tensors have no statistics."""
        return LayerMap(self.replanner, self.reasons, available)

    def plan_without(self, float_layers: Iterable[str]) -> QuantPlan:
        """The plan `quantize` makes with these nodes also excluded (cached)."""
        return self.replanner.plan_without(self.base | frozenset(float_layers))

    def final_plan(self, float_layers: Iterable[str]) -> QuantPlan:
        """`plan_without`, minus any slot the gated graph lacks (rare: interactions of several exclusions)."""
        return with_reasons(restrict_plan(self.plan_without(float_layers), self._allowed), self.reasons)

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
        for activation in other.activations:
            if available is not None and activation.tensor_name not in available:
                continue
            for key in activation.consumers:
                if key not in known:
                    extra.setdefault(activation.tensor_name, {})[key] = activation.reason
    if not extra:
        return plan
    activations = []
    for activation in plan.activations:
        added = extra.pop(activation.tensor_name, {})
        activations.append(replace(activation, consumers=tuple(sorted({*activation.consumers, *added}))) if added else activation)
    activations += [QuantizedActivation(name, tuple(sorted(uses)), name, "; ".join(sorted(set(uses.values()))))
                    for name, uses in extra.items()]
    return replace(plan, activations=tuple(activations))
