"""Cross-layer equalization (CLE): rescale consecutive convolutions so their channel ranges balance.

Nagel, van Baalen, Blankevoort and Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, section 4.1. For y = f(W1 x + b1), z = W2 y + b2 with f acting on each channel and
positively homogeneous (f(s x) = s f(x) for every s > 0), and any S = diag(s), s > 0,

    W1' = S^-1 W1,  b1' = S^-1 b1  (output channel i of W1 divided by s_i)
    W2' = W2 S                     (every weight that reads input channel i multiplied by s_i)

computes the same z. With r1_i = max |W1[i, ...]| (the range of W1's output channel i) and r2_i the range
of W2's input channel i (max over every Conv that reads the tensor), the paper's scale

    s_i = sqrt(r1_i * r2_i) / r2_i

leaves both ranges at sqrt(r1_i * r2_i): equal, their product unchanged. A Conv can be the second layer
of one pair and the first of the next (expand -> depthwise -> project), so pairs are equalized in sweeps,
in graph order, until a whole sweep moves no scale by more than `tolerance` (the paper: "until
convergence"; 8 sweeps on the PP-OCR classifier, 22 on models/separable_relu_cnn, milliseconds). Scales are
accumulated on float64 copies and written once, as new constants of the weights' dtype: float outputs
change only by that rounding. A channel whose r1 or r2 is 0 or not finite keeps s_i = 1.

What may lie between: a chain of single-reader nodes positively homogeneous per channel (Relu,
LeakyRelu, PRelu with a constant slope, Clip(x, 0) without an upper bound, MaxPool, AveragePool, their
global forms, Identity), read at the end by Convs alone (as data input, constant weights). Left alone,
each with a reason:

  * linear pairs (nothing between), unless `linear_pairs`: exact, but measured to lower INT8 accuracy
    (EfficientNet-Lite0, its only 2 equalizable pairs: -0.2 to -0.7 dB logit SQNR for trt and ort-cpu,
    max and mse; PP-OCR's one linear pair: no gain). With per-channel INT8 weights W1's range is free,
    and on these pairs every s_i >= 1: the activation's channels only shrink under one per-tensor scale.
  * Clip(x, 0, 6) (ReLU6): Clip(y, 0, 6) / s = Clip(y / s, 0, 6 / s), so once the Clip reads y / s its
    bound would have to be 6 / s_i per channel, which Clip (scalar bounds) cannot express. The exact rewrite, Relu then Min by a constant
    6 / s_i (`bound_clips`), costs a Min after the Conv that neither TensorRT's Conv+ReLU6 fusion nor
    ORT's QLinearConv absorbs, and the tensor's one per-tensor INT8 range then spans the largest 6 / s_i:
    on EfficientNet-Lite0 it lowered logit SQNR by about 5 dB (trt) and 4 dB (ort-cpu); keeping s_i >= 1
    (bounds only shrink) still lost 0.6 to 2.6 dB. Equalizing only where the clip is never reached would
    hold on the calibration data alone. So not by default.
  * HardSwish (x * relu6(x + 3) / 6), HardSigmoid, Sigmoid, Tanh, ...: offsets and bounds do not scale.
  * outputs reaching anything but Convs (a residual Add, a squeeze-and-excitation Mul, a graph output).

Bias absorption (the paper's section 4.1.1) is not done. Only the main graph is rewritten; existing
constants are never changed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.graph.names import NameSource
from onnxq.passes.core import graph_pass

__all__ = ["EqualizationPair", "EqualizationPlan", "equalization_plan", "equalize", "equalization_scales",
           "channel_ranges", "DEFAULT_SWEEPS", "DEFAULT_TOLERANCE"]

log = logging.getLogger(__name__)

#: At most this many sweeps over the pairs.
DEFAULT_SWEEPS = 50
#: A sweep whose every scale lies within 1 +- tolerance ends the iteration.
DEFAULT_TOLERANCE = 1e-4
_MAX_CHAIN = 4
_DEFAULT_DOMAINS = (None, "", "ai.onnx")
_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                          "GlobalMaxPool", "Identity", "Clip"})
_ELEMENTWISE = frozenset({"HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
                          "Softsign", "Gelu", "Mish", "Erf", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log"})


@dataclass(frozen=True)
class EqualizationPair:
    """A Conv whose output channels could be rescaled against the Convs that read them, and the decision.

    Attributes:
        producer: the Conv W1.
        between: the nodes between W1 and its readers, as "Op 'name'" (empty: a linear pair).
        consumers: the Convs W2 that read the tensor (empty when it is not a pair).
        channels: W1's output channels.
        equalized: whether `equalize` rescales it.
        kind: "equalized"; "not homogeneous" (1/s cannot pass an activation between); "linear" (a linear
            pair, left alone unless `linear_pairs`); "weights" (a bias that is not a constant, a channel
            count that differs); "not a pair" (the output reaches something other than Convs).
        reason: what was done, or why not.
        blocked_by: for "not homogeneous", the activation that stops it, e.g. "HardSwish", "Clip [0, 6]".
        scale_min, scale_max: the range of the accumulated s_i (1 when not equalized).
    """

    producer: str
    between: tuple[str, ...]
    consumers: tuple[str, ...]
    channels: int
    equalized: bool
    kind: str
    reason: str
    blocked_by: str = ""
    scale_min: float = 1.0
    scale_max: float = 1.0

    @property
    def is_pair(self) -> bool:
        """True when W1's output reaches Convs alone (equalized or not)."""
        return bool(self.consumers)


@dataclass(frozen=True)
class EqualizationPlan:
    """Every Conv's decision (in graph order) and how the iteration ended."""

    pairs: tuple[EqualizationPair, ...]
    sweeps: int
    converged: bool

    @property
    def equalized(self) -> tuple[EqualizationPair, ...]:
        return tuple(p for p in self.pairs if p.equalized)


@dataclass(eq=False)
class _Layer:
    """A float64 working copy of one Conv's weight and bias."""

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None
    group: int
    changed: bool = False


@dataclass(eq=False)
class _Pair:
    producer: _Layer
    consumers: tuple[_Layer, ...]
    clips: tuple[gs.Node, ...]  # Clips with an upper bound, bounded per channel (bound_clips only)
    total: np.ndarray


def _float_constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    return values if values.dtype.kind == "f" else None


def _optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if index < len(node.inputs) and node.inputs[index].name else None


def _clip_bounds(node: gs.Node) -> tuple[float | None, float | None] | None:
    """(low, high) of a Clip, None for an absent or infinite bound; None when a bound is not a constant scalar."""
    bounds: list[float | None] = []
    for index, attr in ((1, "min"), (2, "max")):
        tensor = _optional_input(node, index)
        values = _float_constant(tensor)
        if tensor is not None and (values is None or values.size != 1):
            return None
        value = node.attrs.get(attr) if tensor is None else float(values.reshape(-1)[0])
        bounds.append(None if value is None or math.isinf(value) else float(value))
    return bounds[0], bounds[1]


def _describe(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'"


def _conv_weight(node: gs.Node) -> np.ndarray | None:
    if node.op != "Conv" or node.domain not in _DEFAULT_DOMAINS or len(node.inputs) < 2:
        return None
    weight = _float_constant(node.inputs[1])
    return weight if weight is not None and weight.ndim >= 3 else None


def _per_channel(node: gs.Node, tensor: gs.Tensor) -> bool:
    """True for a one-output node that works on each channel of `tensor`, its only variable input."""
    if node.domain not in _DEFAULT_DOMAINS or len(node.outputs) != 1 or not node.inputs \
            or node.inputs[0] is not tensor or node.op not in _HOMOGENEOUS | _ELEMENTWISE:
        return False
    return all(isinstance(t, gs.Constant) or t.name == "" for t in node.inputs[1:])


def _why_not_homogeneous(node: gs.Node, bound_clips: bool) -> str | None:
    """None when 1/s passes through `node` exactly (with `bound_clips`, a Clip(0, hi) made per-channel)."""
    if node.op != "Clip":
        return None if node.op in _HOMOGENEOUS else \
            f"{_describe(node)} is not positively homogeneous: f(x/s) != f(x)/s"
    bounds = _clip_bounds(node)
    if bounds is None:
        return f"{_describe(node)}: its bounds are not constant scalars"
    low, high = bounds
    if low not in (None, 0.0):
        return f"{_describe(node)}: a lower bound of {low:g} does not scale with x"
    if high is not None and not bound_clips:
        return (f"{_describe(node)} [0, {high:g}] is not positively homogeneous: its bound {high:g} would have to "
                f"become {high:g}/s_i per channel, which Clip cannot express")
    return None


def _follow(producer: gs.Node, outputs: frozenset[str]) -> tuple[list[gs.Node], list[gs.Node], str]:
    """(nodes between, the Convs that read the last tensor, why it is no pair or "") from a Conv's output."""
    tensor, between = producer.outputs[0], []
    while True:
        if tensor.name in outputs:
            return between, [], f"'{tensor.name}' is a graph output"
        readers = list({id(n): n for n in tensor.outputs}.values())
        if len(readers) == 1 and len(between) < _MAX_CHAIN and _per_channel(readers[0], tensor):
            between.append(readers[0])
            tensor = readers[0].outputs[0]
            continue
        if not readers:
            return between, [], f"nothing reads '{tensor.name}'"
        others = [n for n in readers if _conv_weight(n) is None or n.inputs[0] is not tensor]
        if others:
            names = ", ".join(_describe(n) for n in others[:3]) + (", ..." if len(others) > 3 else "")
            return between, [], f"'{tensor.name}' is read by {names}, which cannot absorb a per-channel scale"
        return between, readers, ""


def _in_channels(node: gs.Node) -> int:
    weight = _conv_weight(node)
    assert weight is not None
    return int(weight.shape[1]) * int(node.attrs.get("group", 1))


def _layer(node: gs.Node, layers: dict[int, _Layer]) -> _Layer:
    if id(node) not in layers:
        weight, bias = _conv_weight(node), _float_constant(_optional_input(node, 2))
        assert weight is not None
        layers[id(node)] = _Layer(node, weight.astype(np.float64),
                                  None if bias is None else bias.astype(np.float64).reshape(-1),
                                  int(node.attrs.get("group", 1)))
    return layers[id(node)]


def _decide(node: gs.Node, outputs: frozenset[str], linear_pairs: bool, bound_clips: bool,
            layers: dict[int, _Layer]) -> tuple[EqualizationPair, _Pair | None]:
    """The decision for Conv `node` (constant weight) and, when equalized, its working pair."""
    between, readers, no_pair = _follow(node, outputs)
    channels = int(np.asarray(node.inputs[1].values).shape[0])
    names, consumers = tuple(_describe(n) for n in between), tuple(n.name for n in readers)

    def left(kind: str, why: str, blocked_by: str = "") -> tuple[EqualizationPair, None]:
        return EqualizationPair(node.name, names, consumers, channels, False, kind, why, blocked_by), None

    if no_pair:
        return left("not a pair", no_pair)
    blocked = [(n, why) for n in between if (why := _why_not_homogeneous(n, bound_clips)) is not None]
    if blocked:
        activation, why = blocked[0]
        bounds = _clip_bounds(activation) if activation.op == "Clip" else None
        label = f"Clip [{bounds[0] or 0:g}, {bounds[1]:g}]" if bounds and bounds[1] is not None else activation.op
        return left("not homogeneous", why, label)
    if not between and not linear_pairs:
        return left("linear", "a linear pair (nothing between the Convs): exact, but measured to lower INT8 "
                              "accuracy, so left alone unless linear pairs are asked for")
    bias = _optional_input(node, 2)
    if bias is not None and (_float_constant(bias) is None or np.asarray(bias.values).size != channels):
        return left("weights", f"the bias of {_describe(node)} is not a float constant of {channels} values")
    wrong = [n for n in readers if _in_channels(n) != channels]
    if wrong:
        return left("weights", f"{_describe(wrong[0])} reads {_in_channels(wrong[0])} channels, not {channels}")
    clips = tuple(n for n in between if n.op == "Clip" and (_clip_bounds(n) or (None, None))[1] is not None)
    pair = _Pair(_layer(node, layers), tuple(_layer(n, layers) for n in readers), clips, np.ones(channels))
    why = f"balanced against {', '.join(consumers)}" + (f" through {', '.join(names)}" if names else " (linear)")
    if clips:
        why += f"; {len(clips)} Clip upper bound(s) made per-channel (Relu, then Min by bound/s)"
    return EqualizationPair(node.name, names, consumers, channels, True, "equalized", why), pair


def channel_ranges(weight: np.ndarray, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(max |W| per output channel, max |W| per input channel) of a Conv weight [C_out, C_in / group, ...]."""
    values = np.abs(np.asarray(weight, dtype=np.float64))
    c_out, per_group = values.shape[:2]
    out_range = values.reshape(c_out, -1).max(axis=1)
    in_range = values.reshape(group, c_out // group, per_group, -1).max(axis=(1, 3)).reshape(-1)
    return out_range, in_range


def equalization_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s_i = sqrt(r1_i * r2_i) / r2_i (Nagel et al., 2019, section 4.1); 1 where a range is 0 or not finite."""
    r1, r2 = np.asarray(r1, dtype=np.float64), np.asarray(r2, dtype=np.float64)
    usable = np.isfinite(r1) & np.isfinite(r2) & (r1 > 0) & (r2 > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(usable, np.sqrt(r1 * r2) / r2, 1.0)


def _step(pair: _Pair) -> float:
    """Equalize one pair on the working copies; returns max |s_i - 1|."""
    producer = pair.producer
    r1 = channel_ranges(producer.weight, producer.group)[0]
    r2 = np.max([channel_ranges(c.weight, c.group)[1] for c in pair.consumers], axis=0)
    scales = equalization_scales(r1, r2)
    producer.weight /= scales.reshape((-1,) + (1,) * (producer.weight.ndim - 1))
    if producer.bias is not None:
        producer.bias /= scales
    for consumer in pair.consumers:
        weight, group = consumer.weight, consumer.group
        grouped = weight.reshape(group, weight.shape[0] // group, weight.shape[1], -1)  # a view: scaled in place
        grouped *= scales.reshape(group, 1, weight.shape[1], 1)
    for layer in (producer, *pair.consumers):
        layer.changed = True
    pair.total = pair.total * scales
    return float(np.max(np.abs(scales - 1.0), initial=0.0))


def _plan(graph: gs.Graph, sweeps: int, tolerance: float, linear_pairs: bool,
          bound_clips: bool) -> tuple[EqualizationPlan, list[_Pair]]:
    if sweeps < 1 or not tolerance > 0:
        raise ValueError(f"equalization needs sweeps >= 1 and tolerance > 0, got {sweeps} and {tolerance}")
    outputs, layers = frozenset(t.name for t in graph.outputs), {}
    found = [_decide(node, outputs, linear_pairs, bound_clips, layers) for node in graph.nodes
             if _conv_weight(node) is not None]
    work = [pair for _, pair in found if pair is not None]
    ran, converged = 0, True
    while work and ran < sweeps:
        ran += 1
        if max(_step(pair) for pair in work) <= tolerance:
            break
    else:
        converged = not work
    pairs = tuple(decision if pair is None else replace(
        decision, scale_min=float(pair.total.min(initial=1.0)), scale_max=float(pair.total.max(initial=1.0)),
        reason=f"{decision.reason} (s in [{pair.total.min(initial=1.0):.3g}, {pair.total.max(initial=1.0):.3g}])")
        for decision, pair in found)
    return EqualizationPlan(pairs, ran, converged), work


def equalization_plan(graph: gs.Graph, *, sweeps: int = DEFAULT_SWEEPS, tolerance: float = DEFAULT_TOLERANCE,
                      linear_pairs: bool = False, bound_clips: bool = False) -> EqualizationPlan:
    """Every Conv with a constant weight: whether `equalize` rescales it against its readers and why, with
    the scales it would use (read only: the graph is not changed).

    Args:
        graph: the prepared float graph (BatchNormalization already folded into the Convs).
        sweeps, tolerance, linear_pairs, bound_clips: as in `equalize`.
    """
    return _plan(graph, sweeps, tolerance, linear_pairs, bound_clips)[0]


def _bound_clip(graph: gs.Graph, clip: gs.Node, scales: np.ndarray, rank: int, names: NameSource) -> None:
    """Clip(x, 0, hi) -> Min(Relu(x), hi / s) per channel (x is already divided by s); the Relu takes the
    Clip's name. Without a lower bound: Min(x, hi / s)."""
    low, high = _clip_bounds(clip) or (None, None)
    assert high is not None
    source, result = clip.inputs[0], clip.outputs[0]
    values = (high / scales).reshape((-1,) + (1,) * (rank - 2)).astype(result.dtype or np.float32)
    bound = gs.Constant(names(f"{clip.name}.bound"), values)
    clip.inputs.clear()
    clip.outputs.clear()
    graph.nodes.remove(clip)
    if low is not None:
        rectified = gs.Variable(names(f"{clip.name}_relu_output"), dtype=result.dtype, shape=result.shape)
        graph.nodes.append(gs.Node("Relu", clip.name, inputs=[source], outputs=[rectified]))
        source = rectified
    graph.nodes.append(gs.Node("Min", names(f"{clip.name}/bound"), inputs=[source, bound], outputs=[result]))


@graph_pass
def equalize(graph: gs.Graph, *, sweeps: int = DEFAULT_SWEEPS, tolerance: float = DEFAULT_TOLERANCE,
             linear_pairs: bool = False, bound_clips: bool = False) -> gs.Graph:
    """Cross-layer equalization of every pair `equalization_plan` marks equalized.

    Args:
        graph: the prepared float graph (the pass works on a copy).
        sweeps: at most this many sweeps over the pairs.
        tolerance: stop after a sweep whose scales all lie within 1 +- tolerance.
        linear_pairs: also equalize Conv -> Conv pairs with nothing between (off: measured worse).
        bound_clips: also equalize across Clip(x, 0, hi) (ReLU6), rewritten as Relu, then Min by the
            per-channel bound hi / s_i (exact; off: measured worse, see the module docstring).

    Returns:
        The rewritten graph; its float outputs equal the input graph's up to float rounding.
    """
    plan, work = _plan(graph, sweeps, tolerance, linear_pairs, bound_clips)
    names = NameSource(graph)
    layers = {id(layer): layer for pair in work for layer in (pair.producer, *pair.consumers)}
    for layer in layers.values():
        for index, values in ((1, layer.weight), (2, layer.bias)):
            if layer.changed and values is not None:
                old = layer.node.inputs[index]
                layer.node.inputs[index] = gs.Constant(names(f"{old.name}_equalized"),
                                                       values.astype(np.asarray(old.values).dtype))
    for pair in work:
        for clip in pair.clips:
            _bound_clip(graph, clip, pair.total, pair.producer.weight.ndim, names)
    log.info("equalization: %d of %d Conv pairs equalized in %d sweep(s)%s", len(plan.equalized),
             sum(p.is_pair for p in plan.pairs), plan.sweeps, "" if plan.converged else " (not converged)")
    return graph
