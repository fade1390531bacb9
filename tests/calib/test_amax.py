"""amax methods on histograms: analytic distributions, naive reference implementations, edge cases."""

from __future__ import annotations

import time

import numpy as np
import pytest

from onnxq.calib.amax import (_kl_divergences, _quantization_errors, entropy_amax, max_amax, mse_amax,
                              percentile_amax)
from onnxq.calib.histogram import Histogram, empty_histogram
from onnxq.errors import ConfigError

METHODS = (max_amax, percentile_amax, entropy_amax, mse_amax)


def used_bins(h: Histogram) -> int:
    return int(np.flatnonzero(h.counts)[-1]) + 1


def naive_entropy_amax(h: Histogram, nq: int, start_bin: int) -> float:
    """pytorch_quantization's search written out per candidate (digitize over linspace, direct KL)."""
    bins = h.counts[:used_bins(h)].astype(np.float64)
    bins[0] = bins[1]
    best, best_i = np.inf, None
    for i in range(start_bin, bins.size + 1):
        chunk_of = np.digitize(np.arange(i), np.linspace(0, i, nq + 1)) - 1
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        q = np.zeros(i)
        for c in range(nq):
            members = (chunk_of == c) & (bins[:i] > 0)
            if members.any():
                q[members] = bins[:i][members].sum() / members.sum()
        p, q = p / p.sum(), q / q.sum()
        if np.any((p > 0) & (q == 0)):
            divergence = np.inf
        else:
            divergence = float(np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0])))
        if divergence <= best:  # the last argmin
            best, best_i = divergence, i
    return min(best_i * h.bin_width, h.amax)


def integrated_errors(h: Histogram, candidates: np.ndarray, points: int = 400) -> np.ndarray:
    """Each bin's count spread over `points` evenly spaced values, through the deployment quantizer."""
    width = h.bin_width
    counts = h.counts[:used_bins(h)]
    values = ((np.arange(counts.size)[:, None] + (np.arange(points) + 0.5) / points) * width).ravel()
    weights = np.repeat(counts / points, points)
    errors = []
    for a in candidates:
        s = a / 127
        errors.append(float(np.sum(weights * (np.clip(np.rint(values / s), -128, 127) * s - values) ** 2)))
    return np.array(errors)


def laplace_abs_error(a: np.ndarray) -> np.ndarray:
    """E|fq_a(y) - y|^2 for |x| ~ Exp(1) (Laplace b = 1), in closed form cell by cell."""
    a = np.asarray(a, np.float64)[:, None]
    s = a / 127
    k = np.arange(128)[None, :]

    def antiderivative(y: np.ndarray, c: np.ndarray) -> np.ndarray:  # d/dy = exp(-y) (y - c)^2
        return -np.exp(-y) * ((y - c) ** 2 + 2 * (y - c) + 2)

    cells = antiderivative((k + 0.5) * s, k * s) - antiderivative(np.maximum((k - 0.5) * s, 0), k * s)
    clipped = -antiderivative(127.5 * s[:, 0], a[:, 0])
    return cells.sum(axis=1) + clipped


def test_mse_matches_the_analytic_laplace_optimum() -> None:
    grid = np.arange(8.0, 12.0, 0.0005)
    errors = laplace_abs_error(grid)
    optimum = grid[np.argmin(errors)]
    assert 9.8 < optimum < 10.0  # the known ~9.9 b clipping of 8-bit Laplace
    n = 1_000_000
    quantiles = -np.log1p(-(np.arange(n) + 0.5) / n)  # |x| of a stratified Laplace(b=1) sample
    for b in (1.0, 0.07, 0.01, 7.0):  # different grid alignments (bin width / b from 0.008 to 0.014)
        h = empty_histogram().update((quantiles * b).astype(np.float32))
        found = mse_amax(h)
        assert abs(found - optimum * b) <= 3 * h.bin_width  # <= 1.8 bins measured
        assert laplace_abs_error([found / b])[0] < errors.min() * (1 + 1e-4)


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> tuple[np.ndarray, Histogram]:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(1 << 21).astype(np.float32)
    values[:3] = [20.0, -19.0, 18.0]
    return values, empty_histogram().update(values)


def test_gaussian_with_outliers(gaussian_with_outliers: tuple[np.ndarray, Histogram]) -> None:
    values, h = gaussian_with_outliers
    assert max_amax(h) == 20.0
    for p in (99.0, 99.99):
        rank = int(np.ceil(p / 100 * values.size))
        quantile = float(np.sort(np.abs(values))[rank - 1])
        found = percentile_amax(h, p)
        assert found - h.bin_width <= quantile < found  # the right edge of the quantile's bin
    assert 3.7 < percentile_amax(h) < 4.0  # N(0,1): 99.99 % of |x| below 3.89
    assert 3.5 < entropy_amax(h) < 6.0
    assert 3.5 < mse_amax(h) < 6.0


def test_uniform_data_gives_about_the_max() -> None:
    values = np.random.default_rng(1).uniform(-1, 1, 1_000_000).astype(np.float32)
    h = empty_histogram().update(values)
    for method in METHODS:
        assert 0.99 * h.amax <= method(h) <= h.amax


def test_divergences_match_a_direct_computation() -> None:
    rng = np.random.default_rng(2)
    for nq in (7, 32, 64):
        bins = rng.integers(0, 50, 300) * (rng.random(300) < 0.7)
        bins[-1] = 3
        candidates = np.arange(40, 301)
        fast = _kl_divergences(bins, candidates, nq)
        for i, divergence in zip(candidates, fast):
            chunk_of = (np.arange(i) * nq) // i
            p = bins[:i].astype(np.float64)
            p[-1] += bins[i:].sum()
            q = np.zeros(i)
            for c in np.unique(chunk_of):
                members = (chunk_of == c) & (bins[:i] > 0)
                q[members] = bins[:i][members].sum() / max(members.sum(), 1)
            p, q = p / p.sum(), q / q.sum()
            if np.any((p > 0) & (q == 0)):
                assert divergence == np.inf
            else:
                assert divergence == pytest.approx(np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0])), abs=1e-12)


def test_divergence_of_the_tensorrt_worked_example() -> None:
    p = np.array([1, 0, 2, 3, 5, 3, 1, 7])  # merged to 2 levels [6, 16] -> Q = [2, 0, 2, 2, 4, 4, 4, 4]
    q = np.array([2, 0, 2, 2, 4, 4, 4, 4])
    pn, qn = p / p.sum(), q / q.sum()
    expected = np.sum(pn[p > 0] * np.log(pn[p > 0] / qn[p > 0]))
    assert _kl_divergences(p, np.array([8]), 2)[0] == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_and_mse_match_naive_searches(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.gamma(2.0, 1.0, 20_000), rng.uniform(0, 40, 30)])
    values = values * rng.choice([-1, 1], values.size) * (rng.random(values.size) < 0.8)
    h = empty_histogram(256).update(values)
    assert entropy_amax(h, num_quantized_bins=32, start_bin=64) == naive_entropy_amax(h, 32, 64)
    candidates = np.minimum(np.arange(64, used_bins(h) + 1) * h.bin_width, h.amax)
    naive_pick = candidates[np.argmin(integrated_errors(h, candidates, points=64))]
    assert abs(mse_amax(h, start_bin=64) - naive_pick) <= 2 * h.bin_width


def test_entropy_ignores_the_zero_bin() -> None:
    rng = np.random.default_rng(3)
    relu = np.maximum(rng.standard_normal(200_000), 0)
    h = empty_histogram().update(relu)
    assert h.zeros > 90_000
    spiked = h.update(np.full(50_000, 1e-9))  # a near-zero spike lands in bin 0
    assert spiked.counts[0] > h.counts[0] + 40_000
    assert entropy_amax(spiked) == entropy_amax(h)
    assert entropy_amax(h) < h.amax


def test_entropy_and_mse_run_fast_on_2048_used_bins() -> None:
    rng = np.random.default_rng(4)
    values = np.concatenate([np.minimum(rng.exponential(200.0, 500_000), 2047.0), [2047.5]])
    h = empty_histogram().update(values)
    assert used_bins(h) == 2048
    for method in (entropy_amax, mse_amax):
        started = time.perf_counter()
        method(h)
        assert time.perf_counter() - started < 1.0


def test_percentile_rank_is_exact_and_takes_the_right_edge() -> None:
    values = np.concatenate([np.arange(1.0, 10_000.0), [1e6]])  # 10 000 values, bin k holds k
    h = empty_histogram(1 << 20).update(values)
    assert h.bin_width == 1.0
    assert percentile_amax(h, 99.99) == 10_000.0  # rank 9999 (not 10 000 via 0.9999 * 10 000 in binary)
    assert percentile_amax(h, 50.0) == 5001.0
    assert percentile_amax(h, 100.0) == 1e6


def test_percentile_counts_zeros_and_stays_below_amax() -> None:
    h = empty_histogram().update(np.concatenate([np.zeros(9999), [5.0]]))
    assert percentile_amax(h, 99.99) == h.bin_width  # the 99.99 % value is a zero: bin 0's right edge
    assert percentile_amax(h, 100.0) == 5.0  # right edge 5 + w capped to amax


def test_too_few_used_bins_fall_back_to_max() -> None:
    h = empty_histogram(64).update(np.random.default_rng(5).standard_normal(1000))
    assert used_bins(h) < 128
    assert entropy_amax(h) == mse_amax(h) == h.amax
    assert entropy_amax(h, num_quantized_bins=8, start_bin=16) < h.amax
    assert mse_amax(h, start_bin=16) <= h.amax


def test_nothing_non_zero_gives_zero() -> None:
    for h in (empty_histogram(), empty_histogram().update(np.zeros(10)),
              empty_histogram().update(np.array([np.nan, np.inf]))):
        assert [method(h) for method in METHODS] == [0.0] * 4


def test_results_never_exceed_amax_and_respect_stride() -> None:
    rng = np.random.default_rng(6)
    for scale in (1e-3, 1.0, 3e4):
        h = empty_histogram().update(rng.standard_cauchy(50_000) * scale)
        for method in METHODS:
            assert 0.0 < method(h) <= h.amax
        for stride in (3, 10):
            i = entropy_amax(h, stride=stride) / h.bin_width
            assert entropy_amax(h, stride=stride) == h.amax or (i - 128) % stride == 0


@pytest.mark.parametrize("start_bin", [128, 3])  # 3: scales finer than a bin
def test_mse_errors_integrate_the_deployment_quantizer_over_each_bin(start_bin: int) -> None:
    rng = np.random.default_rng(7)
    h = empty_histogram(256).update(np.concatenate([rng.laplace(0, 1, 5000), np.zeros(100)]))
    candidates = np.minimum(np.arange(start_bin, used_bins(h) + 1, 7) * h.bin_width, h.amax)
    fast = _quantization_errors(h.counts, h.bin_width, candidates)
    assert np.allclose(fast, integrated_errors(h, candidates), rtol=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda h: percentile_amax(h, 100.5), "percentile"),
    (lambda h: percentile_amax(h, -1), "percentile"),
    (lambda h: entropy_amax(h, num_quantized_bins=0), "num_quantized_bins"),
    (lambda h: entropy_amax(h, start_bin=0), "start_bin"),
    (lambda h: mse_amax(h, stride=0), "stride"),
])
def test_invalid_options_are_config_errors(call, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call(empty_histogram().update(np.array([1.0])))
