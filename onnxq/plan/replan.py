"""Re-planning with some nodes kept float: the one primitive the steps that change a plan share.

The latency search (a class of layers float for speed) and the accuracy fallback (the layers whose
quantization hurts most float) both ask the same question: what plan does the target make when these
nodes are also excluded? `Replanner.plan_without` answers it, caching each answer, so that the plan
stays valid (a tensor another quantized node reads keeps its Q/DQ) and is exactly what
`quantize --exclude-nodes` would place. A plan's *slots* (`gate_slots`) are its quantized input
slots; `restrict_plan` drops the slots a later stage cannot provide (no calibration statistics).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from onnxq.options import Selection
from onnxq.plan.core import QuantPlan

__all__ = ["GateSlot", "gate_slots", "exclude_nodes", "restrict_plan", "with_reasons", "Planner", "Replanner"]

Key = tuple[str, int]
#: A target's planner: (graph, selection) -> plan (`QuantTarget.plan`).
Planner = Callable[[gs.Graph, Selection], QuantPlan]


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



def gate_slots(plan: QuantPlan) -> tuple[GateSlot, ...]:
    """Every input slot `plan` quantizes, in a fixed order: activations, weights, biases."""
    slots = [GateSlot("activation", a.tensor_name, node, index)
             for a in plan.activations for node, index in a.consumers]
    slots += [GateSlot("weight", w.tensor_name, w.consumer, w.input_index) for w in plan.weights]
    slots += [GateSlot("bias", b.tensor_name, b.consumer, b.input_index) for b in plan.biases]
    return tuple(slots)


def exclude_nodes(selection: Selection, node_names: Iterable[str]) -> Selection:
    """`selection` plus one anchored, escaped pattern per node name."""
    patterns = tuple(f"^{re.escape(name)}$" for name in sorted(node_names))
    return replace(selection, exclude_node_patterns=selection.exclude_node_patterns + patterns)


def restrict_plan(plan: QuantPlan, allowed: Container[Key],
                  why: str = "after the fallback its Q/DQ would need a placement the accuracy measurements "
                             "did not cover") -> QuantPlan:
    """`plan` without the slots outside `allowed` (a node left with none is marked float, saying `why`)."""
    activations = []
    for activation in plan.activations:
        consumers = tuple(c for c in activation.consumers if c in allowed)
        if consumers:
            activations.append(replace(activation, consumers=consumers))
    weights = tuple(w for w in plan.weights if (w.consumer, w.input_index) in allowed)
    biases = tuple(b for b in plan.biases if (b.consumer, b.input_index) in allowed)
    kept = {slot.consumer for slot in gate_slots(QuantPlan(tuple(activations), weights, (), biases))}
    before = {slot.consumer for slot in gate_slots(plan)}
    decisions = tuple(replace(d, quantized=False, reason=f"kept float: {why}")
                      if d.quantized and d.node_name in before - kept else d for d in plan.decisions)
    return replace(plan, activations=tuple(activations), weights=weights, decisions=decisions, biases=biases)


def with_reasons(plan: QuantPlan, reasons: Mapping[str, str]) -> QuantPlan:
    """`plan` with the decisions of the nodes in `reasons` saying that reason instead."""
    if not reasons:
        return plan
    decisions = tuple(replace(d, reason=reasons[d.node_name]) if d.node_name in reasons else d
                      for d in plan.decisions)
    return replace(plan, decisions=decisions)


class Replanner:
    """The plans a target makes for one graph with more and more nodes kept float (cached).

    Args:
        graph: the prepared float graph.
        planner: the target's planner (`QuantTarget.plan`).
        selection: the user's selection; exclusions are added to it.
    """

    def __init__(self, graph: gs.Graph, planner: Planner, selection: Selection) -> None:
        self.graph, self.planner, self.selection = graph, planner, selection
        self._plans: dict[frozenset[str], QuantPlan] = {}

    def plan_without(self, float_nodes: Iterable[str] = ()) -> QuantPlan:
        """The plan with these nodes also excluded: what `--exclude-nodes` would give (cached)."""
        key = frozenset(float_nodes)
        if key not in self._plans:
            selection = exclude_nodes(self.selection, key) if key else self.selection
            self._plans[key] = self.planner(self.graph, selection)
        return self._plans[key]
