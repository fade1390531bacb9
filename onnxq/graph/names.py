"""Deterministic, collision-free names for tensors and nodes a pass inserts."""

from __future__ import annotations

import onnx_graphsurgeon as gs

__all__ = ["unique_name", "NameSource"]


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_<n>` for the first free n >= 2; the result is added to `taken`."""
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    taken.add(name)
    return name


class NameSource:
    """`unique_name` against every tensor and node name of a graph (and every name it handed out)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        return unique_name(base, self.taken)
