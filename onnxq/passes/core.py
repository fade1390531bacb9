"""What a graph pass is, and how passes are chained.

A pass is any function `Graph -> Graph`. `graph_pass` wraps one so that it works on a copy of its
input (the caller's graph is never changed; weights are shared, not copied) and returns a graph that
is cleaned up and topologically sorted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import onnx_graphsurgeon as gs

__all__ = ["GraphPass", "graph_pass", "run"]

GraphPass = Callable[[gs.Graph], gs.Graph]


def graph_pass(fn: Callable[..., gs.Graph]) -> Callable[..., gs.Graph]:
    """Make `fn(graph, **options)` a pass: copy in, `cleanup().toposort()` out."""

    @functools.wraps(fn)
    def wrapper(graph: gs.Graph, *args: Any, **kwargs: Any) -> gs.Graph:
        out = fn(graph.copy(), *args, **kwargs)
        return out.cleanup().toposort()

    return wrapper


def run(graph: gs.Graph, passes: Iterable[GraphPass]) -> gs.Graph:
    """Apply `passes` in order and return the last graph."""
    for graph_pass_fn in passes:
        graph = graph_pass_fn(graph)
    return graph
