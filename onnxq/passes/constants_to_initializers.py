"""Turn `Constant` nodes into initializers, in the main graph and in If/Loop/Scan bodies.

Rewrite: `Constant(value=T) -> y` becomes the initializer `y = T` (a `gs.Constant` named like the
node's output) and the node disappears, so weights stored as Constant nodes reach their Conv, Gemm or
MatMul as `gs.Constant` inputs. The attributes `value`, `value_float(s)` and `value_int(s)` are
lowered, with the dtypes ONNX gives them (float32, int64). `sparse_value` and `value_string(s)` are
left as nodes, and so is a Constant whose output is an output of its own (sub)graph (ONNX Runtime
and TensorRT handle an initializer as a graph output unevenly).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.passes.core import graph_pass

__all__ = ["constants_to_initializers"]

log = logging.getLogger(__name__)

# Constant's attributes that hold a dense value, with the dtype ONNX assigns to the plain-number ones.
_LOWERABLE_ATTRIBUTES: dict[str, Any] = {
    "value": None,
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


@graph_pass
def constants_to_initializers(graph: gs.Graph) -> gs.Graph:
    """Replace every lowerable `Constant` node by a `gs.Constant` tensor of the same name.

    Args:
        graph: The graph to rewrite (the pass works on a copy).

    Returns:
        The graph without lowerable Constant nodes, in it or in any of its subgraphs.
    """
    lowered = _lower_constant_nodes(graph)
    if lowered:
        log.debug("lowered %d Constant nodes to initializers", lowered)
    return graph


def _lower_constant_nodes(graph: gs.Graph) -> int:
    """Lower the Constant nodes of `graph` and of its subgraphs, in place; return how many."""
    lowered = 0
    for node in graph.nodes:
        for subgraph in node.subgraphs():
            lowered += _lower_constant_nodes(subgraph)
    graph_outputs = {id(tensor) for tensor in graph.outputs}
    kept_nodes = []
    for node in graph.nodes:
        if node.op == "Constant" and id(node.outputs[0]) not in graph_outputs:
            values = _constant_value(node)
            if values is not None:
                output = node.outputs[0]
                output.inputs.clear()
                output.to_constant(values)
                lowered += 1
                continue
        kept_nodes.append(node)
    graph.nodes = kept_nodes
    return lowered


def _constant_value(node: gs.Node) -> Any:
    """The values (an array or gs's lazily loaded values) a Constant node produces, or None."""
    if len(node.outputs) != 1 or len(node.attrs) != 1 or node.domain not in (None, "", "ai.onnx"):
        return None
    name, attribute = next(iter(node.attrs.items()))
    if name not in _LOWERABLE_ATTRIBUTES or isinstance(attribute, gs.Node.AttributeRef):
        return None
    if name == "value":
        if not isinstance(attribute, gs.Constant):
            return None
        # `_values` may be lazily loaded (as gs's own Constant.copy hands it on); passing it along
        # avoids decoding the weight here. Its dtype is already the ONNX one (ml_dtypes for bfloat16).
        return attribute._values
    return np.asarray(attribute, dtype=_LOWERABLE_ATTRIBUTES[name])
