"""Measure the bias corrections of all layers, in order, in one ONNX Runtime pass.

Sequential bias correction (Nagel et al., ICCV 2019, section 4.2, empirical form) measures each layer's
mean output shift in the quantized model after every layer before it has been corrected, so a layer also
absorbs what upstream errors do to its mean after passing through non-linearities (the mean of
hard-swish(y + noise) is not hard-swish of the mean). Done layer by layer that is one pass over the data
per layer. Here it is one pass: a model runs the float graph and the plan's Q/DQ graph side by side on the
same batch, and behind every corrected layer of the Q/DQ graph

    ỹ  ─▶  ỹ + mean(y - ỹ)  ─▶  the layer's readers      (mean over the batch and all axes but the channel's)

so each later layer sees its input as corrected by the same batch; each correction is also an output.
Over several batches the corrections are averaged, weighted by the batch's samples: one batch holding
every sample gives exactly the layer-by-layer result; smaller batches, one per batch's own data.

The Q/DQ graph's tensors are renamed (it shares only the graph inputs with the float graph); its
DequantizeLinear nodes of constants (INT8 weights, INT32 biases) are folded into the float constants they
compute, so ONNX Runtime lays the weights out for its fast float kernels (a weight computed at run time
keeps a Conv on its slow generic path) without changing a value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

import onnxq.mapped_weights as mapped_weights
from onnxq.data.signature import Feed, ModelSignature
from onnxq.data.sources import CalibSource
from onnxq.graph.names import unique_name
from onnxq.runtime.session import open_session
from onnxq.steps.bias_shift import LinearLayer

__all__ = ["ShiftModel", "Shifts", "sequential_shift_model", "measure"]

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class ShiftModel:
    """The side-by-side model and, per layer (node name), the output holding its correction."""

    model: onnx.ModelProto
    outputs: Mapping[str, str]


def _dequantized(node: onnx.NodeProto, constants: Mapping[str, np.ndarray], name: str) -> onnx.TensorProto:
    """A DequantizeLinear of constants as the constant it computes: (q - zero point) * scale, in the
    scale's type, as ONNX defines it."""
    quantized, scale = constants[node.input[0]], constants[node.input[1]]
    zero_point = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.int64)
    shape: list[int] | tuple[()] = ()
    if scale.ndim == 1 and quantized.ndim > 0:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % quantized.ndim
        shape = [-1 if i == axis else 1 for i in range(quantized.ndim)]
    centred = quantized.astype(np.int64) - zero_point.astype(np.int64).reshape(shape if zero_point.ndim else ())
    return onnx.numpy_helper.from_array(centred.astype(scale.dtype) * scale.reshape(shape if scale.ndim else ()), name)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _mean_node(source: str, output: str, axes: list[int], opset: int, taken: set[str],
               initializers: list[onnx.TensorProto]) -> onnx.NodeProto:
    """ReduceMean over `axes`, keeping them (axes an attribute before opset 18, an input from 18)."""
    if opset < 18:
        return onnx.helper.make_node("ReduceMean", [source], [output], name=output, axes=axes, keepdims=1)
    axes_name = unique_name(f"{output}_axes", taken)
    initializers.append(onnx.numpy_helper.from_array(np.asarray(axes, np.int64), axes_name))
    return onnx.helper.make_node("ReduceMean", [source, axes_name], [output], name=output, keepdims=1)


def _renamed(quantized: onnx.ModelProto, taken: set[str]) -> tuple[list[tuple[str, onnx.NodeProto]],
                                                                  list[onnx.TensorProto]]:
    """The Q/DQ graph's nodes, each with its original name, every tensor but the graph inputs renamed
    apart from `taken` and the DQs of constants folded; and the constants the nodes read."""
    inputs = {t.name for t in quantized.graph.input}
    # A large model's weight left in its file (`onnxq.mapped_weights`) is read through its mapping.
    constants = {t.name: mapped_weights.mapped_array(t) if mapped_weights.is_mapped(t) else onnx.numpy_helper.to_array(t)
                 for t in quantized.graph.initializer}
    names: dict[str, str] = {"": ""}

    def rename(name: str) -> str:
        if name not in names:
            names[name] = name if name in inputs else unique_name(f"{name}_quantized", taken)
        return names[name]

    nodes, initializers = [], []
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear" and all(n in constants for n in node.input if n):
            initializers.append(_dequantized(node, constants, rename(node.output[0])))
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = unique_name(f"{node.name}_quantized", taken)
        copy.input[:] = [rename(n) for n in node.input]
        _rename_outer(copy, names)
        copy.output[:] = [rename(n) for n in node.output]
        nodes.append((node.name, copy))
    read = {n for _, node in nodes for n in node.input}
    protos = {t.name: t for t in quantized.graph.initializer}
    initializers += [_renamed_tensor(protos[name], values, names[name]) for name, values in constants.items()
                     if name in names and names[name] in read]
    return nodes, initializers


def _renamed_tensor(tensor: onnx.TensorProto, values: np.ndarray, name: str) -> onnx.TensorProto:
    """`tensor` under `name`: a mapped one stays a reference to its file, not a copy of its values."""
    if not mapped_weights.is_mapped(tensor):
        return onnx.numpy_helper.from_array(values, name)
    renamed = onnx.TensorProto()
    renamed.CopyFrom(tensor)
    renamed.name = name
    return renamed


def _rename_outer(node: onnx.NodeProto, names: Mapping[str, str]) -> None:
    """Inside `node`'s subgraphs (If, Loop, Scan), the outer-scope tensors they read renamed too."""
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            local = {t.name for t in graph.input} | {t.name for t in graph.initializer}
            local |= {out for inner in graph.node for out in inner.output}
            outer = {name: new for name, new in names.items() if name not in local}
            for inner in graph.node:
                inner.input[:] = [outer.get(n, n) for n in inner.input]
                _rename_outer(inner, outer)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no graph output needs."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed, pending, keep = set(), [o.name for o in graph.output], set()
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        index = producers.get(name)
        if index is not None and index not in keep:
            keep.add(index)
            pending += [n for n in graph.node[index].input if n]
    nodes = [graph.node[i] for i in sorted(keep)]
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)


def sequential_shift_model(float_model: onnx.ModelProto, quantized: onnx.ModelProto,
                           layers: Iterable[LinearLayer], *, reuse: bool = False) -> ShiftModel:
    """The float model and the Q/DQ model (the same graph with the plan's Q/DQ, float rest in float32)
    side by side, every layer of `layers` corrected by its batch mean shift as the module docstring shows.

    `reuse`: build on `float_model` itself (it is changed) instead of a copy, for a caller that exported it
    for this alone: on a large model the copy is one more copy of the weights."""
    merged = float_model if reuse else onnx.ModelProto()
    if not reuse:
        merged.CopyFrom(float_model)
    graph = merged.graph
    taken = {name for node in graph.node for name in (*node.input, *node.output, node.name)}
    taken |= {t.name for t in graph.initializer} | {t.name for t in graph.input} | {t.name for t in graph.output}
    nodes, initializers = _renamed(quantized, taken)
    opset = _opset(merged)
    wanted = {layer.node_name: layer for layer in layers}
    outputs: dict[str, str] = {}
    corrected: list[onnx.NodeProto] = []
    for original, node in nodes:
        corrected.append(node)
        layer = wanted.get(original)
        if layer is None:
            continue
        out = node.output[0]
        raw = unique_name(f"{out}_uncorrected", taken)
        node.output[0] = raw
        rank = layer.output_rank
        axes = [i for i in range(rank) if i != layer.channel_axis % rank]
        diff, shift = unique_name(f"{out}_shift", taken), unique_name(f"{out}_mean_shift", taken)
        corrected += [onnx.helper.make_node("Sub", [layer.output_name, raw], [diff], name=diff),
                      _mean_node(diff, shift, axes, opset, taken, initializers),
                      onnx.helper.make_node("Add", [raw, shift], [out], name=out)]
        outputs[layer.node_name] = shift
    graph.node.extend(corrected)
    initializers.reverse()
    while initializers:  # one tensor at a time: the list's copies go as the graph's arrive
        graph.initializer.append(initializers.pop())
    elem_type = onnx.TensorProto.FLOAT
    del graph.output[:]
    graph.output.extend(onnx.helper.make_tensor_value_info(name, elem_type, None) for name in outputs.values())
    _prune(graph)
    return ShiftModel(merged, outputs)


def _batches(source: CalibSource, batch_size: int, signature: ModelSignature) -> Iterator[Feed]:
    fixed = signature.fixed_batch
    for feed in source.batches(signature.batch_size(batch_size)):
        if fixed is None or signature.samples_in(feed) == fixed:
            yield feed


@dataclass(frozen=True)
class Shifts:
    """The measured corrections.

    Attributes:
        means: per layer (node name), the correction per channel: the batches' corrections averaged,
            weighted by their samples (float64).
        samples: the samples measured on.
    """

    means: Mapping[str, np.ndarray]
    samples: int


def measure(shift_model: ShiftModel, source: CalibSource, batch_size: int, signature: ModelSignature,
            providers: Iterable[str] = ("cpu",), on_progress: Progress | None = None) -> Shifts:
    """Run the model over `source`, one batch at a time, and average each layer's corrections.

    ONNX Runtime's graph optimisations are off: the Q/DQ arithmetic is then the one the comparisons with
    the float model use (with them on, ORT runs parts of a Q/DQ model its own way: PP-OCR's second layer
    moved by 3e-4), and on EfficientNet-Lite0 the pass is as fast and takes 230 MiB less.
    """
    sums: dict[str, np.ndarray] = {}
    samples, total = 0, source.num_samples()
    names = list(shift_model.outputs.values())
    with open_session(shift_model.model, tuple(providers), memory_pattern=False, arena=False) as session:
        for feed in _batches(source, batch_size, signature):
            values = session.run(feed, names)
            count = signature.samples_in(feed)
            for layer, name in shift_model.outputs.items():
                shift = np.asarray(values[name], np.float64).reshape(-1) * count
                sums[layer] = sums[layer] + shift if layer in sums else shift
            samples += count
            if on_progress is not None:
                on_progress(samples, total)
    return Shifts({layer: total_shift / samples for layer, total_shift in sums.items()}, samples)
