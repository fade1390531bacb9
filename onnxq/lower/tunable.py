"""Insert a plan's Q/DQ with every activation group's scale and zero point as graph inputs, for range searches.

    x ─▶ QuantizeLinear(s_g, z_g) ─▶ DequantizeLinear(s_g, z_g) ─▶ consumers
                       ▲      ▲
    onnxq_scale/<g>: float32 scalar, onnxq_zero_point/<g>: int8/uint8 scalar   (graph inputs, one pair per group)

so one ONNX Runtime session runs the quantized model with any ranges, chosen per run by the values fed:
no re-export between candidates. Weights are written as `insert_qdq` writes them; biases stay float
(an INT32 bias's scale is the input's scale times the weight's, so it would have to change with every
fed scale: what is left out is its rounding, at most half of s_input * s_weight per channel). Fed any
parameters, the outputs are those of the `insert_qdq` model of the plan without INT32 biases (the
TensorRT plans have none) bit for bit. The tunable
model is for measurements only (scales that are not constants stop ORT from fusing Q/DQ): run it with
graph optimizations off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.errors import InternalError
from onnxq.graph.names import unique_name
from onnxq.lower.insert_qdq import insert_qdq
from onnxq.lower.scales import ActivationParams
from onnxq.plan.core import QuantPlan

__all__ = ["TunableGraph", "tunable_qdq"]


@dataclass(frozen=True)
class TunableGraph:
    """The tunable graph and, per activation group, the names of its scale and zero-point inputs."""

    graph: gs.Graph
    inputs: Mapping[str, tuple[str, str]]

    def feed(self, params: Mapping[str, ActivationParams]) -> dict[str, np.ndarray]:
        """The graph inputs that set every group's parameters (all groups must be given)."""
        fed: dict[str, np.ndarray] = {}
        for group, (scale, zero_point) in self.inputs.items():
            fed[scale] = np.asarray(params[group].scale, dtype=np.float32)
            fed[zero_point] = np.asarray(params[group].zero_point)
        return fed


def _activation_qdq(graph: gs.Graph, tensor_name: str) -> tuple[gs.Node, gs.Node]:
    """The QuantizeLinear `insert_qdq` put on `tensor_name` and the DequantizeLinear reading it."""
    tensor = graph.tensors()[tensor_name]
    for node in tensor.outputs:
        if node.op == "QuantizeLinear" and node.inputs[0] is tensor:
            readers = [r for r in node.outputs[0].outputs if r.op == "DequantizeLinear"]
            if len(readers) == 1:
                return node, readers[0]
    raise InternalError(f"tunable Q/DQ: no Q -> DQ pair on tensor '{tensor_name}'")


def tunable_qdq(graph: gs.Graph, plan: QuantPlan, group_params: Mapping[str, ActivationParams]) -> TunableGraph:
    """`insert_qdq(graph, plan, group_params)` with the activations' scales and zero points as graph inputs.

    Args:
        graph: the prepared float graph the plan was made for (not changed).
        plan: where Q/DQ goes.
        group_params: per activation group, its parameters: they fix the zero points' dtypes, and are
            what `TunableGraph.feed` of the same mapping reproduces.
    """
    quantized = insert_qdq(graph, replace(plan, biases=()), group_params)
    taken = set(quantized.tensors()) | {node.name for node in quantized.nodes}
    inputs: dict[str, tuple[gs.Variable, gs.Variable]] = {}
    for activation in plan.activations:
        if activation.group not in inputs:
            dtype = group_params[activation.group].zero_point.dtype
            inputs[activation.group] = (
                gs.Variable(unique_name(f"onnxq_scale/{activation.group}", taken), dtype=np.float32, shape=()),
                gs.Variable(unique_name(f"onnxq_zero_point/{activation.group}", taken), dtype=dtype, shape=()))
        scale, zero_point = inputs[activation.group]
        for node in _activation_qdq(quantized, activation.tensor_name):
            node.inputs[1], node.inputs[2] = scale, zero_point
    quantized.inputs.extend(tensor for pair in inputs.values() for tensor in pair)
    names = {group: (scale.name, zero_point.name) for group, (scale, zero_point) in inputs.items()}
    return TunableGraph(quantized.cleanup().toposort(), names)
