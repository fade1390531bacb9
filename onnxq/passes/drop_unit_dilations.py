"""Drop an AveragePool's `dilations` attribute when every dilation is 1 (the default).

    AveragePool(dilations=[1, 1], ...)    becomes    AveragePool(...)

Opset 19 gave AveragePool `dilations` (ONNX operator docs, AveragePool-19: "If not present, the dilation
defaults to 1"), and exporters write the default out. ONNX Runtime fuses DQ -> AveragePool -> Q into
QLinearAveragePool and copies the attributes over, and QLinearAveragePool has no `dilations`: the
optimized model is invalid even for all-1 values. Without the attribute the pool computes the same and
can stay quantized; a real dilation keeps it float (`onnxq.plan.rules.ORT_FUSION_BREAKS`).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxq.passes.core import graph_pass

__all__ = ["drop_unit_dilations"]


@graph_pass
def drop_unit_dilations(graph: gs.Graph) -> gs.Graph:
    """Every AveragePool whose dilations are all 1 loses the attribute."""
    for node in graph.nodes:
        if node.op == "AveragePool" and all(int(d) == 1 for d in node.attrs.get("dilations", (2,))):
            del node.attrs["dilations"]
    return graph
