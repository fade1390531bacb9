"""Make intermediate tensors graph outputs so ONNX Runtime returns them during calibration.

    x ─▶ Conv ─▶ t ─▶ Relu ─▶ y          outputs: (y)
    becomes the same graph with          outputs: (y, t)
Graph inputs are not exposed (the caller already has them); tensors without a known type are declared
float32, the only type the planner quantizes when shape inference could not tell.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from .core import graph_pass

__all__ = ["expose_tensors"]


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
