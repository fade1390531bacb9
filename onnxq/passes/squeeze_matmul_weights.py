"""Give a MatMul's constant weight of shape [1, ..., 1, K, N] its 2-D form [K, N].

    x [..., M, K] ─▶ MatMul ◀─ W [1, 1, K, N]      becomes      x ─▶ MatMul ◀─ W [K, N]

Exporters leave such weights behind (an Unsqueeze of a Linear weight, folded to a constant). ONNX
Runtime's integer MatMuls (MatMulIntegerToFloat, QLinearMatMul) take a per-column weight scale only for
a 2-D weight, so the planner quantizes a MatMul weight per channel at rank 2 only (`onnxq.plan.rules`);
in its 2-D form this one can be. The two compute the same: MatMul broadcasts the leading 1s of W against
x's batch axes (numpy matmul semantics, ONNX MatMul docs), which already hold at least as many axes when
x's rank is at least W's. A weight whose rank exceeds x's (its 1s would add output axes), whose leading
axes are not all 1 (a batch of weights), or whose rank x does not declare, is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.names import NameSource
from onnxq.passes.core import graph_pass

__all__ = ["squeeze_matmul_weights"]


@graph_pass
def squeeze_matmul_weights(graph: gs.Graph) -> gs.Graph:
    """Every MatMul weight [1, ..., 1, K, N] read by an input of rank >= its own becomes a [K, N] constant
    (a new one: the weight's other readers keep theirs)."""
    names = NameSource(graph)
    for node in graph.nodes:
        if node.op != "MatMul" or len(node.inputs) < 2:
            continue
        x, weight = node.inputs[0], node.inputs[1]
        if not isinstance(weight, gs.Constant) or x.shape is None:
            continue
        shape = tuple(weight.shape)
        if len(shape) < 3 or any(dim != 1 for dim in shape[:-2]) or len(x.shape) < len(shape):
            continue
        node.inputs[1] = gs.Constant(names(f"{weight.name}_2d"), np.asarray(weight.values).reshape(shape[-2:]))
    return graph
