"""Which input of an element-wise Add is the residual (skip) input TensorRT wants quantized.

TensorRT fuses `Add(conv_branch, skip)` into the epilogue of the Conv that ends `conv_branch`; the fused
layer emits INT8 only if `skip` is INT8, so the skip input gets Q/DQ and the Conv branch must not.

    skip ──┬───────────────────────┐
           └─ Conv ─ BN ─ Relu ─ Conv ─ Add ─▶        the branch ending in a Conv is the longer
                                      ▲               path from the two inputs' common ancestor
"""

from __future__ import annotations

from collections import deque

import onnx_graphsurgeon as gs

from onnxq.graph.query import GraphIndex, is_constant
from onnxq.plan.rules import EPILOGUE_OPS

__all__ = ["residual_skip_input", "fused_producer", "feeds_softmax", "is_silu_mul"]

_MAX_ANCESTRY = 200
_MASK_PATH_OPS = frozenset({"Add", "Mul", "Div", "Sub", "Reshape", "Transpose", "Cast", "Where", "Identity"})


def is_silu_mul(node: gs.Node, index: GraphIndex) -> gs.Tensor | None:
    """For Mul(x, Sigmoid(x)) return x (SiLU/Swish is fused as one epilogue)."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    for x, gate in ((a, b), (b, a)):
        gate_producer = index.producer(gate)
        if gate_producer is not None and gate_producer.op == "Sigmoid" and gate_producer.inputs[0] is x:
            return x
    return None


def _epilogue_input(node: gs.Node, index: GraphIndex) -> gs.Tensor | None:
    """The tensor an epilogue op continues from, or None if `node` is not a fusible epilogue op."""
    if node.op not in EPILOGUE_OPS:
        return None
    variables = [t for _, t in index.variable_inputs(node)]
    if len(variables) != 1:
        return None
    if node.op in ("Add", "Sub", "Mul", "Div") and not any(is_constant(t) for t in node.inputs):
        return None
    return variables[0]


def fused_producer(tensor: gs.Tensor, index: GraphIndex, weighted: frozenset[str]) -> gs.Node | None:
    """The weighted node (by name in `weighted`) whose epilogue produces `tensor`, or None.

    Walks back through epilogue ops (bias Add, BN, ReLU/Clip, SiLU, ...); every tensor on the way must
    have a single consumer, or TensorRT could not fuse the chain into one kernel.
    """
    current, check_uses = tensor, True
    for _ in range(16):
        node = index.producer(current)
        if node is None or (check_uses and len(index.uses(current)) != 1):
            return None
        if node.name in weighted:
            return node
        silu_input = is_silu_mul(node, index)
        if silu_input is not None:
            # x feeds both Sigmoid and Mul inside the SiLU; that is still one fused epilogue.
            current, check_uses = silu_input, False
            continue
        upstream = _epilogue_input(node, index)
        if upstream is None:
            return None
        current, check_uses = upstream, True
    return None


def feeds_softmax(tensor: gs.Tensor, index: GraphIndex, depth: int = 4) -> bool:
    """True if `tensor` reaches a Softmax through at most `depth` data-movement or scaling ops."""
    for node, _ in index.uses(tensor):
        if node.op == "Softmax":
            return True
        if depth > 0 and node.op in _MASK_PATH_OPS and any(feeds_softmax(t, index, depth - 1) for t in node.outputs):
            return True
    return False


def _ancestor_distances(tensor: gs.Tensor, index: GraphIndex) -> dict[str, int]:
    """Node name -> number of nodes between `tensor` and that ancestor (its producer is at 0)."""
    distances: dict[str, int] = {}
    queue: deque[tuple[gs.Tensor, int]] = deque([(tensor, 0)])
    while queue and len(distances) < _MAX_ANCESTRY:
        current, depth = queue.popleft()
        node = index.producer(current)
        if node is None or node.name in distances:
            continue
        distances[node.name] = depth
        for _, upstream in index.variable_inputs(node):
            queue.append((upstream, depth + 1))
    return distances


def _longer_branch(node: gs.Node, index: GraphIndex) -> int | None:
    """Index (0/1) of the Add input on the longer path from the inputs' nearest common ancestor."""
    first = _ancestor_distances(node.inputs[0], index)
    second = _ancestor_distances(node.inputs[1], index)
    common = set(first) & set(second)
    if not common:
        return None
    nearest = min(common, key=lambda name: (first[name] + second[name], name))
    if first[nearest] == second[nearest]:
        return None
    return 0 if first[nearest] > second[nearest] else 1


def residual_skip_input(node: gs.Node, index: GraphIndex, weighted: frozenset[str]) -> tuple[int | None, str]:
    """Decide the skip input of an Add: (input index or None, reason)."""
    if node.op != "Add" or len(node.inputs) != 2:
        return None, "not a two-input Add"
    if any(is_constant(t) for t in node.inputs):
        return None, "Add of a constant (a bias or an offset): element-wise, kept float"
    if feeds_softmax(node.outputs[0], index):
        return None, "attention-mask Add (feeds Softmax): mask arithmetic stays float"
    branches = [fused_producer(t, index, weighted) for t in node.inputs]
    if branches[0] is None and branches[1] is None:
        return None, "element-wise Add with no quantized Conv/GEMM branch: not fused by TensorRT, kept float"
    if branches[0] is not None and branches[1] is not None:
        longer = _longer_branch(node, index)
        if longer is None:
            return None, "both inputs are Conv branches of equal depth: no residual input to pick, kept float"
        conv_branch = longer
    else:
        conv_branch = 0 if branches[0] is not None else 1
    skip = 1 - conv_branch
    producer = branches[conv_branch]
    assert producer is not None
    reason = f"residual Add fused into {producer.name}: Q/DQ on the skip input only"
    return skip, reason
