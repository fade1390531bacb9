"""SmoothQuant's migration strength chosen per layer by the error it leaves, measured on calibration rows.

For one smoothable activation X (`onnxq.passes.smooth_sites`) read by linear layers W_c, and a
candidate alpha, the scales s follow `smooth_scales` (Xiao et al., "SmoothQuant", ICML 2023, eq. 4);
then, on an evenly spaced sample of X's rows from the calibration data (`channel_profiles`):

    error(alpha) = sum_c || Q(X / s) Q_c(diag(s) W_c) - X W_c ||^2  /  sum_c || X W_c ||^2

Q is the target's per-tensor activation scheme over the range X / s takes (per-channel min and max
divided by s: what max calibration gives), Q_c per-output-channel symmetric INT8 of the rescaled
weight, as onnxq writes them. The measure is held out: the rows are split in two interleaved halves;
s and the range come from one half, the error from the other, and both ways round are summed.
Smoothing makes every channel's range about as wide as the tensor's, so a channel that goes beyond
its calibrated maximum on new data is clipped where it had headroom before: on per-sample features
(a CNN's pooled features before its classifier) that costs more than smoothing saves, and only a
held-out measure sees it (in-sample, EfficientNet-Lite0's head measured 60 % less error with alpha
0.7, and its output cosine on new photos fell from 0.959 to 0.946). "Not smoothed" (s = 1) is a
candidate too. The alpha with the least error wins; where 1/s needs an explicit Mul (no producer absorbs it), the
Mul must cut the error by `EXPLICIT_MIN_GAIN`, on a layer whose error is at least `EXPLICIT_MIN_ERROR`, to be
worth its run time; else the tensor is left alone.
This is a local measure (each layer on float inputs): cheap, a few matrix products per candidate,
and independent between tensors, since smoothing leaves every float output as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxq.calib.channel_absmax import ChannelProfile
from onnxq.lower.scales import ActivationScheme
from onnxq.passes.smooth_sites import SmoothSite, weight_out_axis
from onnxq.passes.smoothquant import site_weight_amax, smooth_scales

__all__ = ["ALPHAS", "EXPLICIT_MIN_ERROR", "EXPLICIT_MIN_GAIN", "FOLDED_MIN_GAIN", "MIN_ROWS", "AlphaChoice", "choose_alpha"]

#: The migration strengths tried per layer.
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: Rows a measurement needs (two halves of at least 8).
MIN_ROWS = 16
#: Relative error decrease a smoothing folded into the producer must bring (it costs nothing at run time).
FOLDED_MIN_GAIN = 0.02
#: Relative error decrease an explicit per-channel Mul must bring (it is one more op at run time).
EXPLICIT_MIN_GAIN = 0.10
#: The unsmoothed error (SQNR 30 dB) below which an explicit Mul is not worth its run time whatever it
#: saves: such a layer adds little to the model's error (EfficientNet-Lite0's and PP-OCR's classifier
#: inputs, 3e-4 and 4e-6, measured 40-45 % less error smoothed and no better outputs on new data).
EXPLICIT_MIN_ERROR = 1e-3


@dataclass(frozen=True)
class AlphaChoice:
    """One activation's migration strength and why.

    Attributes:
        tensor: the activation X.
        alpha: the chosen strength, or None (left as it is).
        error: the relative error of the linear readers' outputs with the choice (see module docstring).
        unsmoothed_error: the same without smoothing.
        explicit: 1/s goes into a new Mul (no producer absorbs it).
        reason: what was measured.
    """

    tensor: str
    alpha: float | None
    error: float
    unsmoothed_error: float
    explicit: bool
    reason: str


def choose_alpha(site: SmoothSite, profile: ChannelProfile, scheme: ActivationScheme,
                 alphas: Sequence[float] = ALPHAS) -> AlphaChoice:
    """The alpha (or None) with the least held-out error on `profile.rows`, as the module docstring says."""
    name, explicit = site.candidate.tensor_name, site.candidate.explicit
    rows = profile.rows.astype(np.float64)
    if len(rows) < MIN_ROWS:
        return AlphaChoice(name, None, float("nan"), float("nan"), explicit,
                           f"left alone: {len(rows)} usable rows, fewer than the {MIN_ROWS} the measurement needs")
    weights = [(np.asarray(node.inputs[1].values, dtype=np.float64), axis, weight_out_axis(node))
               for node, axis in site.readers]
    weight_amax = site_weight_amax(site)
    # (fit half, checked half, the float outputs of the checked half per reader): computed once, not per alpha
    folds = [(fit, check, [check @ _as_matrix(w, axis) for w, axis, _ in weights])
             for fit, check in ((rows[0::2], rows[1::2]), (rows[1::2], rows[0::2]))]
    signal = sum(float(np.sum(want**2)) for _, _, wants in folds for want in wants)

    def error(alpha: float | None) -> float:
        noise = 0.0
        for fit, check, wants in folds:
            low, high = fit.min(axis=0), fit.max(axis=0)
            scales = (np.ones(site.channels) if alpha is None
                      else smooth_scales(np.maximum(np.abs(low), np.abs(high)), weight_amax, alpha))
            x = _fake_quant_activation(check / scales, low / scales, high / scales, scheme, name)
            for (w, axis, out_axis), want in zip(weights, wants):
                scaled = w * scales.reshape([-1 if i == axis % w.ndim else 1 for i in range(w.ndim)])
                noise += float(np.sum((x @ _as_matrix(_fake_quant_weight(scaled, out_axis), axis) - want) ** 2))
        return noise / signal if signal > 0 else noise

    plain = error(None)
    if explicit and plain < EXPLICIT_MIN_ERROR:
        return AlphaChoice(name, None, plain, plain, explicit,
                           f"left alone: error {plain:.3g} unsmoothed, below the {EXPLICIT_MIN_ERROR:g} an explicit Mul "
                           "must fix to be worth its run time")
    tried = {alpha: error(alpha) for alpha in alphas}
    best = min(tried, key=tried.__getitem__)
    needed = EXPLICIT_MIN_GAIN if explicit else FOLDED_MIN_GAIN
    listed = ", ".join(f"{alpha:g}: {value:.3g}" for alpha, value in tried.items())
    where = "an explicit Mul" if explicit else "the producer"
    if not tried[best] < plain * (1.0 - needed):
        return AlphaChoice(name, None, plain, plain, explicit,
                           f"left alone: error {plain:.3g} unsmoothed, best alpha {best:g} gives {tried[best]:.3g}, "
                           f"less than the {needed:.0%} gain smoothing through {where} needs (tried {listed})")
    return AlphaChoice(name, best, tried[best], plain, explicit,
                       f"alpha {best:g}: error {plain:.3g} -> {tried[best]:.3g}, 1/s through {where} "
                       f"(tried {listed})")


def _as_matrix(weight: np.ndarray, row_axis: int) -> np.ndarray:
    """[K, everything else]: the weight as one matrix the rows multiply."""
    return np.moveaxis(weight, row_axis % weight.ndim, 0).reshape(weight.shape[row_axis], -1)


def _fake_quant_activation(x: np.ndarray, low: np.ndarray, high: np.ndarray, scheme: ActivationScheme,
                           name: str) -> np.ndarray:
    """x quantized and dequantized per tensor over the range [min(low), max(high)]."""
    lo, hi = float(np.min(low)), float(np.max(high))
    params = scheme.params(name, lo, hi, max(abs(lo), abs(hi)))
    info = np.iinfo(params.zero_point.dtype)
    scale, zero = float(params.scale), float(params.zero_point)
    return (np.clip(np.rint(x / scale) + zero, info.min, info.max) - zero) * scale


def _fake_quant_weight(weight: np.ndarray, out_axis: int) -> np.ndarray:
    """Symmetric INT8 per output channel, as `onnxq.lower.scales.weight_scales` and `quantize_weight`."""
    axis = out_axis % weight.ndim
    amax = np.abs(weight).max(axis=tuple(i for i in range(weight.ndim) if i != axis), keepdims=True)
    scale = np.maximum(amax, 1e-30) / 127.0
    return np.clip(np.rint(weight / scale), -128, 127) * scale
