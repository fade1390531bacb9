"""Which quantized layers can have their bias corrected, and the rewrite that adds a correction to their biases.

Bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV 2019, section 4.2) adds to each output channel's bias the mean shift that quantization gives the
layer's output, E[y_c] - E[ỹ_c] (`onnxq.steps.bias_measure` measures it). The layers are the Conv,
ConvTranspose, Gemm and MatMul nodes whose constant weight and activation input the plan quantizes; their
output channel axis is 1 for Conv and ConvTranspose (NCHW) and the last axis for Gemm and MatMul. The bias
is the layer's own (input 2 of Conv, ConvTranspose and Gemm; Gemm's scaled by `beta`) or, for a MatMul,
the constant of the Add that is its only reader; a Conv, ConvTranspose or Gemm without one gets one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.names import NameSource
from onnxq.graph.query import GraphIndex, is_constant
from onnxq.passes.core import graph_pass
from onnxq.plan.core import QuantPlan

__all__ = ["LinearLayer", "linear_layers", "shift_biases"]

_OWN_BIAS = 2  # Conv, ConvTranspose, Gemm: the bias is input 2


@dataclass(frozen=True)
class LinearLayer:
    """A quantized layer whose bias can be corrected.

    Attributes:
        node_name: the Conv, ConvTranspose, Gemm or MatMul.
        op_type: its op type.
        output_name: the tensor whose channel means are measured (the node's output).
        channel_axis: the output's channel axis (1, or -1 for Gemm and MatMul).
        channels: how many output channels.
        bias_node: the node holding the bias constant: the layer itself, or the Add after a MatMul.
        bias_input: which input of `bias_node` the bias is (None: the layer has no bias yet).
        bias_scale: what the bias is multiplied by in the output (Gemm's beta; 1 otherwise).
        output_rank: the output's rank.
    """

    node_name: str
    op_type: str
    output_name: str
    channel_axis: int
    channels: int
    bias_node: str
    bias_input: int | None
    bias_scale: float = 1.0
    output_rank: int = 4

    @property
    def creates_bias(self) -> bool:
        """True when correcting the layer gives it a bias it did not have."""
        return self.bias_input is None


def _channels(node: gs.Node, weight: Sequence[int]) -> int:
    """Output channels from the weight's shape (read as shapes: loading a constant's values would change
    how the prepared graph writes it, and a discarded correction must leave the model byte for byte)."""
    if node.op == "Conv":
        return int(weight[0])
    if node.op == "ConvTranspose":
        return int(weight[1]) * int(node.attrs.get("group", 1))
    if node.op == "Gemm":
        return int(weight[0] if node.attrs.get("transB", 0) else weight[1])
    return int(weight[-1])


def _per_channel(shape: Sequence[int], channels: int) -> bool:
    """A bias constant that adds one value per output channel (or one to all) along the last axis."""
    return int(np.prod(shape)) in (1, channels) and all(d == 1 for d in shape[:-1])


def _matmul_bias(node: gs.Node, index: GraphIndex, channels: int) -> tuple[gs.Node | None, int | None, str | None]:
    """The Add holding a MatMul's bias and the constant's input index; or why there is none to correct."""
    out = node.outputs[0]
    readers = index.uses(out)
    if len(readers) != 1 or index.is_graph_output(out) or readers[0][0].op != "Add":
        return None, None, ("no bias Add after it: a new Add would stand between the MatMul and its readers, "
                            "where ONNX Runtime fuses DQ-MatMul-Q into one integer MatMul and TensorRT its output "
                            "quantization")
    add = readers[0][0]
    other = 1 - readers[0][1]
    constant = add.inputs[other]
    if not is_constant(constant) or not _per_channel(constant.shape, channels):
        return None, None, "the Add after it does not add a constant per output channel"
    return add, other, None


def _bias_slot(node: gs.Node, index: GraphIndex, channels: int) -> tuple[gs.Node | None, int | None, str | None]:
    """(the node holding the bias, its input index or None for none yet, why not correctable or None)."""
    if node.op == "MatMul":
        return _matmul_bias(node, index, channels)
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) == 0.0:
        return None, None, "Gemm with beta 0 ignores its bias"
    if len(node.inputs) <= _OWN_BIAS or not node.inputs[_OWN_BIAS].name:
        return node, None, None
    bias = node.inputs[_OWN_BIAS]
    if not is_constant(bias):
        return None, None, f"its bias '{bias.name}' is computed at run time"
    if not _per_channel(bias.shape, channels) or (node.op != "Gemm" and len(bias.shape) != 1):
        return None, None, f"its bias '{bias.name}' is not one value per output channel"
    return node, _OWN_BIAS, None


def _shared(tensor: gs.Tensor, index: GraphIndex) -> bool:
    return len(index.uses(tensor)) > 1


def linear_layers(graph: gs.Graph, plan: QuantPlan) -> tuple[tuple[LinearLayer, ...], tuple[tuple[str, str], ...]]:
    """The plan's quantized layers whose bias can be corrected, in graph order, and the others with the reason.

    A layer qualifies when the plan quantizes its constant weight (input 1) and its activation input.
    """
    index = GraphIndex.build(graph)
    nodes = {node.name: node for node in graph.nodes}
    weighted = {w.consumer for w in plan.weights if w.input_index == 1}
    read = {consumer for a in plan.activations for consumer, slot in a.consumers if slot == 0}
    layers: list[LinearLayer] = []
    skipped: list[tuple[str, str]] = []
    for decision in plan.quantized_nodes:
        node = nodes.get(decision.node_name)
        if node is None or node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.name not in weighted:
            continue
        if node.name not in read:
            skipped.append((node.name, "its activation input is not quantized"))
            continue
        channels = _channels(node, node.inputs[1].shape)
        holder, slot, why_not = _bias_slot(node, index, channels)
        if why_not is None and holder is not None and slot is not None and _shared(holder.inputs[slot], index):
            why_not = f"its bias '{holder.inputs[slot].name}' is shared with another node"
        if why_not is not None or holder is None:
            skipped.append((node.name, why_not or "no bias"))
            continue
        shape = node.outputs[0].shape
        if shape is None:
            skipped.append((node.name, "the rank of its output is unknown (shape inference could not tell)"))
            continue
        axis = 1 if node.op in ("Conv", "ConvTranspose") else -1
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        layers.append(LinearLayer(node.name, node.op, node.outputs[0].name, axis, channels, holder.name, slot, scale,
                                  len(shape)))
    return tuple(layers), tuple(skipped)


@graph_pass
def shift_biases(graph: gs.Graph, layers: Iterable[LinearLayer], deltas: Mapping[str, np.ndarray]) -> gs.Graph:
    """`graph` with `deltas[layer.node_name]` (one value per output channel) added to each layer's output
    through its bias: the bias constant is replaced (same name) or, for a layer without one, created."""
    nodes = {node.name: node for node in graph.nodes}
    names = NameSource(graph)
    for layer in layers:
        delta = deltas.get(layer.node_name)
        if delta is None:
            continue
        holder = nodes[layer.bias_node]
        step = np.asarray(delta, np.float64) / layer.bias_scale
        if layer.bias_input is None:
            dtype = holder.inputs[1].dtype
            bias = gs.Constant(names(f"{layer.node_name}_bias"), step.astype(dtype))
            holder.inputs.extend([gs.Variable.empty()] * (_OWN_BIAS - len(holder.inputs)))
            holder.inputs.append(bias)
            continue
        old = holder.inputs[layer.bias_input]
        values = np.asarray(old.values)
        shape = values.shape if values.size == layer.channels else (layer.channels,)
        new = (values.astype(np.float64).reshape(-1) + step).astype(values.dtype).reshape(shape)
        holder.inputs[layer.bias_input] = gs.Constant(old.name, new)
    return graph
