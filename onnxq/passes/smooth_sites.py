"""Where SmoothQuant can apply: every activation read by linear layers, and how 1/s reaches it.

For an activation X [..., K] read by MatMul/Gemm nodes with constant weights (see `onnxq.passes.smoothquant`
for the rewrite and its source), the per-channel 1/s must be applied to X before those readers:

  * folded into the producer, exactly, when it is:
    - LayerNormalization: gamma and beta (both [..., K]) divided by s;
    - Mul by a per-channel constant [..., K] (the gamma of a LayerNorm or RMSNorm written out), or Div
      by one (the divisor multiplied by s); scalar constants (GELU's 0.5) are left alone, since making
      them per-channel would change the op TensorRT pattern-matches;
    - Add or Sub of a constant (a beta, a bias) whose other input is itself such a producer, read by
      that Add/Sub alone: both are scaled (`Add(Mul(norm, gamma), beta)`, `Add(MatMul(x, W), b)`);
    - MatMul by a constant (output columns, the last axis, divided) or Gemm with constant B and C;
  * otherwise (a graph input, GELU, Relu, the Reshape after attention, ...), with `explicit`, by a new
    per-channel Mul by 1/s between X and the linear readers: one element-wise op at run time, which
    TensorRT fuses into the QuantizeLinear after it and ONNX Runtime's CPU kernels run on its own;
    without `explicit` such an X is skipped with a reason.

X may have other readers (a residual Add, a graph output). A folded producer makes them see X / s: with
`compensate` (the default) the producer writes a new tensor X' for the linear readers and a Mul by s
writes X back under its own name for the others; without it such a tensor is skipped with a reason.
An explicit Mul leaves the other readers on X as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["SmoothCandidate", "SmoothSite", "smooth_sites", "smoothquant_candidates", "weight_out_axis"]

_MAX_CHAIN = 8  # Add/Sub links followed back from X before giving up
_DEFAULT_DOMAINS = (None, "", "ai.onnx")


@dataclass(frozen=True)
class SmoothCandidate:
    """An activation read by linear layers with constant weights, and whether it can be smoothed.

    Attributes:
        tensor_name: the activation X.
        producer: the node that writes X ("" for a graph input).
        producer_op: its op type ("" for a graph input).
        consumers: the MatMul/Gemm nodes whose weights absorb s (all linear readers of X).
        restored: the other readers of X (and "<graph output>") that get X back through a Mul by s.
        smoothable: whether `smoothquant` rewrites it.
        reason: what is folded where, or why it is left alone.
        explicit: 1/s is applied by a new Mul before the linear readers (no producer absorbs it).
    """

    tensor_name: str
    producer: str
    producer_op: str
    consumers: tuple[str, ...]
    restored: tuple[str, ...]
    smoothable: bool
    reason: str
    explicit: bool = False


@dataclass(frozen=True, eq=False)
class _Fold:
    """Replace constant input `index` of `node` by itself divided (or multiplied) by s along `axis`."""

    node: gs.Node
    index: int
    axis: int
    divide: bool


@dataclass(frozen=True, eq=False)
class SmoothSite:
    """A smoothable activation with the rewrites that apply its scale.

    Attributes:
        candidate: what it is and why.
        tensor: X.
        folds: the producer's constants that absorb 1/s (empty: an explicit Mul does).
        readers: (linear reader, the input-channel axis of its weight).
        channels: K.
    """

    candidate: SmoothCandidate
    tensor: gs.Tensor
    folds: tuple[_Fold, ...]
    readers: tuple[tuple[gs.Node, int], ...]
    channels: int


def weight_out_axis(node: gs.Node) -> int:
    """The output-channel axis of a linear reader's weight (where its per-channel scales lie)."""
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return len(node.inputs[1].shape) - 1


def _float_const_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape of a float constant, or None, read without loading its values: a large model's weights
    stay in the model (see `onnxq.io.to_graph`) instead of being copied into the graph."""
    if not isinstance(tensor, gs.Constant):
        return None
    try:
        is_float = np.dtype(tensor.dtype).kind == "f"
    except TypeError:  # a type numpy cannot hold (bfloat16, float8): not a weight SmoothQuant scales
        return None
    return tuple(int(d) for d in tensor.shape) if is_float else None


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of a float constant, or None."""
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    return values if values.dtype.kind == "f" else None


def _linear_row_axis(node: gs.Node, tensor: gs.Tensor) -> int | None:
    """The input-channel axis of `node`'s constant weight when `node` reads `tensor` as its activation."""
    if node.domain not in _DEFAULT_DOMAINS or len(node.inputs) < 2 or node.inputs[0].name != tensor.name:
        return None
    weight = _float_const_shape(node.inputs[1])
    if node.op == "MatMul" and weight is not None and len(weight) >= 2:
        return len(weight) - 2
    if node.op == "Gemm" and weight is not None and len(weight) == 2 and not int(node.attrs.get("transA", 0)):
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return None


def _last_axis_constant(tensor: gs.Tensor, channels: int) -> bool:
    """True for a float constant that broadcasts along the last axis only (shape [..., 1 or K] or scalar)."""
    values = _const(tensor)
    return values is not None and (values.ndim == 0 or values.shape[-1] in (1, channels))


def _producer_folds(tensor: gs.Tensor, channels: int, outputs: frozenset[str],
                    depth: int = 0) -> tuple[tuple[_Fold, ...], str]:
    """The constant rewrites that make the producer of `tensor` write tensor / s, or ((), why not)."""
    if not tensor.inputs:
        return (), "a graph input: no producer to fold 1/s into"
    node = tensor.inputs[0]
    op, inputs = node.op, node.inputs
    cannot = f"producer '{node.name}' ({op}) cannot absorb a per-channel scale"
    if node.domain not in _DEFAULT_DOMAINS or node.outputs[0].name != tensor.name:
        return (), cannot
    if op == "LayerNormalization":
        return _norm_folds(node, channels, cannot)
    constant = [i for i, t in enumerate(inputs) if isinstance(t, gs.Constant)]
    if op in ("Mul", "Div", "Add", "Sub") and len(inputs) == 2 and len(constant) == 1:
        index = constant[0]
        if not _last_axis_constant(inputs[index], channels):
            return (), f"{cannot}: its constant does not broadcast along the channel axis alone"
        if op in ("Mul", "Div"):
            return _scaling_folds(node, index, channels, cannot)
        other = inputs[1 - index]
        if depth >= _MAX_CHAIN or len({id(n) for n in other.outputs}) != 1 or other.name in outputs:
            return (), f"{cannot}: its input '{other.name}' has other readers"
        folds, why_not = _producer_folds(other, channels, outputs, depth + 1)
        return ((*folds, _Fold(node, index, -1, True)), "") if folds else ((), why_not)
    if op in ("MatMul", "Gemm"):
        return _layer_output_folds(node, channels, cannot)
    return (), cannot


def _scaling_folds(node: gs.Node, index: int, channels: int, cannot: str) -> tuple[tuple[_Fold, ...], str]:
    """x * c (c / s) or x / c (c * s), for a per-channel c: a gamma, not a scalar such as GELU's 0.5."""
    if np.asarray(node.inputs[index].values).shape[-1:] != (channels,):
        return (), f"{cannot}: its constant is not per-channel (a scalar op is left as it is)"
    if node.op == "Div" and index != 1:
        return (), f"{cannot}: constant / x"
    return (_Fold(node, index, -1, node.op == "Mul"),), ""


def _norm_folds(node: gs.Node, channels: int, cannot: str) -> tuple[tuple[_Fold, ...], str]:
    """Divide gamma and beta (if any) of a LayerNormalization."""
    indices = [i for i in (1, 2) if i < len(node.inputs) and node.inputs[i].name != ""]
    for index in indices:
        values = _const(node.inputs[index])
        if values is None or values.ndim == 0 or values.shape[-1] != channels:
            return (), f"{cannot}: its gamma/beta are not constants of {channels} channels"
    if 1 not in indices:
        return (), f"{cannot}: it has no gamma"
    return tuple(_Fold(node, index, -1, True) for index in indices), ""


def _layer_output_folds(node: gs.Node, channels: int, cannot: str) -> tuple[tuple[_Fold, ...], str]:
    """Divide the output columns (weight and bias) of a MatMul or Gemm with constant weights."""
    weight = _float_const_shape(node.inputs[1])
    if node.op == "MatMul":
        if weight is None or len(weight) < 2 or weight[-1] != channels:
            return (), f"{cannot}: its weight is not a constant [..., K, {channels}]"
        return (_Fold(node, 1, -1, True),), ""
    axis = 0 if int(node.attrs.get("transB", 0)) else 1
    if weight is None or len(weight) != 2 or weight[axis] != channels:
        return (), f"{cannot}: its B is not a constant with {channels} output columns"
    folds = [_Fold(node, 1, axis, True)]
    if len(node.inputs) > 2 and node.inputs[2].name != "":
        if not _last_axis_constant(node.inputs[2], channels):
            return (), f"{cannot}: its C is not a per-column constant"
        folds.append(_Fold(node, 2, -1, True))
    return tuple(folds), ""


def _describe(folds: tuple[_Fold, ...]) -> str:
    nodes = list(dict.fromkeys(f"{fold.node.op} '{fold.node.name}'" for fold in folds))
    return " <- ".join(reversed(nodes))


def _analyse(tensor: gs.Tensor, outputs: frozenset[str], compensate: bool,
             explicit: bool) -> tuple[SmoothCandidate, SmoothSite | None]:
    """The candidate for `tensor` (which has at least one linear reader) and, if smoothable, its plan."""
    readers: dict[int, tuple[gs.Node, int | None]] = {}
    for node in tensor.outputs:
        readers.setdefault(id(node), (node, _linear_row_axis(node, tensor)))
    linear = tuple((node, axis) for node, axis in readers.values() if axis is not None)
    others = tuple(node.name for node, axis in readers.values() if axis is None)
    others += ("<graph output>",) if tensor.name in outputs else ()
    producer = tensor.inputs[0] if tensor.inputs else None
    names = tuple(node.name for node, _ in linear)

    def result(why: str, folds: tuple[_Fold, ...] = (), channels: int = 0,
               by_mul: bool = False) -> tuple[SmoothCandidate, SmoothSite | None]:
        usable = bool(folds) or by_mul
        candidate = SmoothCandidate(tensor.name, producer.name if producer else "", producer.op if producer else "",
                                    names, others if folds else (), usable, why, by_mul)
        return candidate, (SmoothSite(candidate, tensor, folds, linear, channels) if usable else None)

    sizes = {int(node.inputs[1].shape[axis]) for node, axis in linear}
    if len(sizes) != 1:
        return result(f"its linear readers disagree on the number of input channels ({sorted(sizes)})")
    (channels,) = sizes
    folds, why_not = _producer_folds(tensor, channels, outputs)
    if not folds:
        if explicit:
            return result(f"{why_not}: a per-channel Mul by 1/s before {len(linear)} linear layer(s)", (), channels,
                          by_mul=True)
        return result(why_not)
    if others and not compensate:
        if explicit:
            return result(f"also read by {', '.join(others)} (compensation is off): a per-channel Mul by 1/s "
                          f"before {len(linear)} linear layer(s)", (), channels, by_mul=True)
        return result(f"also read by {', '.join(others)}, which would see X / s (compensation is off)")
    why = f"1/s folded into {_describe(folds)}; s into the weights of {len(linear)} linear layer(s)"
    if others:
        why += f"; {', '.join(others)} read X back through a Mul by s"
    return result(why, folds, channels)


def smooth_sites(graph: gs.Graph, *, compensate: bool = True,
                 explicit: bool = False) -> list[tuple[SmoothCandidate, SmoothSite | None]]:
    """One (candidate, site or None when it cannot be smoothed) per activation input of a linear layer,
    in graph order."""
    outputs = frozenset(t.name for t in graph.outputs)
    found: list[tuple[SmoothCandidate, SmoothSite | None]] = []
    seen: set[str] = set()
    for node in graph.nodes:
        tensor = node.inputs[0] if node.inputs else None
        if tensor is None or isinstance(tensor, gs.Constant) or tensor.name in seen \
                or _linear_row_axis(node, tensor) is None:
            continue
        seen.add(tensor.name)
        found.append(_analyse(tensor, outputs, compensate, explicit))
    return found


def smoothquant_candidates(graph: gs.Graph, *, compensate: bool = True,
                           explicit: bool = False) -> tuple[SmoothCandidate, ...]:
    """Every activation read by a MatMul/Gemm with a constant weight, smoothable or not, and why.

    Args:
        graph: the prepared float graph (read only).
        compensate: whether readers other than linear layers are given X back after a folded producer.
        explicit: whether an X no producer can absorb 1/s for gets a per-channel Mul.

    Returns:
        One `SmoothCandidate` per activation, in graph order.
    """
    return tuple(candidate for candidate, _ in smooth_sites(graph, compensate=compensate, explicit=explicit))
