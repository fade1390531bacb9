"""Fold inference-mode BatchNormalization into the Conv or ConvTranspose that feeds it.

Rewrite: `BatchNormalization(Conv(x, W, b), gamma, beta, mean, var, epsilon)` becomes
`Conv(x, W', b')` with, per output channel `c`,

    s[c]  = gamma[c] / sqrt(var[c] + epsilon)
    W'    = W * s       (broadcast on the weight's output-channel axis)
    b'[c] = (b[c] - mean[c]) * s[c] + beta[c]      (b = 0 when the conv has no bias)

The output-channel axis is axis 0 of a Conv weight `[C_out, C_in/group, k...]`. A ConvTranspose
weight is `[C_in, C_out/group, k...]`: output channel `g * C_out/group + j` is column `j` of group
`g`'s `C_in/group` rows, so `s` is applied per group along axis 1.

The fusion happens only when it is exact: BN in inference mode (`training_mode` absent or 0, no
used statistics outputs), the conv output read by the BN alone and not a graph output, and the
weight, bias and all four BN parameters constants. The arithmetic is done in float64 and cast back
to the weight's dtype. The fused conv writes the BN's output tensor, so downstream names do not
change. New `gs.Constant`s hold W' and b'; the original constants, which the caller's graph may
share, are never modified. Only the main graph is rewritten, not If/Loop/Scan bodies.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.names import unique_name
from onnxq.passes.core import graph_pass

__all__ = ["fuse_bn", "FUSABLE_CONV_OPS"]

log = logging.getLogger(__name__)

#: The ops a following BatchNormalization is folded into.
FUSABLE_CONV_OPS = frozenset({"Conv", "ConvTranspose"})

_DEFAULT_EPSILON = 1e-5


@graph_pass
def fuse_bn(graph: gs.Graph) -> gs.Graph:
    """Fold each BatchNormalization that follows a Conv/ConvTranspose into its weight and bias.

    Args:
        graph: The graph to rewrite (the pass works on a copy).

    Returns:
        The graph with every fusable BatchNormalization removed.
    """
    names = set(graph.tensors())
    fused = 0
    for bn in [node for node in graph.nodes if node.op == "BatchNormalization"]:
        conv = _fusable_conv(bn, graph)
        if conv is not None:
            _fold_bn_into_conv(bn, conv, names)
            fused += 1
    graph.nodes = [node for node in graph.nodes if node.op != "BatchNormalization" or node.outputs]
    if fused:
        log.debug("fused %d BatchNormalization nodes into convolutions", fused)
    return graph


def _fusable_conv(bn: gs.Node, graph: gs.Graph) -> gs.Node | None:
    """The Conv/ConvTranspose `bn` can be folded into exactly, or None."""
    if bn.attrs.get("training_mode", 0) != 0 or bn.attrs.get("spatial", 1) != 1:
        return None
    if len(bn.inputs) != 5 or not all(isinstance(t, gs.Constant) for t in bn.inputs[1:]):
        return None
    if any(_is_used(extra, graph) for extra in bn.outputs[1:]):
        return None
    conv_output = bn.inputs[0]
    if len(conv_output.inputs) != 1 or len(conv_output.outputs) != 1 or conv_output in graph.outputs:
        return None
    conv = conv_output.inputs[0]
    if conv.op not in FUSABLE_CONV_OPS or conv.domain not in (None, "", "ai.onnx"):
        return None
    weight, bias = conv.inputs[1], _bias_of(conv)
    if not isinstance(weight, gs.Constant) or not np.issubdtype(weight.dtype, np.floating):
        return None
    if len(weight.shape) < 3 or weight.shape[0] % int(conv.attrs.get("group", 1)) != 0:
        return None
    if bias is not None and not isinstance(bias, gs.Constant):
        return None
    channels = _output_channels(conv, weight)
    if any(param.values.size != channels for param in bn.inputs[1:]):
        return None
    return conv


def _is_used(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return not tensor.is_empty() and (bool(tensor.outputs) or tensor in graph.outputs)


def _bias_of(conv: gs.Node) -> gs.Tensor | None:
    if len(conv.inputs) < 3 or conv.inputs[2].is_empty():
        return None
    return conv.inputs[2]


def _output_channels(conv: gs.Node, weight: gs.Constant) -> int:
    if conv.op == "ConvTranspose":
        return int(weight.shape[1]) * int(conv.attrs.get("group", 1))
    return int(weight.shape[0])


def _channel_scale(bn: gs.Node) -> np.ndarray:
    """gamma / sqrt(var + epsilon), per output channel, in float64."""
    gamma, _, _, var = (param.values.astype(np.float64).reshape(-1) for param in bn.inputs[1:])
    epsilon = float(bn.attrs.get("epsilon", _DEFAULT_EPSILON))
    return gamma / np.sqrt(var + epsilon)


def _scaled_weight(conv: gs.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`weight` with each output channel multiplied by its entry of `scale` (float64 in and out)."""
    if conv.op == "Conv":
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    groups = int(conv.attrs.get("group", 1))
    c_in, c_out_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    grouped = weight.reshape((groups, c_in // groups, c_out_per_group) + kernel)
    grouped_scale = scale.reshape((groups, 1, c_out_per_group) + (1,) * len(kernel))
    return (grouped * grouped_scale).reshape(weight.shape)


def _fold_bn_into_conv(bn: gs.Node, conv: gs.Node, names: set[str]) -> None:
    """Give `conv` the folded weight and bias and `bn`'s output; detach `bn` from the graph."""
    weight = conv.inputs[1]
    bias = _bias_of(conv)
    beta, mean = (param.values.astype(np.float64).reshape(-1) for param in bn.inputs[2:4])
    scale = _channel_scale(bn)
    old_bias = np.zeros_like(scale) if bias is None else bias.values.astype(np.float64).reshape(-1)
    new_weight = _scaled_weight(conv, weight.values.astype(np.float64), scale)
    new_bias = (old_bias - mean) * scale + beta
    bias_dtype = weight.dtype if bias is None else bias.dtype
    prefix = conv.name or weight.name
    fused_weight = gs.Constant(unique_name(f"{prefix}_bn_fused_weight", names),
                               new_weight.astype(weight.dtype))
    fused_bias = gs.Constant(unique_name(f"{prefix}_bn_fused_bias", names), new_bias.astype(bias_dtype))
    conv.inputs[1] = fused_weight
    if len(conv.inputs) > 2:
        conv.inputs[2] = fused_bias
    else:
        conv.inputs.append(fused_bias)
    bn_output = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    conv.outputs[0] = bn_output
