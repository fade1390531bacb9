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

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.names import unique_name
from onnxq.errors import InternalError
from onnxq.plan.core import QuantPlan
from onnxq.plan.replan import GateSlot, gate_slots
from onnxq.lower.scales import ActivationParams
from onnxq.lower.insert_qdq import insert_qdq

__all__ = ["GATES_INPUT", "GateSlot", "GatedGraph", "gate_slots", "gate_qdq"]

GATES_INPUT = "onnxq_gates"


@dataclass(frozen=True)
class GatedGraph:
    """The gated graph and the slot each element of the `gates_input` vector switches."""

    graph: gs.Graph
    slots: tuple[GateSlot, ...]
    gates_input: str


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


def gate_qdq(graph: gs.Graph, plan: QuantPlan, group_params: Mapping[str, ActivationParams]) -> GatedGraph:
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
