"""SmoothQuant: move activation outliers into the weights of the linear layers that read them.

Rewrite, for an activation X [..., K] read by linear layers Y_c = X W_c (MatMul by a constant
[..., K, N], or Gemm by a constant B, [K, N] or [N, K] when transB=1), with one scale per input channel
j (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023, section 4):

    s_j = max|X_j|^alpha / (max over c of max|W_c[j, :]|)^(1 - alpha)
    X'  = X / s          folded into the node that produces X
    W'_c = diag(s) W_c   a new constant for every reader c

so X' W'_c = X W_c in exact arithmetic, while X' has its outlier channels divided down and INT8
per-tensor activations lose far less. alpha (the migration strength, 0 < alpha < 1, default 0.5)
moves quantization difficulty from activations (alpha -> 1) to weights. Every reader of X shares the
one s (Q, K and V projections of one LayerNorm). A channel whose range or weight is zero, NaN or Inf
gets s_j = 1; s is clipped to [`MIN_SCALE`, `MAX_SCALE`].

The producer absorbs 1/s exactly when it is:
  * LayerNormalization: gamma and beta (both [..., K]) divided by s;
  * Mul by a per-channel constant [..., K] (the gamma of a LayerNorm or RMSNorm written out), or Div
    by one (the divisor multiplied by s); scalar constants (GELU's 0.5) are left alone, since making
    them per-channel would change the op TensorRT pattern-matches;
  * Add or Sub of a constant (a beta, a bias) whose other input is itself such a producer, read by
    that Add/Sub alone: both are scaled (`Add(Mul(norm, gamma), beta)`, `Add(MatMul(x, W), b)`);
  * MatMul by a constant (output columns, the last axis, divided) or Gemm with constant B and C.
Anything else (a graph input, Relu, Reshape, an attention output, ...) is skipped with a reason.

X may have other readers (a residual Add, a graph output): they would see X / s. With `compensate`
(the default) the producer writes a new tensor X' that the linear readers take, and a Mul by s writes
X back under its own name for the others; without it such a tensor is skipped with a reason.

Only new `gs.Constant`s are created; existing constants, which other nodes or the caller's graph may
share, are never changed. Arithmetic is float64, cast back to each constant's dtype. Only the main
graph is rewritten.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.names import unique_name
from onnxq.errors import CalibrationError, ConfigError
from onnxq.passes.core import graph_pass

__all__ = ["SmoothCandidate", "smoothquant", "smoothquant_candidates", "smooth_scales", "check_alpha", "MIN_SCALE",
           "MAX_SCALE"]

log = logging.getLogger(__name__)

#: The range each per-channel smoothing scale is clipped to.
MIN_SCALE = 1e-5
MAX_SCALE = 1e5
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
    """

    tensor_name: str
    producer: str
    producer_op: str
    consumers: tuple[str, ...]
    restored: tuple[str, ...]
    smoothable: bool
    reason: str


@dataclass(frozen=True, eq=False)
class _Fold:
    """Replace constant input `index` of `node` by itself divided (or multiplied) by s along `axis`."""

    node: gs.Node
    index: int
    axis: int
    divide: bool


@dataclass(frozen=True, eq=False)
class _Plan:
    """A smoothable candidate with the rewrites that apply it."""

    candidate: SmoothCandidate
    tensor: gs.Tensor
    folds: tuple[_Fold, ...]
    readers: tuple[tuple[gs.Node, int], ...]  # (linear consumer, row axis of its weight)
    channels: int


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
    weight = _const(node.inputs[1])
    if node.op == "MatMul" and weight is not None and weight.ndim >= 2:
        return weight.ndim - 2
    if node.op == "Gemm" and weight is not None and weight.ndim == 2 and not int(node.attrs.get("transA", 0)):
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
    weight = _const(node.inputs[1])
    if node.op == "MatMul":
        if weight is None or weight.ndim < 2 or weight.shape[-1] != channels:
            return (), f"{cannot}: its weight is not a constant [..., K, {channels}]"
        return (_Fold(node, 1, -1, True),), ""
    axis = 0 if int(node.attrs.get("transB", 0)) else 1
    if weight is None or weight.ndim != 2 or weight.shape[axis] != channels:
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


def _analyse(tensor: gs.Tensor, outputs: frozenset[str], compensate: bool) -> tuple[SmoothCandidate, _Plan | None]:
    """The candidate for `tensor` (which has at least one linear reader) and, if smoothable, its plan."""
    readers: dict[int, tuple[gs.Node, int | None]] = {}
    for node in tensor.outputs:
        readers.setdefault(id(node), (node, _linear_row_axis(node, tensor)))
    linear = tuple((node, axis) for node, axis in readers.values() if axis is not None)
    others = tuple(node.name for node, axis in readers.values() if axis is None)
    others += ("<graph output>",) if tensor.name in outputs else ()
    producer = tensor.inputs[0] if tensor.inputs else None
    names = tuple(node.name for node, _ in linear)

    def result(why: str, folds: tuple[_Fold, ...] = (), channels: int = 0) -> tuple[SmoothCandidate, _Plan | None]:
        candidate = SmoothCandidate(tensor.name, producer.name if producer else "", producer.op if producer else "",
                              names, others if folds else (), bool(folds), why)
        return candidate, (_Plan(candidate, tensor, folds, linear, channels) if folds else None)

    sizes = {int(np.asarray(node.inputs[1].values).shape[axis]) for node, axis in linear}
    if len(sizes) != 1:
        return result(f"its linear readers disagree on the number of input channels ({sorted(sizes)})")
    (channels,) = sizes
    if others and not compensate:
        return result(f"also read by {', '.join(others)}, which would see X / s (compensation is off)")
    folds, why_not = _producer_folds(tensor, channels, outputs)
    if not folds:
        return result(why_not)
    why = f"1/s folded into {_describe(folds)}; s into the weights of {len(linear)} linear layer(s)"
    if others:
        why += f"; {', '.join(others)} read X back through a Mul by s"
    return result(why, folds, channels)


def _plans(graph: gs.Graph, compensate: bool) -> list[tuple[SmoothCandidate, _Plan | None]]:
    """One (candidate, plan or None) per activation input of a linear layer, in graph order."""
    outputs = frozenset(t.name for t in graph.outputs)
    found: list[tuple[SmoothCandidate, _Plan | None]] = []
    seen: set[str] = set()
    for node in graph.nodes:
        tensor = node.inputs[0] if node.inputs else None
        if tensor is None or isinstance(tensor, gs.Constant) or tensor.name in seen \
                or _linear_row_axis(node, tensor) is None:
            continue
        seen.add(tensor.name)
        found.append(_analyse(tensor, outputs, compensate))
    return found


def smoothquant_candidates(graph: gs.Graph, *, compensate: bool = True) -> tuple[SmoothCandidate, ...]:
    """Every activation read by a MatMul/Gemm with a constant weight, smoothable or not, and why.

    Args:
        graph: the prepared float graph (read only).
        compensate: as in `smoothquant`: whether readers other than linear layers are given X back.

    Returns:
        One `SmoothCandidate` per activation, in graph order.
    """
    return tuple(candidate for candidate, _ in _plans(graph, compensate))


def smooth_scales(act_amax: np.ndarray, weight_amax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = act_amax_j^alpha / weight_amax_j^(1 - alpha), 1 where either is 0 or not finite, clipped.

    Args:
        act_amax: max |X_j| per input channel.
        weight_amax: max |W_j| per input channel over all readers' weights.
        alpha: the migration strength, 0 < alpha < 1.

    Returns:
        The float64 scales, in [`MIN_SCALE`, `MAX_SCALE`].
    """
    act = np.asarray(act_amax, dtype=np.float64)
    weight = np.asarray(weight_amax, dtype=np.float64)
    usable = np.isfinite(act) & np.isfinite(weight) & (act > 0) & (weight > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scales = np.where(usable, act**alpha / weight ** (1.0 - alpha), 1.0)
    return np.clip(np.nan_to_num(scales, nan=1.0, posinf=MAX_SCALE), MIN_SCALE, MAX_SCALE)


def check_alpha(alpha: float) -> float:
    """`alpha` as a float, or a ConfigError unless it is a finite number strictly between 0 and 1."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not math.isfinite(alpha):
        raise ConfigError(f"--smoothquant: alpha must be a number in (0, 1), got {alpha!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"--smoothquant: alpha must be in (0, 1) (exclusive), got {alpha}")
    return float(alpha)


def _rescaled(values: np.ndarray, scales: np.ndarray, axis: int, divide: bool) -> np.ndarray:
    """`values` divided (or multiplied) by `scales` along `axis`, size-1 or scalar axes broadcast first."""
    data = np.asarray(values, dtype=np.float64)
    data = data.reshape(1) if data.ndim == 0 else data
    axis %= data.ndim
    if data.shape[axis] == 1 and scales.size != 1:
        data = np.broadcast_to(data, data.shape[:axis] + (scales.size,) + data.shape[axis + 1:])
    factor = scales.reshape([scales.size if i == axis else 1 for i in range(data.ndim)])
    return (data / factor if divide else data * factor).astype(values.dtype)


def _replace_constant(node: gs.Node, index: int, values: np.ndarray, names: set[str]) -> None:
    base = re.sub(r"_smoothed(_\d+)?$", "", node.inputs[index].name)  # smoothed twice: w_smoothed_2
    node.inputs[index] = gs.Constant(unique_name(f"{base}_smoothed", names), values)


def _weight_amax(plan: _Plan) -> np.ndarray:
    """max |W[j, :]| per input channel j over every linear reader's current weight."""
    per_reader = []
    for node, axis in plan.readers:
        weight = np.abs(np.asarray(node.inputs[1].values, dtype=np.float64))
        per_reader.append(np.moveaxis(weight, axis, -1).reshape(-1, plan.channels).max(axis=0))
    return np.max(per_reader, axis=0)


def _restore(graph: gs.Graph, plan: _Plan, scales: np.ndarray, names: set[str]) -> None:
    """Make the producer write a new X', give it to the linear readers, and Mul(X', s) -> X for the rest."""
    tensor, producer = plan.tensor, plan.tensor.inputs[0]
    smoothed = gs.Variable(unique_name(f"{tensor.name}_smoothed", names), dtype=tensor.dtype, shape=tensor.shape)
    producer.outputs[0] = smoothed
    for node, _ in plan.readers:
        node.inputs[0] = smoothed
    dtype = tensor.dtype if tensor.dtype is not None else np.float32
    scale = gs.Constant(unique_name(f"{tensor.name}_smooth_scale", names), scales.astype(dtype))
    graph.nodes.append(gs.Node("Mul", unique_name(f"{producer.name}/smoothquant_restore", names),
                               inputs=[smoothed, scale], outputs=[tensor]))


def _apply(graph: gs.Graph, plan: _Plan, act_amax: np.ndarray, alpha: float, names: set[str]) -> np.ndarray:
    """Fold s into the producer and the readers' weights; returns s."""
    scales = smooth_scales(act_amax, _weight_amax(plan), alpha)
    for fold in plan.folds:
        values = np.asarray(fold.node.inputs[fold.index].values)
        _replace_constant(fold.node, fold.index, _rescaled(values, scales, fold.axis, fold.divide), names)
    for node, axis in plan.readers:
        _replace_constant(node, 1, _rescaled(np.asarray(node.inputs[1].values), scales, axis, False), names)
    if plan.candidate.restored:
        _restore(graph, plan, scales, names)
    return scales


def _checked_amax(plan: _Plan, amax: np.ndarray) -> np.ndarray:
    values = np.asarray(amax, dtype=np.float64).reshape(-1)
    if values.size != plan.channels:
        raise CalibrationError(f"tensor '{plan.candidate.tensor_name}': {values.size} channel ranges given, "
                               f"its readers have {plan.channels} input channels")
    return values


@graph_pass
def smoothquant(graph: gs.Graph, channel_amax: Mapping[str, np.ndarray], *, alpha: float = 0.5,
                compensate: bool = True) -> gs.Graph:
    """Smooth every activation of `smoothquant_candidates` that has ranges in `channel_amax`.

    Args:
        graph: the prepared float graph (the pass works on a copy).
        channel_amax: tensor name -> max |x| per channel of the last axis (`channel_absmax`),
            measured on this graph before smoothing.
        alpha: migration strength, 0 < alpha < 1.
        compensate: give readers other than the linear layers (a residual Add, a graph output) X back
            through a Mul by s; when False such tensors are left alone.

    Returns:
        The rewritten graph; its float outputs equal the input graph's up to rounding.

    Raises:
        ConfigError: alpha is not in (0, 1).
        CalibrationError: a range vector's length differs from the tensor's channel count.
    """
    alpha = check_alpha(alpha)
    names = set(graph.tensors()) | {node.name for node in graph.nodes}
    plans = _plans(graph, compensate)
    smoothed = 0
    for candidate, plan in plans:
        if plan is None:
            log.info("SmoothQuant: '%s' left alone: %s", candidate.tensor_name, candidate.reason)
        elif candidate.tensor_name not in channel_amax:
            log.warning("SmoothQuant: '%s' left alone: no channel ranges given for it", candidate.tensor_name)
        else:
            scales = _apply(graph, plan, _checked_amax(plan, channel_amax[candidate.tensor_name]), alpha, names)
            smoothed += 1
            log.debug("SmoothQuant: '%s' smoothed (s in [%.3g, %.3g]): %s", candidate.tensor_name,
                      scales.min(), scales.max(), candidate.reason)
    log.info("SmoothQuant (alpha %.2f): %d of %d linear-layer inputs smoothed", alpha, smoothed, len(plans))
    return graph
