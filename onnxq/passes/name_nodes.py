"""Give every node a unique name, so plans, reports and exclusions can refer to nodes by name.

Unnamed nodes become `<OpType>_<n>`; a repeated name gets `_<n>` appended. Named nodes keep their names.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxq.passes.core import graph_pass

__all__ = ["name_nodes"]


@graph_pass
def name_nodes(graph: gs.Graph) -> gs.Graph:
    """Name unnamed nodes and de-duplicate repeated names in the main graph."""
    taken: set[str] = set()
    counter = 0
    for node in graph.nodes:
        name = node.name
        while not name or name in taken:
            counter += 1
            name = f"{node.name or node.op}_{counter}"
        node.name = name
        taken.add(name)
    return graph
