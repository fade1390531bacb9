"""Write a QuantPlan back into the graph.

Activations:  x ─▶ QuantizeLinear(s, zp=0 int8) ─▶ DequantizeLinear(s, 0) ─▶ x_dq ─▶ planned consumers
Weights:      W (float) becomes W_int8 = clamp(rne(W / s_c), -128, 127) ─▶ DequantizeLinear(s_c, 0, axis)
Scales are float32 initializers (the activation's dtype for float16 graphs); zero points are explicit
INT8 zeros of the scale's shape; per-channel nodes always carry `axis` (TensorRT's parser reads a
missing axis as 0, ONNX as 1). Consumers not in the plan keep the float tensor, so graph outputs and
biases are never quantized.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import InternalError
from ..quant.plan import ActivationTarget, QuantPlan, WeightTarget
from ..quant.scales import activation_scale, quantize_weight, weight_scales
from .core import graph_pass

__all__ = ["insert_qdq"]


class _Names:
    """Deterministic, collision-free names for inserted tensors and nodes."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, suffix = base, 1
        while name in self.taken:
            suffix += 1
            name = f"{base}_{suffix}"
        self.taken.add(name)
        return name


def _scale_and_zero_point(names: _Names, base: str, scale: np.ndarray) -> tuple[gs.Constant, gs.Constant]:
    return (gs.Constant(names(f"{base}_scale"), scale),
            gs.Constant(names(f"{base}_zero_point"), np.zeros(scale.shape, dtype=np.int8)))


def _dequantize(graph: gs.Graph, names: _Names, source: gs.Tensor, params: tuple[gs.Constant, gs.Constant],
                like: gs.Tensor, axis: int | None) -> gs.Variable:
    out = gs.Variable(names(f"{like.name}_dequantized"), dtype=like.dtype, shape=like.shape)
    attrs = {} if axis is None else {"axis": axis}
    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{like.name}_DequantizeLinear"), attrs,
                               inputs=[source, *params], outputs=[out]))
    return out


def _insert_activation(graph: gs.Graph, names: _Names, nodes: Mapping[str, gs.Node],
                       tensor: gs.Tensor, target: ActivationTarget, scale: np.float32) -> None:
    dtype = np.float16 if tensor.dtype == np.float16 else np.float32
    params = _scale_and_zero_point(names, tensor.name, np.asarray(scale, dtype=dtype))
    quantized = gs.Variable(names(f"{tensor.name}_quantized"), dtype=np.int8, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", names(f"{tensor.name}_QuantizeLinear"),
                               inputs=[tensor, *params], outputs=[quantized]))
    dequantized = _dequantize(graph, names, quantized, params, tensor, axis=None)
    for node_name, index in target.consumers:
        nodes[node_name].inputs[index] = dequantized


def _insert_weight(graph: gs.Graph, names: _Names, weight: gs.Constant,
                   targets: list[WeightTarget], nodes: Mapping[str, gs.Node]) -> None:
    values = np.asarray(weight.values)
    axis = targets[0].axis
    scales = weight_scales(values, axis)
    int8 = gs.Constant(names(f"{weight.name}_int8"), quantize_weight(values, scales, axis))
    params = _scale_and_zero_point(names, weight.name, scales.astype(values.dtype))
    dequantized = _dequantize(graph, names, int8, params, weight, axis=axis)
    for target in targets:
        nodes[target.consumer].inputs[target.input_index] = dequantized


@graph_pass
def insert_qdq(graph: gs.Graph, plan: QuantPlan, group_amax: Mapping[str, float]) -> gs.Graph:
    """Insert the plan's Q/DQ pairs; `group_amax` maps each activation group to its calibrated amax."""
    names = _Names(graph)
    nodes = {node.name: node for node in graph.nodes}
    tensors = graph.tensors()
    for target in plan.activations:
        if target.group not in group_amax:
            raise InternalError(f"no calibrated range for tensor group '{target.group}'")
        scale = activation_scale(target.tensor_name, group_amax[target.group])
        _insert_activation(graph, names, nodes, tensors[target.tensor_name], target, scale)
    by_weight: dict[tuple[str, int], list[WeightTarget]] = {}
    for weight_target in plan.weights:
        by_weight.setdefault((weight_target.tensor_name, weight_target.axis), []).append(weight_target)
    for (tensor_name, _), targets in by_weight.items():
        weight = tensors[tensor_name]
        if not isinstance(weight, gs.Constant):
            raise InternalError(f"planned weight '{tensor_name}' is not a constant")
        _insert_weight(graph, names, weight, targets, nodes)
    return graph
