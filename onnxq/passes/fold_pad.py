"""Fold a zero Pad into the Conv it feeds.

    x ─▶ Pad(pads P, constant 0) ─▶ Conv(pads C) ─▶ y     becomes     x ─▶ Conv(pads C + P_spatial) ─▶ y

Exports of "same" padding (EfficientNet, TensorFlow-style models) put a Pad before each Conv. Left in
place, it sits between the activation's Q/DQ and the Conv: TensorRT has to move the DQ across it and
ONNX Runtime's CPU provider runs it in float between a DequantizeLinear and a QuantizeLinear. Conv's
own `pads` attribute (begin values per spatial axis, then end values) does the same thing for free.
Folded only when the Pad is constant-mode with value 0, pads nothing on the batch and channel axes,
and every consumer of its output is a Conv with explicit padding (auto_pad NOTSET).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.passes.core import graph_pass

__all__ = ["fold_pad"]


def _constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    if tensor is None or not tensor.name:
        return None
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _spatial_pads(pad: gs.Node) -> np.ndarray | None:
    """[begin..., end...] over the spatial axes, or None if this Pad cannot be folded."""
    if pad.attrs.get("mode", "constant") != "constant" or len(pad.inputs) > 3:  # opset 18 `axes` input
        return None
    pads = _constant(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if pads is None and "pads" in pad.attrs:
        pads = np.asarray(pad.attrs["pads"])
    value = _constant(pad.inputs[2]) if len(pad.inputs) > 2 else None
    if pads is None or (value is not None and np.any(value != 0)) or pad.attrs.get("value", 0.0) != 0.0:
        return None
    rank = pads.size // 2
    begin, end = pads[:rank], pads[rank:]
    if rank < 3 or np.any(begin[:2] != 0) or np.any(end[:2] != 0) or np.any(pads < 0):
        return None
    return np.concatenate([begin[2:], end[2:]]).astype(np.int64)


def _foldable_into(consumer: gs.Node) -> bool:
    return consumer.op == "Conv" and consumer.attrs.get("auto_pad", "NOTSET") == "NOTSET"


@graph_pass
def fold_pad(graph: gs.Graph) -> gs.Graph:
    """Fold every foldable zero Pad into the Convs that read it."""
    for pad in [node for node in graph.nodes if node.op == "Pad"]:
        padded = pad.outputs[0]
        consumers = list(padded.outputs)
        extra = _spatial_pads(pad)
        if extra is None or not consumers or padded in graph.outputs or not all(map(_foldable_into, consumers)):
            continue
        for conv in consumers:
            current = np.asarray(conv.attrs.get("pads", [0] * extra.size), dtype=np.int64)
            conv.attrs["pads"] = [int(v) for v in current + extra]
            conv.inputs[conv.inputs.index(padded)] = pad.inputs[0]
        pad.outputs.clear()
    return graph
