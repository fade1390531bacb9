"""Fold subgraphs whose inputs are all constants into initializers (onnx-graphsurgeon + ONNX Runtime).

Rewrite: every node whose inputs are all constants (initializers, lowered `Constant` nodes, shapes
known statically) is evaluated once with ONNX Runtime and its outputs become `gs.Constant` tensors;
the nodes disappear. This turns shape arithmetic (`ConstantOfShape`/`Slice`/`Transpose`/`Concat`/
`Cast`/`Reshape` chains feeding `Pad` or `Reshape`) into constant operands and applies weight
transforms (`Transpose`/`Reshape`/`Cast`/`Identity` of a weight) ahead of time, so each weight reaches
its Conv, Gemm or MatMul as an initializer.

The work is done by `gs.Graph.fold_constants`, called with these settings:

- `error_ok=False` on a first, unpartitioned attempt, so a failure is seen rather than silently
  leaving everything unfolded; if that attempt raises, a second one runs with
  `partitioning="recursive"` and `error_ok=True`, which folds every part that ONNX Runtime can
  evaluate. If both raise, a warning is logged and the graph is returned unfolded: folding never
  fails the pipeline.
- `fold_shapes=True` only when the graph has no `Cast(to float) -> Add/Mul/... -> Cast(to int)`
  chain. With shape folding on, gs first rewrites such chains to compute in the integer type,
  casting their float constants to int (0.5 becomes 0) and rebinding inputs without checking the
  other operands' types; that changes what the model computes. Such graphs get `fold_shapes=False`.
- `flatten_subgraphs=False`: gs inlines an `If` with a constant condition by rebinding the producers
  of the branch outputs, which breaks when a branch returns an outer tensor or an initializer.
- `recurse_subgraphs=True`: If/Loop/Scan bodies are folded too.
- `size_threshold`: results larger than this many bytes stay computed at run time.
- Random ops (`RandomNormal`, `RandomUniform`, `Bernoulli`, ...) are never folded; gs would freeze
  one draw of them.
- `Shape` with `start`/`end` (opset 15) is first rewritten as `Shape -> Slice(start, end, axes=[0])`:
  gs's shape folding (a static shape, and its Gather/Slice patterns) reads the whole shape and ignores
  both attributes, which changed what models compute (Shape(start=1) -> Concat -> Reshape gave a rank-4
  result instead of rank 3). Slice clamps and counts negative bounds from the back as Shape does (ONNX
  operator docs, Shape-15 and Slice-13), so a pair left unfolded computes the same.
- While folding, the graph and every subgraph carry the lowest IR version their opsets allow. gs
  exports each (sub)graph it evaluates with that graph's IR version, and subgraphs have none, so
  onnx writes its newest one, which ONNX Runtime rejects: nothing in If/Loop bodies would fold.

Run `constants_to_initializers` first: gs lowers `Constant` nodes itself, but gives `value_float(s)`
float64 values, which makes the graph ill-typed.

gs's own log messages are silenced for the call (the library does not print); what happened is
logged here instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.helper
import onnx_graphsurgeon as gs

from onnx_graphsurgeon.logger import G_LOGGER

from onnxq.errors import first_line
from onnxq.graph.names import NameSource
from onnxq.passes.core import graph_pass

__all__ = ["fold_constants", "DEFAULT_SIZE_THRESHOLD"]

log = logging.getLogger(__name__)

#: Folded tensors above this many bytes are left to be computed at run time.
DEFAULT_SIZE_THRESHOLD = 64 * 2**20

_RANDOM_OPS = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli",
})

# The ops gs's shape-tensor "cast elision" rewrites to compute in integers (see module docstring).
_CAST_ELISION_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Greater", "Less", "Concat",
})
_INTEGER_CAST_TARGETS = frozenset({onnx.TensorProto.INT32, onnx.TensorProto.INT64})


@graph_pass
def fold_constants(graph: gs.Graph, *, size_threshold: int = DEFAULT_SIZE_THRESHOLD) -> gs.Graph:
    """Evaluate every constant-only part of `graph` and replace it by initializers.

    Args:
        graph: The graph to fold (the pass works on a copy).
        size_threshold: Largest folded tensor, in bytes; bigger results stay computed.

    Returns:
        The folded graph, or the graph unchanged if onnx-graphsurgeon or ONNX Runtime fails.
    """
    fold_shapes = not _has_cast_elision_chain(graph)
    if not fold_shapes:
        log.info("the graph computes shapes through float Casts; folding without shape folding")
    log.debug("folding constants (fold_shapes=%s, size_threshold=%d)", fold_shapes, size_threshold)
    try:
        return _fold_copy(graph, fold_shapes, size_threshold, partitioning=None)
    except Exception as err:  # noqa: BLE001 - gs and ONNX Runtime raise anything; folding is optional
        log.info("constant folding in one piece failed (%s); retrying part by part", first_line(err))
    try:
        return _fold_copy(graph, fold_shapes, size_threshold, partitioning="recursive")
    except Exception as err:  # noqa: BLE001
        log.warning("constant folding failed, continuing with the graph unfolded: %s",
                    first_line(err))
        return graph


def _fold_copy(graph: gs.Graph, fold_shapes: bool, size_threshold: int,
               partitioning: str | None) -> gs.Graph:
    """Fold a copy of `graph` (gs folds in place and may stop half-way); return the copy."""
    candidate = graph.copy()
    _slice_partial_shapes(candidate)
    with G_LOGGER.suppress(G_LOGGER.CRITICAL), _ir_version_runtime_accepts(candidate):
        candidate.toposort()
        candidate.fold_constants(
            fold_shapes=fold_shapes,
            recurse_subgraphs=True,
            partitioning=partitioning,
            error_ok=partitioning is not None,
            flatten_subgraphs=False,
            size_threshold=size_threshold,
            should_exclude_node=_is_random,
            recurse_functions=True,
        )
    return candidate


@contextlib.contextmanager
def _ir_version_runtime_accepts(graph: gs.Graph) -> Iterator[None]:
    """Give `graph`, its functions and subgraphs the lowest IR version their opsets allow, for a while.

    The original IR versions are restored on exit (see the module docstring for why).
    """
    opsets = list(graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)])
    ir_version = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    members = list(_all_graphs(graph))
    saved = [member.ir_version for member in members]
    for member in members:
        member.ir_version = ir_version
    try:
        yield
    finally:
        for member, original in zip(members, saved):
            member.ir_version = original


def _slice_partial_shapes(graph: gs.Graph) -> None:
    """Rewrite every `Shape(start, end)` of `graph` and its subgraphs as `Shape -> Slice` (in place)."""
    members = list(_all_graphs(graph))
    names = NameSource(graph)
    for member in members[1:]:
        names.taken |= set(member.tensors()) | {node.name for node in member.nodes}
    for member in members:
        for node in list(member.nodes):
            if node.op != "Shape" or not {"start", "end"} & set(node.attrs):
                continue
            start = int(node.attrs.pop("start", 0))
            end = node.attrs.pop("end", None)
            sliced = node.outputs[0]
            whole = gs.Variable(names(f"{sliced.name}_whole"), dtype=np.int64)
            node.outputs[0] = whole
            bounds = [gs.Constant(names(f"{sliced.name}_{what}"), np.array([value], np.int64)) for what, value in
                      (("start", start), ("end", np.iinfo(np.int64).max if end is None else int(end)), ("axis", 0))]
            member.nodes.append(gs.Node("Slice", names(f"{node.name}_slice"), inputs=[whole, *bounds],
                                        outputs=[sliced]))


def _is_random(node: gs.Node) -> bool:
    return node.op in _RANDOM_OPS


def _all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """`graph`, its local functions, and all their subgraphs."""
    for owner in (graph, *graph.functions):
        yield owner
        yield from owner.subgraphs(recursive=True)


def _has_cast_elision_chain(graph: gs.Graph) -> bool:
    """True if some node matches what gs's shape-tensor cast elision would rewrite."""
    for member in _all_graphs(graph):
        for node in member.nodes:
            if node.op in _CAST_ELISION_OPS and _is_cast_sandwich(node):
                return True
    return False


def _is_cast_sandwich(node: gs.Node) -> bool:
    """Some input is cast to float32 and every consumer is a Cast, one of them back to an int."""
    consumers = [consumer for output in node.outputs for consumer in output.outputs]
    if not consumers or any(consumer.op != "Cast" for consumer in consumers):
        return False
    if not any(consumer.attrs.get("to") in _INTEGER_CAST_TARGETS for consumer in consumers):
        return False
    return any(producer.op == "Cast" and producer.attrs.get("to") == onnx.TensorProto.FLOAT
               for tensor in node.inputs for producer in tensor.inputs)
