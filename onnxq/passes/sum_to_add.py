"""Rewrite a Sum of two inputs as an Add.

    a ─┐                         a ─┐
       ├▶ Sum ─▶ y    becomes       ├▶ Add ─▶ y
    b ─┘                         b ─┘

Caffe2-era exporters (the onnx ShuffleNet, for one) write residual connections as Sum. The two ops
compute the same thing with the same broadcasting, but the quantization rules are written for Add:
ONNX Runtime has an integer QLinearAdd and no integer Sum, and residual placement for TensorRT looks
for Add. A Sum of one input or of three or more is left alone.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxq.passes.core import graph_pass

__all__ = ["sum_to_add"]


@graph_pass
def sum_to_add(graph: gs.Graph) -> gs.Graph:
    """Every two-input Sum becomes an Add with the same name, inputs and output."""
    for node in graph.nodes:
        if node.op == "Sum" and len(node.inputs) == 2:
            node.op = "Add"
    return graph
