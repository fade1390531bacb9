"""The compiled binning kernel (_binning.c) against the numpy reference, and the in-place accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest

import onnxq
from onnxq.calib import histogram
from onnxq.calib.histogram import MIN_EXPONENT, Histogram, HistogramAccumulator, _bin_counts, binning_kernel
from onnxq.errors import InternalError
from tests.support.paths import MODELS

TEXTLINES = MODELS / "data" / "textlines"

needs_kernel = pytest.mark.skipif(histogram._binning is None,
                                  reason="the C binning kernel was not built (no C compiler at install)")


def kernel_counts(values: np.ndarray, exponent: int, num_bins: int = 2048) -> tuple[np.ndarray, int]:
    counts = np.zeros(num_bins, np.int64)
    if values.size == 0:
        return counts, 0
    zeros, low, high = histogram._binning.fold_f32(values, math.ldexp(1.0, -exponent), counts)
    assert (low, high) == (float(values.min()), float(values.max()))
    return counts, zeros


def edge_values(exponent: int, num_bins: int) -> np.ndarray:
    """Every bin edge k * 2**exponent, the float32 just below and just above it, both signs, zeros."""
    edges = np.ldexp(np.arange(num_bins, dtype=np.float64), exponent).astype(np.float32)
    below = np.nextafter(edges, np.float32(0))
    above = np.nextafter(edges, np.float32(np.inf))
    top = np.float32(np.nextafter(np.float32(math.ldexp(num_bins, exponent)), np.float32(0)))
    values = np.concatenate([edges, below, above, [top, 0.0, -0.0]]).astype(np.float32)
    return np.concatenate([values, -values])


@needs_kernel
def test_the_kernel_is_what_an_install_with_a_compiler_runs() -> None:
    assert binning_kernel() == "compiled"


@needs_kernel
@pytest.mark.parametrize(("exponent", "num_bins"), [(-8, 2048), (0, 2048), (5, 2048), (-3, 7), (2, 1)])
def test_kernel_equals_numpy_on_every_bin_edge(exponent: int, num_bins: int) -> None:
    values = edge_values(exponent, num_bins)
    values = values[np.abs(values) < math.ldexp(num_bins, exponent)]
    expected = _bin_counts(values, exponent, num_bins)
    got = kernel_counts(values, exponent, num_bins)
    assert np.array_equal(got[0], expected[0]) and got[1] == expected[1]


@needs_kernel
@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 8191, 8192, 8193, 3 * 8192 + 3, 200_003])
def test_kernel_equals_numpy_for_lengths_around_its_blocks(size: int) -> None:
    rng = np.random.default_rng(size)
    values = np.maximum(rng.standard_normal(size), 0).astype(np.float32) * 3  # half exact zeros
    expected = _bin_counts(values, -7, 2048) if size else (np.zeros(2048, np.int64), 0)
    got = kernel_counts(values, -7)
    assert np.array_equal(got[0], expected[0]) and got[1] == expected[1]


@needs_kernel
def test_kernel_bins_subnormals_at_the_smallest_width() -> None:
    tiny = np.ldexp(np.arange(1, 4000, dtype=np.float64), -149).astype(np.float32)  # subnormals
    expected = _bin_counts(tiny, MIN_EXPONENT, 2048)
    got = kernel_counts(tiny, MIN_EXPONENT)
    assert np.array_equal(got[0], expected[0]) and got[0].sum() == tiny.size


@needs_kernel
@pytest.mark.parametrize("bad", [8.0, -64.0, np.nan, np.inf, -np.inf, float(np.finfo(np.float32).min)])
def test_kernel_declines_values_past_the_last_bin_and_leaves_counts_alone(bad: float) -> None:
    values = np.array([1.0, 2.0, bad, 3.0] + [0.5] * 9000, np.float32)  # past the first stage too
    counts = np.full(8, 5, np.int64)
    assert histogram._binning.fold_f32(values, 1.0, counts) is None
    assert np.array_equal(counts, np.full(8, 5))


@needs_kernel
@pytest.mark.parametrize("values", [[-0.0, 0.0], [-3.5, 2.0, -0.0], [7.99, -7.99], [-1e-45, 1e-45]])
def test_kernel_reports_signed_min_and_max(values: list[float]) -> None:
    data = np.array(values, np.float32)
    zeros, low, high = histogram._binning.fold_f32(data, 1.0, np.zeros(8, np.int64))
    assert (low, high) == (float(data.min()), float(data.max())) and zeros == int(np.sum(data == 0))


@needs_kernel
def test_kernel_refuses_buffers_of_the_wrong_kind() -> None:
    with pytest.raises(ValueError, match="float32 values"):
        histogram._binning.fold_f32(np.zeros(3, np.float32), 1.0, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="non-empty"):
        histogram._binning.fold_f32(np.zeros(0, np.float32), 1.0, np.zeros(4, np.int64))
    with pytest.raises(TypeError):  # read-only counts
        histogram._binning.fold_f32(np.zeros(3, np.float32), 1.0, b"\0" * 32)
    with pytest.raises(ValueError, match="contiguous"):  # strided values
        histogram._binning.fold_f32(np.zeros(6, np.float32)[::2], 1.0, np.zeros(4, np.int64))


def test_accumulator_equals_chained_updates_and_stays_usable() -> None:
    rng = np.random.default_rng(3)
    batches = [rng.laplace(0, 0.5 * (i + 1), 5000).astype(np.float32) for i in range(5)]
    batches[2][7] = np.nan
    chained = histogram.empty_histogram()
    accumulator = HistogramAccumulator()
    for i, batch in enumerate(batches):
        chained = chained.update(batch)
        accumulator.add(batch)
        assert accumulator.freeze() == chained, f"after batch {i}"
    assert accumulator.freeze().nan_count == 1


def test_accumulator_continues_a_histogram_without_changing_it() -> None:
    start = histogram.empty_histogram().update(np.arange(-5, 6, dtype=np.float32))
    accumulator = HistogramAccumulator(start)
    accumulator.add(np.array([100.0], np.float32))
    assert start.amax == 5.0 and accumulator.freeze().amax == 100.0


@needs_kernel
def test_real_model_statistics_are_identical_with_and_without_the_kernel(monkeypatch) -> None:
    """PP-OCR classifier on 16 real text lines: every tensor's histogram, bit for bit."""
    model = onnxq.load_model(MODELS / "ppocr_mobile_v2_cls.onnx")
    x = np.load(TEXTLINES / "ppocr_cls_calib.npz")["x"][:16]
    compiled, _ = onnxq.collect_stats(model, onnxq.FeedsSource([{"x": x[:8]}, {"x": x[8:]}]))
    monkeypatch.setattr(histogram, "_binning", None)
    assert binning_kernel() == "numpy"
    reference, _ = onnxq.collect_stats(model, onnxq.FeedsSource([{"x": x[:8]}, {"x": x[8:]}]))
    assert compiled.histograms.keys() == reference.histograms.keys() and len(compiled.histograms) > 50
    for name, h in compiled.histograms.items():
        assert isinstance(h, Histogram) and h == reference.histograms[name], name
        assert h.num_values > 0


def test_numpy_path_runs_when_the_kernel_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(histogram, "_binning", None)
    values = edge_values(-4, 2048)
    h = histogram.empty_histogram().update(values)
    assert h.counts.sum() + h.zeros == values.size


def test_kernel_errors_surface_as_internal_errors(monkeypatch) -> None:
    class Broken:
        @staticmethod
        def fold_f32(values, scale, counts):
            raise ValueError("fold_f32 needs non-empty float32 values")

    monkeypatch.setattr(histogram, "_binning", Broken)
    with pytest.raises(InternalError, match="fold_f32 needs"):
        histogram.empty_histogram().update(np.ones(4, np.float32))


@needs_kernel
def test_growing_ranges_mix_both_paths_and_match_numpy(monkeypatch) -> None:
    """Batches alternately inside the range (kernel) and past it (widen, then kernel) == numpy only."""
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal(3000).astype(np.float32) * scale for scale in (1, 0.5, 4, 2, 16, 3, 0.1)]
    batches[4][5] = np.nan
    compiled = HistogramAccumulator()
    for batch in batches:
        compiled.add(batch)
    monkeypatch.setattr(histogram, "_binning", None)
    reference = HistogramAccumulator()
    for batch in batches:
        reference.add(batch)
    assert compiled.freeze() == reference.freeze()
