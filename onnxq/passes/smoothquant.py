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

Where 1/s goes (folded into the producer, or an explicit per-channel Mul before the linear readers)
is decided by `onnxq.passes.smooth_sites`. alpha is one number for every tensor or one per tensor
(`onnxq.steps.smoothquant` measures it per layer).

Only new `gs.Constant`s are created; existing constants, which other nodes or the caller's graph may
share, are never changed. Arithmetic is float64, cast back to each constant's dtype. Only the main
graph is rewritten.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.names import unique_name
from onnxq.errors import CalibrationError, ConfigError
from onnxq.passes.core import graph_pass
from onnxq.passes.smooth_sites import SmoothCandidate, SmoothSite, smooth_sites, smoothquant_candidates

__all__ = ["SmoothCandidate", "smoothquant", "smoothquant_candidates", "smooth_scales", "check_alpha", "MIN_SCALE",
           "MAX_SCALE", "site_weight_amax"]

log = logging.getLogger(__name__)

#: The range each per-channel smoothing scale is clipped to.
MIN_SCALE = 1e-5
MAX_SCALE = 1e5


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


def site_weight_amax(plan: SmoothSite) -> np.ndarray:
    """max |W[j, :]| per input channel j over every linear reader's current weight."""
    per_reader = []
    for node, axis in plan.readers:
        weight = np.abs(np.asarray(node.inputs[1].values, dtype=np.float64))
        per_reader.append(np.moveaxis(weight, axis, -1).reshape(-1, plan.channels).max(axis=0))
    return np.max(per_reader, axis=0)


def _restore(graph: gs.Graph, plan: SmoothSite, scales: np.ndarray, names: set[str]) -> None:
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


def _divide_explicitly(graph: gs.Graph, plan: SmoothSite, scales: np.ndarray, names: set[str]) -> None:
    """X' = Mul(X, 1/s), read by the linear readers; the other readers keep X."""
    tensor = plan.tensor
    smoothed = gs.Variable(unique_name(f"{tensor.name}_smoothed", names), dtype=tensor.dtype, shape=tensor.shape)
    dtype = tensor.dtype if tensor.dtype is not None else np.float32
    inverse = gs.Constant(unique_name(f"{tensor.name}_smooth_inverse", names), (1.0 / scales).astype(dtype))
    graph.nodes.append(gs.Node("Mul", unique_name(f"{tensor.name}/smoothquant_divide", names),
                               inputs=[tensor, inverse], outputs=[smoothed]))
    for node, _ in plan.readers:
        node.inputs[0] = smoothed


def _apply(graph: gs.Graph, plan: SmoothSite, act_amax: np.ndarray, alpha: float, names: set[str]) -> np.ndarray:
    """Fold s into the producer (or divide by an explicit Mul) and into the readers' weights; returns s."""
    scales = smooth_scales(act_amax, site_weight_amax(plan), alpha)
    if plan.candidate.explicit:
        _divide_explicitly(graph, plan, scales, names)
    for fold in plan.folds:
        values = np.asarray(fold.node.inputs[fold.index].values)
        _replace_constant(fold.node, fold.index, _rescaled(values, scales, fold.axis, fold.divide), names)
    for node, axis in plan.readers:
        _replace_constant(node, 1, _rescaled(np.asarray(node.inputs[1].values), scales, axis, False), names)
    if plan.candidate.restored:
        _restore(graph, plan, scales, names)
    return scales


def _checked_amax(plan: SmoothSite, amax: np.ndarray) -> np.ndarray:
    values = np.asarray(amax, dtype=np.float64).reshape(-1)
    if values.size != plan.channels:
        raise CalibrationError(f"tensor '{plan.candidate.tensor_name}': {values.size} channel ranges given, "
                               f"its readers have {plan.channels} input channels")
    return values


@graph_pass
def smoothquant(graph: gs.Graph, channel_amax: Mapping[str, np.ndarray], *,
                alpha: float | Mapping[str, float] = 0.5, compensate: bool = True, explicit: bool = False) -> gs.Graph:
    """Smooth every activation of `smoothquant_candidates` that has ranges in `channel_amax`.

    Args:
        graph: the prepared float graph (the pass works on a copy).
        channel_amax: tensor name -> max |x| per channel of the last axis (`channel_absmax`),
            measured on this graph before smoothing.
        alpha: migration strength, 0 < alpha < 1: one for every tensor, or tensor name -> alpha (a
            tensor missing from the mapping is left alone).
        compensate: give readers other than the linear layers (a residual Add, a graph output) X back
            through a Mul by s; when False such tensors are left alone (or divided explicitly).
        explicit: where no producer can absorb 1/s, insert a per-channel Mul by 1/s before the
            linear readers (`onnxq.passes.smooth_sites`); when False such tensors are left alone.

    Returns:
        The rewritten graph; its float outputs equal the input graph's up to rounding.

    Raises:
        ConfigError: an alpha is not in (0, 1).
        CalibrationError: a range vector's length differs from the tensor's channel count.
    """
    alphas = ({name: check_alpha(value) for name, value in alpha.items()} if isinstance(alpha, Mapping)
              else None)
    single = check_alpha(alpha) if alphas is None else 0.0
    names = set(graph.tensors()) | {node.name for node in graph.nodes}
    sites = smooth_sites(graph, compensate=compensate, explicit=explicit)
    smoothed = 0
    for candidate, site in sites:
        name = candidate.tensor_name
        if site is None:
            log.info("SmoothQuant: '%s' left alone: %s", name, candidate.reason)
        elif alphas is not None and name not in alphas:
            log.debug("SmoothQuant: '%s' left alone: no alpha given for it", name)
        elif name not in channel_amax:
            log.warning("SmoothQuant: '%s' left alone: no channel ranges given for it", name)
        else:
            strength = single if alphas is None else alphas[name]
            scales = _apply(graph, site, _checked_amax(site, channel_amax[name]), strength, names)
            smoothed += 1
            log.debug("SmoothQuant: '%s' smoothed (alpha %.2f, s in [%.3g, %.3g]): %s", name, strength,
                      scales.min(), scales.max(), candidate.reason)
    log.info("SmoothQuant: %d of %d linear-layer inputs smoothed", smoothed, len(sites))
    return graph
