"""Read-only questions about an onnx-graphsurgeon graph, with types."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["GraphIndex", "is_constant", "is_float", "constant_values"]

FLOAT_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)})


def is_constant(tensor: gs.Tensor) -> bool:
    """True for initializers (gs.Constant)."""
    return isinstance(tensor, gs.Constant)


def is_float(tensor: gs.Tensor) -> bool:
    """True when the tensor is a floating-point tensor, or its type is unknown."""
    dtype = tensor.dtype
    if dtype is None:
        return True
    try:
        return np.dtype(dtype) in FLOAT_DTYPES
    except TypeError:
        return False


def constant_values(tensor: gs.Tensor) -> np.ndarray:
    """The values of a gs.Constant (loading lazily stored ones)."""
    assert isinstance(tensor, gs.Constant), tensor.name
    return np.asarray(tensor.values)


@dataclass(frozen=True)
class GraphIndex:
    """Producer and consumer lookups for the main graph, computed once."""

    graph: gs.Graph
    producers: dict[str, gs.Node]
    consumers: dict[str, tuple[tuple[gs.Node, int], ...]]
    output_names: frozenset[str]
    input_names: frozenset[str]
    node_order: dict[str, int]

    @classmethod
    def build(cls, graph: gs.Graph) -> GraphIndex:
        producers: dict[str, gs.Node] = {}
        consumers: dict[str, list[tuple[gs.Node, int]]] = {}
        for node in graph.nodes:
            for tensor in node.outputs:
                producers[tensor.name] = node
            for index, tensor in enumerate(node.inputs):
                if tensor.name:
                    consumers.setdefault(tensor.name, []).append((node, index))
        return cls(
            graph=graph,
            producers=producers,
            consumers={name: tuple(uses) for name, uses in consumers.items()},
            output_names=frozenset(t.name for t in graph.outputs),
            input_names=frozenset(t.name for t in graph.inputs),
            node_order={node.name: i for i, node in enumerate(graph.nodes)},
        )

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        return self.producers.get(tensor.name)

    def uses(self, tensor: gs.Tensor) -> tuple[tuple[gs.Node, int], ...]:
        return self.consumers.get(tensor.name, ())

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return tensor.name in self.output_names

    def variable_inputs(self, node: gs.Node) -> Iterator[tuple[int, gs.Tensor]]:
        """(index, tensor) of the inputs that are not constants and not empty optional inputs."""
        for index, tensor in enumerate(node.inputs):
            if tensor.name and not is_constant(tensor):
                yield index, tensor
