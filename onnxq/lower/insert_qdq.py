"""Write a QuantPlan back into the graph.

Activations:  x ─▶ QuantizeLinear(s, zp) ─▶ DequantizeLinear(s, zp) ─▶ x_dq ─▶ planned consumers
              (int8 zp 0 for TensorRT, uint8 zp for ONNX Runtime's CPU kernels: the target's scheme)
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

import onnxq.mapped_weights as mapped_weights
from onnxq.graph.names import NameSource
from onnxq.errors import InternalError
from onnxq.plan.core import QuantizedActivation, QuantizedBias, QuantPlan, QuantizedWeight
from onnxq.lower.scales import ActivationParams, quantize_bias, quantize_weight, weight_scales
from onnxq.passes.core import graph_pass

__all__ = ["insert_qdq"]


def _scale_and_zero_point(names: NameSource, base: str, scale: np.ndarray,
                          zero_point: np.ndarray | None = None) -> tuple[gs.Constant, gs.Constant]:
    if zero_point is None:
        zero_point = np.zeros(scale.shape, dtype=np.int8)
    return (gs.Constant(names(f"{base}_scale"), scale), gs.Constant(names(f"{base}_zero_point"), zero_point))


def _dequantize(graph: gs.Graph, names: NameSource, source: gs.Tensor, params: tuple[gs.Constant, gs.Constant],
                like: gs.Tensor, axis: int | None) -> gs.Variable:
    out = gs.Variable(names(f"{like.name}_dequantized"), dtype=like.dtype, shape=like.shape)
    attrs = {} if axis is None else {"axis": axis}
    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{like.name}_DequantizeLinear"), attrs,
                               inputs=[source, *params], outputs=[out]))
    return out


def _insert_activation(graph: gs.Graph, names: NameSource, nodes: Mapping[str, gs.Node],
                       tensor: gs.Tensor, planned: QuantizedActivation, activation: ActivationParams) -> None:
    dtype = np.float16 if tensor.dtype == np.float16 else np.float32
    params = _scale_and_zero_point(names, tensor.name, np.asarray(activation.scale, dtype=dtype),
                                   activation.zero_point)
    quantized = gs.Variable(names(f"{tensor.name}_quantized"), dtype=activation.zero_point.dtype, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", names(f"{tensor.name}_QuantizeLinear"),
                               inputs=[tensor, *params], outputs=[quantized]))
    dequantized = _dequantize(graph, names, quantized, params, tensor, axis=None)
    for node_name, index in planned.consumers:
        nodes[node_name].inputs[index] = dequantized


def _insert_weight(graph: gs.Graph, names: NameSource, weight: gs.Constant,
                   uses: list[QuantizedWeight], nodes: Mapping[str, gs.Node]) -> np.ndarray:
    # A weight not yet loaded (a large model's, see `onnxq.io.to_graph`) is read for this call only: the
    # graph keeps referring to the model's tensor instead of holding a float copy beside the INT8 one. A
    # weight in the input's file (`onnxq.mapped_weights`) is read through its mapping, whose pages are
    # dropped from the process once it is quantized.
    lazy = weight._values if isinstance(weight._values, gs.ir.tensor.LazyValues) else None
    values = np.asarray(lazy.load() if lazy is not None else weight.values)
    axis = uses[0].axis
    scales = weight_scales(values, axis)
    int8 = gs.Constant(names(f"{weight.name}_int8"), quantize_weight(values, scales, axis))
    mapped_weights.release_pages(values)
    params = _scale_and_zero_point(names, weight.name, scales.astype(values.dtype))
    dequantized = _dequantize(graph, names, int8, params, weight, axis=axis)
    for use in uses:
        nodes[use.consumer].inputs[use.input_index] = dequantized
    return scales


def _insert_bias(graph: gs.Graph, names: NameSource, nodes: Mapping[str, gs.Node], bias: gs.Constant,
                 quantized_bias: QuantizedBias, input_scale: np.float32, weight_scale: np.ndarray) -> None:
    values = np.asarray(bias.values)
    if weight_scale.size != values.size:
        return  # a per-tensor or mismatched layout: leave the bias float
    quantized, scale = quantize_bias(values, input_scale, weight_scale)
    params = _scale_and_zero_point(names, bias.name, scale, np.zeros(scale.shape, np.int32))
    int32 = gs.Constant(names(f"{bias.name}_int32"), quantized)
    nodes[quantized_bias.consumer].inputs[quantized_bias.input_index] = _dequantize(graph, names, int32, params, bias, axis=0)


def _params(activation: QuantizedActivation, group_params: Mapping[str, ActivationParams]) -> ActivationParams:
    if activation.group not in group_params:
        raise InternalError(f"no calibrated range for tensor group '{activation.group}'")
    return group_params[activation.group]


@graph_pass
def insert_qdq(graph: gs.Graph, plan: QuantPlan, group_params: Mapping[str, ActivationParams]) -> gs.Graph:
    """Insert the plan's Q/DQ pairs.

    Args:
        graph: the prepared float graph the plan was made for.
        plan: where Q/DQ goes.
        group_params: per activation group, its scale and zero point (`onnxq.calib.ranges.activation_params`
            with the target's scheme).
    """
    names = NameSource(graph)
    nodes = {node.name: node for node in graph.nodes}
    tensors = graph.tensors()
    activation_params: dict[str, ActivationParams] = {}
    for activation in plan.activations:
        activation_params[activation.tensor_name] = _params(activation, group_params)
        _insert_activation(graph, names, nodes, tensors[activation.tensor_name], activation,
                           activation_params[activation.tensor_name])
    by_weight: dict[tuple[str, int], list[QuantizedWeight]] = {}
    for use in plan.weights:
        by_weight.setdefault((use.tensor_name, use.axis), []).append(use)
    weight_scale: dict[str, np.ndarray] = {}
    for (tensor_name, _), uses in by_weight.items():
        weight = tensors[tensor_name]
        if not isinstance(weight, gs.Constant):
            raise InternalError(f"planned weight '{tensor_name}' is not a constant")
        weight_scale[tensor_name] = _insert_weight(graph, names, weight, uses, nodes)
    for planned_bias in plan.biases:
        bias = tensors[planned_bias.tensor_name]
        input_params = activation_params.get(planned_bias.activation_name)
        if isinstance(bias, gs.Constant) and input_params is not None:
            _insert_bias(graph, names, nodes, bias, planned_bias, input_params.scale,
                         weight_scale[planned_bias.weight_name])
    return graph
