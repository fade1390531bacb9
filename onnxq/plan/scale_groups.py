"""Tensors that must share one scale: a Concat's quantized inputs and its quantized output.

TensorRT moves the Q after a Concat backwards onto each input; when the input scales differ, a
DQ -> Q requantization survives between them. One scale for the whole group removes it.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_graphsurgeon as gs

from onnxq.graph.query import GraphIndex
from onnxq.plan.rules import PASS_THROUGH_OPS

__all__ = ["scale_groups"]


def _quantized_downstream(tensor: gs.Tensor, edges: Mapping[str, object], index: GraphIndex) -> list[str]:
    """Quantized tensors reached from `tensor` through data-movement ops (Concat excluded)."""
    found = [tensor.name] if tensor.name in edges else []
    for node, _ in index.uses(tensor):
        if node.op in PASS_THROUGH_OPS and node.op != "Concat":
            for out in node.outputs:
                found.extend(_quantized_downstream(out, edges, index))
    return found


def scale_groups(nodes: list[gs.Node], edges: Mapping[str, object], index: GraphIndex) -> dict[str, str]:
    """Map each grouped tensor name to its group's name (the first member in graph order)."""
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    def union(a: str, b: str) -> None:
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b, key=order)] = min(root_a, root_b, key=order)

    position = {name: i for i, name in enumerate(edges)}

    def order(name: str) -> int:
        return position.get(name, len(position))

    for node in nodes:
        if node.op != "Concat":
            continue
        members = _quantized_downstream(node.outputs[0], edges, index)
        if not members:
            continue
        members += [t.name for t in node.inputs if t.name in edges]
        for name in members[1:]:
            union(members[0], name)
    return {name: find(name) for name in edges if find(name) != name or name in parent.values()}
