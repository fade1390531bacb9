"""Which tensors `max` calibration can reduce inside ONNX Runtime instead of reading them out whole.

Reading a feature map out of ORT costs more than computing it: ORT runs convolutions in a blocked
channel layout (NCHWc) and every graph output is first reordered to NCHW, a full read and write of the
tensor (EfficientNet-Lite0: 27 MB per sample, +50% over plain inference). The `max` method needs only
max |x|; for a tensor that cannot be negative that is max x, which ORT computes in the blocked layout
itself with GlobalMaxPool ([N, C, 1, 1] out, nothing to reorder): Lite0's 33 ReLU6 outputs measured
this way bring the cost of reading the activations from +50% to +25% of plain inference.

A tensor qualifies when its producer cannot output a negative number (the rule table below), it has
rank 3 to 5 and it is float32. GlobalMaxPool's contract is rank 3 or more, but ONNX Runtime's CPU kernel
runs ranks 3 to 5 only (rank 6 and up: "Unsupported pooling size"; measured with onnxruntime 1.31,
tests/regressions/test_in_graph_max_rank.py). Its statistics are then exact: the max of
the channel maxima is max x, `low` is 0 (the signed range always includes 0), and the number of values
comes from a full run of each input shape. Only the NaN count can differ: ORT's max (like its ReLU
and Clip) may drop a NaN where a full read would count it; a maximum that is NaN, Inf or a sentinel
makes the calibration re-read that run's tensor whole, so such values are counted as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.query import GraphIndex, constant_values, is_constant

__all__ = ["MaxReduction", "plan_in_graph_max", "POOLED_RANKS"]

#: The ranks ONNX Runtime's GlobalMaxPool runs (N, C and one to three spatial axes).
POOLED_RANKS = range(3, 6)


def _clip_is_nonnegative(node: gs.Node) -> bool:
    """Clip with a constant lower bound >= 0 (an input from opset 11, an attribute before)."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        low = node.inputs[1]
        return is_constant(low) and constant_values(low).size == 1 and float(constant_values(low)) >= 0.0
    return float(node.attrs.get("min", -np.inf)) >= 0.0


# Ops whose output is never negative (NaN aside), for any input.
NONNEGATIVE: dict[str, Callable[[gs.Node], bool]] = {
    "Relu": lambda node: True,
    "Clip": _clip_is_nonnegative,
    "Sigmoid": lambda node: True,
    "HardSigmoid": lambda node: True,  # max(0, min(1, alpha x + beta))
    "Softplus": lambda node: True,
    "Abs": lambda node: True,
}


@dataclass(frozen=True)
class MaxReduction:
    """Whether `max` calibration reads `tensor_name`'s channel maxima (in_graph) or the whole tensor."""

    tensor_name: str
    in_graph: bool
    reason: str


def plan_in_graph_max(graph: gs.Graph, tensor_names: Iterable[str]) -> tuple[MaxReduction, ...]:
    """One decision, with its reason, per named tensor of `graph`."""
    index = GraphIndex.build(graph)
    tensors = graph.tensors()
    return tuple(_decide(index, tensors[name]) for name in dict.fromkeys(tensor_names))


def _decide(index: GraphIndex, tensor: gs.Tensor) -> MaxReduction:
    def whole(reason: str) -> MaxReduction:
        return MaxReduction(tensor.name, False, reason)

    producer = index.producer(tensor)
    if producer is None:
        return whole("a graph input: read from the feed")
    if index.is_graph_output(tensor):
        return whole("already a graph output")
    rule = NONNEGATIVE.get(producer.op)
    if rule is None or not rule(producer):
        return whole(f"{producer.op} '{producer.name}' can output negative values: max |x| needs the whole tensor")
    if tensor.shape is None or len(tensor.shape) not in POOLED_RANKS:
        rank = "unknown" if tensor.shape is None else str(len(tensor.shape))
        return whole(f"rank {rank}: ONNX Runtime's GlobalMaxPool runs ranks 3 to 5 only")
    if all(dim == 1 for dim in tensor.shape[2:]):
        return whole("1x1 spatial (e.g. squeeze-and-excitation): as cheap to read whole")
    if tensor.dtype is not None and np.dtype(tensor.dtype) != np.float32:
        return whole(f"{np.dtype(tensor.dtype).name}: only float32 is reduced")
    return MaxReduction(tensor.name, True, f"{producer.op} output >= 0: max x per channel in ORT (GlobalMaxPool)")
