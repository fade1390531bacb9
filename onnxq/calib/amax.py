"""Activation amax from a |x| `Histogram`: max, percentile, entropy (KL divergence) and MSE.

Every method is a pure function of the histogram, so it inherits the histogram's independence of
batching and order. Shared conventions (w = bin width, "used" = bins up to the last non-empty one):
* a histogram without a non-zero value gives 0.0 (the caller floors it, `quant.scales.AMAX_FLOOR`);
* the result never exceeds `h.amax`: no value lies above it, so a larger amax only wastes resolution.
  Candidates `i * w` past it are capped to it (the last used bin's right edge is within one bin of it);
* entropy and MSE search candidates i = start_bin, start_bin + stride, ..., used (inclusive). Fewer
  used bins than start_bin means the histogram is too coarse to search below its maximum: they return
  `h.amax`, i.e. fall back to max calibration.

Percentile (pytorch_quantization calib/histogram.py, `_compute_amax_percentile`): the first bin k whose
cumulative count reaches p% of the values (exact zeros included, as skip_zeros=False there); amax =
its RIGHT edge (k + 1) * w, where pytorch_quantization takes the left edge k * w. The right edge keeps
every value of that bin inside [-amax, amax], so at most (100 - p)% of the values are clipped, as the
name promises; the left edge may clip the whole bin, which with a coarse bin is far more than 100 - p %.
The p% rank is computed exactly from the decimal p (99.99% of 10000 values is 9999, not 10000).

Entropy: the KL-divergence search of TensorRT's entropy calibrator (GTC 2017 S7310, "8-bit Inference
with TensorRT") with the refinements of pytorch_quantization (`_compute_amax_entropy`):
* bins[0] := bins[1] (pytorch_quantization: the zero bin of ReLU outputs would dominate P). Exact zeros
  are already outside `counts`; replacing bin 0 as well keeps the result identical to pytorch's on the
  same grid and also flattens a near-zero (non-exact) spike;
* for candidate i: P = bins[0:i] with the tail sum(bins[i:]) added to P[i-1]; Q = bins[0:i] merged into
  `num_quantized_bins` chunks (bin j in chunk floor(j * nq / i), the exact integer form of
  pytorch's digitize over linspace(0, i, nq + 1)), each chunk's sum spread evenly over its non-empty
  bins, empty bins 0 (TensorRT slides); D(i) = KL(P || Q) = sum p ln(p / q) of the normalised P and Q,
  natural log, +inf where q = 0 < p (bin i-1 empty while the tail is not), no smoothing;
* i* = the LAST argmin (pytorch_quantization); amax = i* * w, the right edge of the kept range
  (TensorRT's slides use the bin centre (i* - 0.5) * w);
* `num_quantized_bins` = L + 1 levels of |x| (128 for symmetric INT8; 256 for a one-signed uint8
  range, whose search then starts at bin 256), see `ActivationScheme.levels`.
* candidates keep at least half of the values unclipped (exact zeros count as kept): i >= the bin of
  the median |x|, + 1. This is onnxq's, not TensorRT's. KL compares normalised shapes, so clipping
  every value of a band away from zero (a pooled output, all in [0.50, 0.72]) into the last kept bin
  makes P a point mass that its Q matches exactly: D = 0, the best score, for a range at the band's
  lower edge that quantizes every value to one (issue 12; tests/regressions/test_narrow_band_ranges.py).
  On the distributions entropy is meant for (a peak at 0 and a tail) the minimum lies far above the
  median, so the floor does not bind there.
Vectorised with prefix sums: with u = bins / N, t the tail share, S = 1 - t and U_c, n_c the share and
non-empty-bin count of chunk c,
    D(i) = sum_{j<i-1} u_j ln u_j + p_last ln p_last - sum_c U_c ln(U_c / n_c) - t ln(U_c' / n_c') + ln S
(c' = the chunk of bin i-1, p_last = u_{i-1} + t), i.e. O(#candidates * nq) array work instead of the
O(#bins^2) Python loop of the reference (about 2 s for 2048 bins).

MSE (after pytorch_quantization `_compute_amax_mse`, but with the deployment quantizer so that amax
fits what the target will run): the expected squared error of fq_a(y) = clamp(rne(y / s), -L, L) * s,
s = a / L with L the target's levels on |x| (`ActivationScheme.levels`: 127 for symmetric INT8, 255
for a one-signed uint8 range; ONNX QuantizeLinear/DequantizeLinear; on |x| only the clamp at L applies), with each
bin's count spread uniformly over the bin:
    E(a) = sum_j counts_j / w * integral over [j w, (j + 1) w) of (fq_a(y) - y)^2 dy
         = s^3 / w * sum_j counts_j * (g(u_j / s) - g(l_j / s)),   g(t) = k / 12 + (t - k)^3 / 3,
k = min(rint(t), L): g is the integral of (fq(t) - t)^2 from 0 in units of s (each rounding cell adds
1/12, the clipped tail adds (t - L)^3 / 3), so E is exact for the piecewise-uniform model and needs
no case analysis. pytorch_quantization instead puts a bin's values at its centre; as a moves, the
rounding boundaries slide across those fixed centres and E(a) ripples: on a Laplace the centre model
lands 3 to 15 bins from the analytic optimum (up to 0.3 % excess error), the in-bin integral within 2
(measured; tests/calib/test_amax.py). Exact zeros add 0 for every a and are left out. Candidates are
the bin edges i * w (pytorch_quantization: the centres); the FIRST argmin wins, as there.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from onnxq.errors import ConfigError
from onnxq.calib.histogram import Histogram

__all__ = ["INT8_LEVELS", "max_amax", "percentile_amax", "entropy_amax", "mse_amax"]

INT8_LEVELS = 127  # symmetric INT8: s = amax / 127, q in [-128, 127]
_BLOCK = 1 << 16  # candidates x edges (or chunks) per block: 0.5 MB float64 temporaries, in cache


def max_amax(h: Histogram) -> float:
    """max |x| over every finite, non-sentinel value (0.0 when none is non-zero)."""
    return float(h.amax)


def percentile_amax(h: Histogram, percentile: float = 99.99) -> float:
    """Right edge of the first bin whose cumulative count reaches `percentile` % of the values."""
    if not 0.0 <= percentile <= 100.0:
        raise ConfigError(f"percentile must be in [0, 100], got {percentile}")
    if h.exponent is None:
        return 0.0
    cumulative = np.cumsum(h.counts) + h.zeros  # exact zeros sit in bin 0
    rank = math.ceil(Fraction(repr(float(percentile))) * int(cumulative[-1]) / 100)
    k = int(np.searchsorted(cumulative, rank, side="left"))
    return min((k + 1) * h.bin_width, float(h.amax))


def entropy_amax(h: Histogram, num_quantized_bins: int = INT8_LEVELS + 1, start_bin: int = INT8_LEVELS + 1,
                 stride: int = 1) -> float:
    """The amax whose clipped, `num_quantized_bins`-level histogram is KL-closest to the original."""
    if num_quantized_bins < 1:
        raise ConfigError(f"num_quantized_bins must be >= 1, got {num_quantized_bins}")
    used, fallback = _search_bins(h, start_bin, stride)
    if fallback is not None:
        return fallback
    bins = np.array(h.counts[:used], dtype=np.int64)
    if used > 1:
        bins[0] = bins[1]  # pytorch_quantization calib/histogram.py, _compute_amax_entropy
    keeps_half = _median_bin(h) + 1  # the first candidate that clips at most half of the values
    first = start_bin + max(0, -(-(keeps_half - start_bin) // stride)) * stride
    candidates = np.arange(first, used + 1, stride)
    divergences = _kl_divergences(bins, candidates, num_quantized_bins)
    best = candidates[len(divergences) - 1 - int(np.argmin(divergences[::-1]))]  # last argmin, as there
    return min(int(best) * h.bin_width, float(h.amax))


def mse_amax(h: Histogram, start_bin: int = 128, stride: int = 1, levels: int = INT8_LEVELS) -> float:
    """The amax that minimises the squared quantization error over the histogram, for a grid of `levels`
    steps between 0 and amax (127: symmetric INT8; see `ActivationScheme.levels`)."""
    if levels < 1:
        raise ConfigError(f"levels must be >= 1, got {levels}")
    used, fallback = _search_bins(h, start_bin, stride)
    if fallback is not None:
        return fallback
    candidates = np.minimum(np.arange(start_bin, used + 1, stride) * h.bin_width, h.amax)
    errors = _quantization_errors(h.counts[:used], h.bin_width, candidates, levels)
    return float(candidates[int(np.argmin(errors))])


def _kl_divergences(bins: np.ndarray, candidates: np.ndarray, num_quantized_bins: int) -> np.ndarray:
    """D(i) = KL(P_i || Q_i) for each candidate i (1 <= i <= len(bins)), see the module docstring.

    `bins` are integer counts with a positive sum (bins[0] already replaced if wanted).
    """
    bins = np.asarray(bins, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    total = int(bins.sum())
    cum = np.concatenate(([0], np.cumsum(bins)))
    cum_nonempty = np.concatenate(([0], np.cumsum(bins > 0)))
    share = bins / total
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 * ln 0, masked
        cum_ulnu = np.concatenate(([0.0], np.cumsum(np.where(bins > 0, share * np.log(share), 0.0))))
    block = max(1, _BLOCK // (num_quantized_bins + 1))
    parts = [_kl_block(bins, cum, cum_nonempty, cum_ulnu, candidates[start:start + block], num_quantized_bins)
             for start in range(0, candidates.size, block)]
    return np.concatenate(parts) if parts else np.empty(0)


def _kl_block(bins: np.ndarray, cum: np.ndarray, cum_nonempty: np.ndarray, cum_ulnu: np.ndarray,
              i: np.ndarray, nq: int) -> np.ndarray:
    """D(i) for a block of candidates, from the prefix sums of counts, non-empty bins and u ln u."""
    total = int(cum[-1])
    # Chunk c of candidate i holds bins j with floor(j * nq / i) == c: [ceil(c i / nq), ceil((c + 1) i / nq)).
    starts = (np.arange(nq + 1)[None, :] * i[:, None] + nq - 1) // nq
    chunk = (cum[starts[:, 1:]] - cum[starts[:, :-1]]) / total  # U_c
    nonempty = cum_nonempty[starts[:, 1:]] - cum_nonempty[starts[:, :-1]]  # n_c
    with np.errstate(divide="ignore", invalid="ignore"):  # empty chunks and q = 0 are masked below
        level = chunk / nonempty  # Q on each non-empty bin of the chunk (TensorRT S7310 expansion)
        q_ln_q = np.where(chunk > 0, chunk * np.log(level), 0.0).sum(axis=1)
        tail = (total - cum[i]) / total  # outliers folded into P[i - 1]
        last = bins[i - 1]
        p_last = last / total + tail
        p_ln_p = cum_ulnu[i - 1] + np.where(p_last > 0, p_last * np.log(p_last), 0.0)
        q_last = level[np.arange(i.size), ((i - 1) * nq) // i]
        tail_term = np.where(tail > 0, tail * np.log(q_last), 0.0)
        divergences = p_ln_p - q_ln_q - tail_term + np.log(cum[i] / total)
    return np.where((tail > 0) & (last == 0), np.inf, divergences)  # q = 0 < p: scipy.stats.entropy's inf


def _quantization_errors(counts: np.ndarray, width: float, candidates: np.ndarray,
                         levels: int = INT8_LEVELS) -> np.ndarray:
    """E(a) for each candidate a > 0: the quantization error with counts spread uniformly over bins.

    Summation by parts: sum_j n_j (g(u_j) - g(l_j)) = sum_e g(e w / s) (n_{e-1} - n_e) over the edges
    e = 0..len(counts) (n_{-1} = n_len = 0), so g is evaluated once per edge where the count changes.
    """
    density = np.asarray(counts, dtype=np.float64) / width
    steps = np.concatenate(([0.0], density)) - np.concatenate((density, [0.0]))
    changing = np.flatnonzero(steps)
    edges, steps = changing * width, steps[changing]
    candidates = np.asarray(candidates, dtype=np.float64)
    errors = np.empty(candidates.size)
    block = max(1, _BLOCK // max(1, edges.size))
    for start in range(0, candidates.size, block):
        part = candidates[start:start + block]
        t = edges * (levels / part[:, None])  # edges in units of s; g is continuous, so ties do not matter
        errors[start:start + block] = (part / levels) ** 3 * (_cell_error(t, levels) @ steps)
    return errors


def _cell_error(t: np.ndarray, levels: int = INT8_LEVELS) -> np.ndarray:
    """g(t) = integral_0^t (min(rint(t'), levels) - t')^2 dt' for t >= 0, elementwise; overwrites t."""
    level = np.minimum(np.rint(t), levels)
    t -= level
    cube = t * t
    cube *= t
    level *= 1 / 12
    cube *= 1 / 3
    level += cube
    return level


def _median_bin(h: Histogram) -> int:
    """The bin holding the median |x|, exact zeros counted (as in bin 0)."""
    cumulative = np.cumsum(h.counts) + h.zeros
    return int(np.searchsorted(cumulative, (int(cumulative[-1]) + 1) // 2, side="left"))


def _used_bins(h: Histogram) -> int:
    """1 + the index of the last non-empty bin (0 when every bin is empty)."""
    occupied = np.flatnonzero(h.counts)
    return int(occupied[-1]) + 1 if occupied.size else 0


def _search_bins(h: Histogram, start_bin: int, stride: int) -> tuple[int, float | None]:
    """(used bins, None) when the entropy/MSE search can run; else (used, the answer without a search):
    0.0 for a histogram without a non-zero value, `h.amax` when it is too coarse to search below its
    maximum (fewer used bins than `start_bin`: max calibration)."""
    if start_bin < 1:
        raise ConfigError(f"start_bin must be >= 1, got {start_bin}")
    if stride < 1:
        raise ConfigError(f"stride must be >= 1, got {stride}")
    if h.exponent is None:
        return 0, 0.0
    used = _used_bins(h)
    return used, (float(h.amax) if used < start_bin else None)
