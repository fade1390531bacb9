"""Fuse the element-wise spellings of hard-swish and hard-sigmoid into single ops.

Exporters of MobileNetV3-style models (PaddlePaddle, older PyTorch opsets) write
    hard_sigmoid(x) = Clip(x + 3, 0, 6) / 6          (or * 1/6)
    hard_swish(x)   = x * Clip(x + 3, 0, 6) / 6      (in either order of the Mul and the Div)
as three or four element-wise nodes, each a full pass over the tensor. In the PP-OCR classifier those
chains are ~40% of ONNX Runtime's float CPU time, and in a quantized model every one of them runs in
float between a DequantizeLinear and a QuantizeLinear. The ONNX ops compute the same functions:
HardSigmoid(alpha, beta) = max(0, min(1, alpha * x + beta)) with alpha = 1/6, beta = 1/2, and
HardSwish(x) = x * HardSigmoid(x) with those constants (ONNX operator docs, HardSigmoid-6 and
HardSwish-14). This pass rewrites

    x ─▶ Add(3) ─▶ Clip(0, 6) ─▶ Div(6) ─▶ g                  g = HardSigmoid(x)
    x ─▶ Mul(x, g)                                            ─▶ HardSwish(x)   (opset >= 14)
    x ─▶ Add(3) ─▶ Clip(0, 6) ─▶ Mul(x, ·) ─▶ Div(6)          ─▶ HardSwish(x)   (opset >= 14)

HardSwish needs opset 14: a graph below it is upgraded when it holds a hard-swish chain (the version
converter; if it cannot convert the graph, hard-swish becomes x * HardSigmoid(x) instead). Only
chains whose intermediate tensors nothing else reads (and that are no graph outputs) are rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.errors import ModelError
from onnxq.passes.core import graph_pass
from onnxq.passes.upgrade_opset import upgrade_graph_opset

__all__ = ["fuse_hardswish", "HARDSWISH_OPSET"]

HARDSWISH_OPSET = 14
_ALPHA, _BETA = 1.0 / 6.0, 0.5


def _scalar(tensor: gs.Tensor | None) -> float | None:
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    if values.size != 1 or values.dtype.kind != "f":
        return None
    return float(values.reshape(()))


def _close(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= 1e-6 * max(1.0, abs(expected))


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    return node if node is not None and node.op == op else None


def _private(tensor: gs.Tensor, graph_outputs: set[str]) -> bool:
    """Read by exactly one node and not a graph output: safe to remove with its producer."""
    return len(tensor.outputs) == 1 and tensor.name not in graph_outputs


def _other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    if len(node.inputs) != 2:
        return None
    first, second = node.inputs
    return second if first is tensor else first if second is tensor else None


def _clip_0_6_of_x_plus_3(tensor: gs.Tensor, outs: set[str]) -> gs.Tensor | None:
    """x when `tensor` = Clip(x + 3, 0, 6) through private intermediates, else None."""
    clip = _producer(tensor, "Clip")
    if clip is None:
        return None
    low = _scalar(clip.inputs[1]) if len(clip.inputs) > 1 and clip.inputs[1].name else clip.attrs.get("min")
    high = _scalar(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2].name else clip.attrs.get("max")
    if not (_close(low, 0.0) and _close(high, 6.0)) or not _private(clip.inputs[0], outs):
        return None
    add = _producer(clip.inputs[0], "Add")
    if add is None or len(add.inputs) != 2:
        return None
    for x, three in (add.inputs, reversed(add.inputs)):
        if _close(_scalar(three), 3.0) and not isinstance(x, gs.Constant):
            return x
    return None


def _divided_by_6(node: gs.Node) -> gs.Tensor | None:
    """The dividend when `node` is Div(t, 6) or Mul(t, 1/6) (either order), else None."""
    if node.op == "Div" and len(node.inputs) == 2 and _close(_scalar(node.inputs[1]), 6.0):
        return node.inputs[0]
    if node.op == "Mul" and len(node.inputs) == 2:
        for t, sixth in (node.inputs, reversed(node.inputs)):
            if _close(_scalar(sixth), _ALPHA):
                return t
    return None


def _hard_sigmoid(graph: gs.Graph, x: gs.Tensor, out: gs.Tensor, name: str) -> gs.Node:
    node = gs.Node("HardSigmoid", name, {"alpha": _ALPHA, "beta": _BETA}, inputs=[x], outputs=[out])
    graph.nodes.append(node)
    return node


def _replace(graph: gs.Graph, last: gs.Node, op: str, x: gs.Tensor) -> None:
    """Make `last`'s output the output of a new `op` node on x; the old chain is left for cleanup."""
    out = last.outputs[0]
    last.outputs.clear()
    if op == "HardSigmoid":
        _hard_sigmoid(graph, x, out, last.name)
    elif graph.opset >= HARDSWISH_OPSET:
        graph.nodes.append(gs.Node("HardSwish", last.name, inputs=[x], outputs=[out]))
    else:
        gate = gs.Variable(f"{out.name}_hard_sigmoid", dtype=out.dtype, shape=out.shape)
        _hard_sigmoid(graph, x, gate, f"{last.name}_HardSigmoid")
        graph.nodes.append(gs.Node("Mul", last.name, inputs=[x, gate], outputs=[out]))


def _hard_sigmoid_input(gate: gs.Tensor, outs: set[str]) -> gs.Tensor | None:
    """x when `gate` = HardSigmoid(x) with alpha 1/6, beta 1/2, or its Clip/Div spelling; else None."""
    producer = gate.inputs[0] if len(gate.inputs) == 1 else None
    if producer is None:
        return None
    if producer.op == "HardSigmoid":
        constants_match = (_close(producer.attrs.get("alpha", 0.2), _ALPHA)
                           and _close(producer.attrs.get("beta", 0.5), _BETA))
        return producer.inputs[0] if constants_match else None
    dividend = _divided_by_6(producer)
    return _clip_0_6_of_x_plus_3(dividend, outs) if dividend is not None and _private(dividend, outs) else None


def _match(node: gs.Node, outs: set[str], opset: int) -> tuple[str, gs.Tensor] | None:
    """("HardSigmoid" | "HardSwish", x) when `node` ends one of the chains in the module docstring."""
    dividend = _divided_by_6(node)
    if dividend is not None and _private(dividend, outs):
        x = _clip_0_6_of_x_plus_3(dividend, outs)
        if x is not None:
            return "HardSigmoid", x
        inner = _producer(dividend, "Mul")
        if inner is not None and len(inner.inputs) == 2:
            for gate_input in inner.inputs:
                x = _clip_0_6_of_x_plus_3(gate_input, outs) if _private(gate_input, outs) else None
                if x is not None and _other_input(inner, gate_input) is x:
                    return "HardSwish", x
    if node.op == "Mul" and len(node.inputs) == 2 and opset >= HARDSWISH_OPSET:
        for gate in node.inputs:
            x = _hard_sigmoid_input(gate, outs) if _private(gate, outs) else None
            if x is not None and _other_input(node, gate) is x:
                return "HardSwish", x
    return None


def _has_hardswish_chain(graph: gs.Graph) -> bool:
    outs = {t.name for t in graph.outputs}
    found = (_match(node, outs, HARDSWISH_OPSET) for node in graph.nodes)
    return any(match is not None and match[0] == "HardSwish" for match in found)


@graph_pass
def fuse_hardswish(graph: gs.Graph) -> gs.Graph:
    """Rewrite every hard-sigmoid / hard-swish chain into one HardSigmoid / HardSwish node."""
    if graph.opset < HARDSWISH_OPSET and _has_hardswish_chain(graph):
        try:
            graph = upgrade_graph_opset(graph, HARDSWISH_OPSET)
        except ModelError:
            pass  # hard-swish becomes x * HardSigmoid(x) below
    outs = {t.name for t in graph.outputs}
    # In graph order: a HardSigmoid made from a Clip/Div chain is in place when the Mul that reads it
    # (x * HardSigmoid(x): hard-swish) comes up later in the same sweep.
    for node in list(graph.nodes):
        found = _match(node, outs, graph.opset) if node.outputs else None
        if found is not None:
            _replace(graph, node, *found)
    return graph.cleanup().toposort()
