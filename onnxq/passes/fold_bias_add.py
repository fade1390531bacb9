"""Fold an Add of a per-channel constant into the bias of the Conv before it.

    x ─▶ Conv(W, b) ─▶ Add(c) ─▶ y     becomes     x ─▶ Conv(W, b + c) ─▶ y

Some exporters (PaddlePaddle, older TensorFlow converters) write the bias as a separate Add of a
[1, K, 1, 1] (or [K, 1, 1]) constant. Left alone, that Add is a float op between a Conv and whatever
follows, which costs a dequantize/quantize round trip on integer runtimes. Folded when the Conv's
output has the Add as its only reader and the constant broadcasts along the output-channel axis only.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.passes.core import graph_pass

__all__ = ["fold_bias_add"]


def _per_channel(values: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`values` as a length-`channels` vector if it only varies along axis 1 of a rank-`rank` output."""
    if values.ndim > rank or values.size not in (1, channels):
        return None
    shape = (1,) * (rank - values.ndim) + values.shape
    if any(dim != 1 for axis, dim in enumerate(shape) if axis != 1):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,)).copy()


@graph_pass
def fold_bias_add(graph: gs.Graph) -> gs.Graph:
    """Fold every foldable constant Add into the preceding Conv's bias."""
    for add in [node for node in graph.nodes if node.op == "Add"]:
        constants = [t for t in add.inputs if isinstance(t, gs.Constant)]
        variables = [t for t in add.inputs if not isinstance(t, gs.Constant)]
        if len(constants) != 1 or len(variables) != 1 or len(variables[0].inputs) != 1:
            continue
        conv = variables[0].inputs[0]
        conv_out = variables[0]
        if conv.op != "Conv" or len(conv_out.outputs) != 1 or conv_out in graph.outputs:
            continue
        weight = conv.inputs[1]
        if not isinstance(weight, gs.Constant):
            continue
        channels, rank = weight.shape[0], len(weight.shape)
        extra = _per_channel(np.asarray(constants[0].values), channels, rank)
        if extra is None:
            continue
        old_bias = np.asarray(conv.inputs[2].values) if len(conv.inputs) > 2 and conv.inputs[2].name else 0.0
        new_bias = (np.asarray(old_bias, np.float64) + extra).astype(np.asarray(weight.values).dtype)
        bias = gs.Constant(f"{conv.name}_bias_folded", new_bias)
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias
        else:
            conv.inputs.append(bias)
        conv.outputs = [add.outputs[0]]
        add.outputs.clear()
    return graph
