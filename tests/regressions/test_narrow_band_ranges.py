"""Issue 12, bug 9: on a tensor whose values sit in a narrow band away from zero (a pooled output, all in
[0.50, 0.72]) entropy calibration chose a range at the band's lower edge: KL(P || Q) compares normalised
shapes, and a P with every value clipped into its last bin is matched exactly by its Q, so "clip
everything" scored a perfect 0. Every range method and every candidate of `--method auto` must keep the
variation of such tensors: after quantization the values still correlate with the originals."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxq
from onnxq.calib.amax import entropy_amax, max_amax, mse_amax, percentile_amax
from onnxq.calib.histogram import Histogram, HistogramAccumulator
from onnxq.lower.scales import INT8_SYMMETRIC, UINT8_ASYMMETRIC, ActivationScheme
from onnxq.steps.ranges import candidate_ranges
from tests.regressions.graphs import TARGETS, model, weight
from tests.support.runtime import run_model

_RNG = np.random.default_rng(12)
BANDS = {
    "uniform [0.50, 0.72]": _RNG.uniform(0.50, 0.72, 20000),
    "bump in [0.50, 0.72]": np.clip(_RNG.normal(0.6, 0.03, 20000), 0.50, 0.72),
    "skewed to its low edge": 0.50 + 0.22 * _RNG.beta(1, 8, 20000),
    "skewed to its high edge": 0.72 - 0.22 * _RNG.beta(1, 8, 20000),
    "four values": _RNG.choice([0.50, 0.55, 0.60, 0.72], 20000),
    "negative band": -_RNG.uniform(0.50, 0.72, 20000),
    "far from zero": _RNG.uniform(50.0, 72.0, 20000),
    "7x7 average of ReLU + 0.3": np.maximum(_RNG.standard_normal((20000, 49)), 0).mean(axis=1) + 0.3,
}
SCHEMES = {"int8 symmetric": INT8_SYMMETRIC, "uint8 asymmetric": UINT8_ASYMMETRIC}


def _histogram(values: np.ndarray) -> Histogram:
    accumulator = HistogramAccumulator()
    accumulator.add(values.astype(np.float32))
    return accumulator.freeze()


def _methods(h: Histogram, levels: int) -> dict[str, float]:
    found = {"max": max_amax(h), "entropy": entropy_amax(h, levels + 1, levels + 1),
             "percentile 99.99": percentile_amax(h, 99.99), "mse": mse_amax(h, levels=levels)}
    found.update({f"auto candidate {name}": amax for name, amax in candidate_ranges(h, levels).items()})
    return found


def _fake_quantized(values: np.ndarray, scheme: ActivationScheme, h: Histogram, amax: float) -> np.ndarray:
    """What QuantizeLinear -> DequantizeLinear gives `values` with the scheme's parameters for `amax`."""
    params = scheme.params("t", h.low, h.high, amax)
    info = np.iinfo(params.zero_point.dtype)
    scale, zero_point = float(params.scale), float(params.zero_point)
    return (np.clip(np.rint(values / scale) + zero_point, info.min, info.max) - zero_point) * scale


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("band", BANDS)
def test_no_method_clips_a_narrow_band_away(band: str, scheme: str) -> None:
    values = BANDS[band].astype(np.float32)
    h = _histogram(values)
    chosen = SCHEMES[scheme]
    for method, amax in _methods(h, chosen.levels(h.low, h.high)).items():
        assert amax >= np.median(np.abs(values)), f"{method}: amax {amax:.4g} clips most of the band"
        quantized = _fake_quantized(values.astype(np.float64), chosen, h, amax)
        correlation = np.corrcoef(quantized, values)[0, 1]
        assert correlation > 0.99, f"{method}: amax {amax:.4g}, correlation {correlation:.3f}"


@pytest.mark.parametrize("target", TARGETS)
def test_entropy_quantizes_a_pooled_band_like_float(target: str) -> None:
    # x in [0.50, 0.72] -> AveragePool -> MatMul: the MatMul's input is the narrow band
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "w"], ["y"], name="matmul")]
    built = model(nodes, {"x": [8, 16, 4, 4]}, {"y": None}, [weight("w", (16, 4))])
    rng = np.random.default_rng(1)
    batches = [{"x": rng.uniform(0.50, 0.72, (8, 16, 4, 4)).astype(np.float32)} for _ in range(8)]
    config = onnxq.QuantConfig(target=target, calib=onnxq.CalibConfig(method=onnxq.CalibMethod.ENTROPY))
    result = onnxq.quantize(built, onnxq.FeedsSource(batches[:6]), config)
    for batch in batches[6:]:
        (reference,) = run_model(built, batch)
        (quantized,) = run_model(result.model, batch, optimized=True)
        error = reference - quantized
        assert np.sqrt(np.mean(error ** 2)) < 0.05 * np.std(reference), (result.group_amax, np.std(reference))
