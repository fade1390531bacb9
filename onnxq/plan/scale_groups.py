"""Tensors that must share one scale: a Concat's quantized inputs and its quantized output.

TensorRT moves the Q after a Concat backwards onto each input; when the input scales differ, a
DQ -> Q requantization survives between them. One scale for the whole group removes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx_graphsurgeon as gs

from onnxq.graph.query import GraphIndex
from onnxq.plan.rules import PASS_THROUGH_OPS

__all__ = ["TensorGroups", "scale_groups"]


def _quantized_downstream(tensor: gs.Tensor, edges: Mapping[str, object], index: GraphIndex) -> list[str]:
    """Quantized tensors reached from `tensor` through data-movement ops (Concat excluded)."""
    found = [tensor.name] if tensor.name in edges else []
    for node, _ in index.uses(tensor):
        if node.op in PASS_THROUGH_OPS and node.op != "Concat":
            for out in node.outputs:
                found.extend(_quantized_downstream(out, edges, index))
    return found


class TensorGroups:
    """Union-find of tensors that must share one scale and zero point.

    A group is named after its member seen first (by `union` or `find` order, or by `order` when given),
    so group names are stable across runs.
    """

    def __init__(self, order: Iterable[str] = ()) -> None:
        self._parent: dict[str, str] = {}
        self._rank: dict[str, int] = {name: i for i, name in enumerate(order)}

    def _position(self, name: str) -> int:
        return self._rank.setdefault(name, len(self._rank))

    def find(self, name: str) -> str:
        """The name of `name`'s group (`name` itself when it is alone)."""
        while self._parent.get(name, name) != name:
            name = self._parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        """Put `a` and `b` in one group."""
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            first, second = sorted((root_a, root_b), key=self._position)
            self._parent[second] = first


def scale_groups(nodes: list[gs.Node], edges: Mapping[str, object], index: GraphIndex) -> TensorGroups:
    """The Concat groups: each Concat's quantized inputs with the quantized tensors its output reaches."""
    groups = TensorGroups(edges)
    for node in nodes:
        if node.op != "Concat":
            continue
        members = _quantized_downstream(node.outputs[0], edges, index)
        if not members:
            continue
        members += [t.name for t in node.inputs if t.name in edges]
        for name in members[1:]:
            groups.union(members[0], name)
    return groups
