"""Make intermediate tensors graph outputs so ONNX Runtime returns them during calibration.

    x ─▶ Conv ─▶ t ─▶ Relu ─▶ y          outputs: (y)
    becomes the same graph with          outputs: (y, t)
Graph inputs are not exposed (the caller already has them); tensors without a known type are declared
float32, the only type the planner quantizes when shape inference could not tell.

`expose_channel_max` hands out a per-channel max instead of the whole tensor, for `max` calibration of
non-negative feature maps (see calib/in_graph_max.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.passes.core import graph_pass

__all__ = ["expose_tensors", "expose_channel_max"]


@graph_pass
def expose_tensors(graph: gs.Graph, tensor_names: Iterable[str]) -> gs.Graph:
    """Append the named tensors to the graph outputs (skipping graph inputs and existing outputs)."""
    tensors = graph.tensors()
    present = {t.name for t in graph.outputs} | {t.name for t in graph.inputs}
    for name in dict.fromkeys(tensor_names):
        if name in present:
            continue
        tensor = tensors[name]
        if tensor.dtype is None:
            tensor.dtype = np.float32
        graph.outputs.append(tensor)
        present.add(name)
    return graph


@graph_pass
def expose_channel_max(graph: gs.Graph, outputs: Mapping[str, str]) -> gs.Graph:
    """For each `tensor -> output` of `outputs`, make `GlobalMaxPool(tensor)` a graph output named `output`.

        x ─▶ Conv ─▶ t ─▶ Relu ─▶ y       outputs: (y)
        becomes                 └▶ GlobalMaxPool ─▶ t_max [N, C, 1, ...]   outputs: (y, t_max)
    Each tensor must have rank 3 to 5 (`onnxq.calib.in_graph_max.POOLED_RANKS`); output names must be free.
    """
    tensors = graph.tensors()
    for name, output_name in outputs.items():
        if output_name in tensors:
            raise ValueError(f"expose_channel_max: '{output_name}' is already a tensor of the graph")
        maxima = gs.Variable(output_name, dtype=np.float32)
        graph.nodes.append(gs.Node("GlobalMaxPool", name=output_name, inputs=[tensors[name]], outputs=[maxima]))
        graph.outputs.append(maxima)
    return graph
