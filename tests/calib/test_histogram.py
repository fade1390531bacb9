"""|x| histograms: exactly invariant to batching and order, mergeable, degenerate data, serialisation."""

from __future__ import annotations

import io

import numpy as np
import pytest

from onnxq.calib.amax import entropy_amax, max_amax, mse_amax, percentile_amax
from onnxq.calib.histogram import MIN_EXPONENT, SENTINEL_ABS, Histogram, empty_histogram
from onnxq.errors import InternalError

METHODS = (max_amax, percentile_amax, entropy_amax, mse_amax)
F32_MIN = float(np.finfo(np.float32).min)


def feed(values: np.ndarray, batch_size: int, num_bins: int = 2048) -> Histogram:
    h = empty_histogram(num_bins)
    for start in range(0, len(values), batch_size):
        h = h.update(values[start:start + batch_size])
    return h


def exact_counts(values: np.ndarray, exponent: int, num_bins: int = 2048) -> np.ndarray:
    """floor(|x| / 2**exponent) of the non-zero finite non-sentinel values, in float64 (exact)."""
    mags = np.abs(values.astype(np.float64))
    mags = mags[(mags > 0) & (mags < SENTINEL_ABS)]
    return np.bincount(np.floor(mags / 2.0**exponent).astype(np.int64), minlength=num_bins)


def amaxes(h: Histogram) -> list[float]:
    return [method(h) for method in METHODS]


@pytest.fixture(scope="module")
def mixed() -> np.ndarray:
    """Gaussian + narrow Laplace + tiny values + exact zeros + NaN/Inf + float32-min mask fill."""
    rng = np.random.default_rng(7)
    parts = [rng.standard_normal(2000) * 3, rng.laplace(0, 0.01, 500), rng.uniform(-1e-6, 1e-6, 200),
             np.zeros(300), [-0.0] * 3, [np.nan] * 5, [np.inf, -np.inf], [F32_MIN] * 4]
    return rng.permutation(np.concatenate(parts).astype(np.float32))


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batch_size_changes_nothing(mixed: np.ndarray, batch_size: int) -> None:
    whole = empty_histogram().update(mixed)
    batched = feed(mixed, batch_size)
    assert batched == whole
    assert amaxes(batched) == amaxes(whole)


def test_order_changes_nothing(mixed: np.ndarray) -> None:
    whole = empty_histogram().update(mixed)
    rng = np.random.default_rng(1)
    for batch_size in (13, 500):
        shuffled = feed(rng.permutation(mixed), batch_size)
        assert shuffled == whole
        assert amaxes(shuffled) == amaxes(whole)
    growing = mixed[np.argsort(np.abs(mixed))]  # the range grows at every batch (NaN last)
    assert feed(growing, 64) == whole
    assert feed(growing[::-1], 64) == whole


@pytest.mark.parametrize("order", [(0, 1), (1, 0), (2, 0, 1), (1, 2, 0)])
def test_first_batch_range_does_not_fix_the_bins(order: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal(500) * scale for scale in (1e-20, 1e10, 1.0)]
    batches = [batches[i].astype(np.float32) for i in order]
    h = empty_histogram()
    for batch in batches:
        h = h.update(batch)
    everything = np.concatenate(batches)
    assert h == empty_histogram().update(everything)
    assert np.array_equal(h.counts, exact_counts(everything, h.exponent))
    assert h.amax == float(np.abs(everything).max())


def test_bins_are_exact_floor_of_x_over_width() -> None:
    rng = np.random.default_rng(5)
    width = 2.0**-9  # amax 3.9 -> 3.9 < 2048 * 2**-9 = 4
    on_edges = np.arange(0, 2048, 37) * width
    below_edges = np.nextafter(on_edges[1:].astype(np.float32), np.float32(0))
    values = np.concatenate([rng.uniform(-3.9, 3.9, 10_000), on_edges, -on_edges, below_edges, [3.9]])
    for dtype in (np.float32, np.float64):
        typed = values.astype(dtype)
        h = empty_histogram().update(typed)
        assert h.exponent == -9
        assert np.array_equal(h.counts, exact_counts(typed, -9))
        assert h.zeros == 2  # +0 and -0 from the edge lists


@pytest.mark.parametrize("amax, num_bins, exponent", [
    (3.9, 2048, -9), (4.0, 2048, -8), (2048.0, 2048, 1), (2047.0, 2048, 0), (1.0, 1, 1),
    (0.7, 3, -2), (0.75, 3, -1), (1e-30, 2048, -110), (1e-40, 2048, MIN_EXPONENT), (2.0**98, 2048, 88),
])
def test_exponent_is_smallest_with_room_for_amax(amax: float, num_bins: int, exponent: int) -> None:
    h = empty_histogram(num_bins).update(np.array([amax]))
    assert h.exponent == exponent
    assert num_bins * h.bin_width > amax
    assert exponent == MIN_EXPONENT or num_bins * h.bin_width / 2 <= amax
    assert h.counts[int(amax / h.bin_width)] == 1


def test_batches_larger_than_a_chunk() -> None:
    rng = np.random.default_rng(11)
    values = rng.standard_normal(700_001).astype(np.float32)
    values[::1000] = 0.0
    h = empty_histogram().update(values)
    assert np.array_equal(h.counts, exact_counts(values, h.exponent))
    assert h.zeros == np.count_nonzero(values == 0)
    assert h == feed(values, 123_457)


def test_merge_of_shards_equals_one_pass(mixed: np.ndarray) -> None:
    whole = empty_histogram().update(mixed)
    by_magnitude = mixed[np.argsort(np.abs(mixed))]  # NaN last
    a, b, c = (feed(part, 50) for part in np.array_split(by_magnitude, [400, 2900]))
    assert a.exponent < b.exponent < c.exponent  # the shards need coarsening
    assert a.merge(b).merge(c) == whole
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert c.merge(a) == a.merge(c)
    assert whole.merge(empty_histogram()) == whole
    assert empty_histogram().merge(whole) == whole


def test_merge_refuses_different_bin_counts() -> None:
    with pytest.raises(InternalError, match="1024"):
        empty_histogram().merge(empty_histogram(1024))


def test_nan_and_inf_are_counted_not_binned() -> None:
    values = np.array([1.0, np.nan, -np.inf, np.inf, -2.0, np.nan, 0.0], np.float32)
    h = empty_histogram().update(values)
    assert (h.nan_count, h.inf_count, h.sentinel_count) == (2, 2, 0)
    assert h.amax == 2.0
    assert (h.num_values, h.num_ignored, h.zeros) == (3, 4, 1)
    assert h == empty_histogram().update(values[np.isfinite(values)]).merge(
        empty_histogram().update(values[~np.isfinite(values)]))


def test_all_nan_tensor_has_no_values() -> None:
    h = empty_histogram().update(np.full((4, 5), np.nan, np.float32))
    assert h.num_values == 0
    assert h.nan_count == 20
    assert h.exponent is None
    assert amaxes(h) == [0.0] * 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sentinels_do_not_widen_the_range(dtype: type) -> None:
    rng = np.random.default_rng(2)
    real = rng.standard_normal(1000)
    masked = np.concatenate([real, [F32_MIN] * 7, [-1e30, 1e30, -SENTINEL_ABS]]).astype(dtype)
    h = empty_histogram().update(masked)
    assert h.sentinel_count == 10
    assert h == empty_histogram().update(real.astype(dtype)).merge(
        empty_histogram().update(masked[1000:]))
    assert h.amax == float(np.abs(real.astype(dtype)).max())
    below = np.nextafter(dtype(SENTINEL_ABS), dtype(0))
    assert empty_histogram().update(np.array([below])).sentinel_count == 0


def test_only_sentinels_give_no_values() -> None:
    h = empty_histogram().update(np.full(6, F32_MIN, np.float32))
    assert (h.num_values, h.sentinel_count, h.exponent) == (0, 6, None)


def test_all_zero_tensor() -> None:
    h = empty_histogram().update(np.zeros((3, 4), np.float32)).update(np.array([-0.0]))
    assert (h.zeros, h.num_values, h.exponent, h.amax) == (13, 13, None, 0.0)
    assert h.bin_width == 0.0
    assert not h.edges().any()
    assert amaxes(h) == [0.0] * 4
    assert h.update(np.array([0.5])).zeros == 13  # zeros stay apart once there is a width


@pytest.mark.parametrize("constant", [3.0, -2.5, 1e-30, 7e-45])
def test_constant_tensor_gives_its_value(constant: float) -> None:
    values = np.full(1000, constant, np.float32)
    h = empty_histogram().update(values)
    assert h.amax == abs(float(np.float32(constant)))
    assert amaxes(h) == [h.amax] * 4


def test_tiny_range_keeps_full_resolution() -> None:
    rng = np.random.default_rng(4)
    values = (rng.standard_normal(5000) * 1e-31).astype(np.float32)
    h = empty_histogram().update(values)
    assert h.exponent > MIN_EXPONENT
    assert np.flatnonzero(h.counts)[-1] >= 1024
    assert np.array_equal(h.counts, exact_counts(values, h.exponent))
    assert h == empty_histogram().update(values.astype(np.float64))
    for value in amaxes(h):
        assert 0.3 * h.amax < value <= h.amax


def test_float32_subnormals_are_binned_exactly() -> None:
    # 2048 * 2**-127 < 2e-35 < 2048 * 2**-126; the first four are below 2**-126 (bin 0)
    values = np.array([1e-45, -1e-44, 1e-40, 1e-38, 3e-37, -1e-36, 2e-35], np.float32)
    h = empty_histogram().update(values)
    assert h.exponent == MIN_EXPONENT
    assert np.array_equal(h.counts, exact_counts(values, MIN_EXPONENT))
    assert h.counts[0] == 4 and h.counts.sum() == 7 and np.count_nonzero(h.counts) == 4
    bigger = values * np.float32(2.0**20)
    hb = empty_histogram().update(bigger)
    assert np.array_equal(hb.counts, exact_counts(bigger, hb.exponent))


def test_float16_int_and_float64_inputs_agree_with_float32() -> None:
    rng = np.random.default_rng(6)
    halves = (rng.standard_normal(3000) * 100).astype(np.float16)
    reference = empty_histogram().update(halves.astype(np.float32))
    assert empty_histogram().update(halves) == reference
    assert empty_histogram().update(halves.astype(np.float64)) == reference
    ints = rng.integers(-500, 500, 2000, dtype=np.int32)
    assert empty_histogram().update(ints) == empty_histogram().update(ints.astype(np.float32))


def test_strided_and_multidimensional_inputs() -> None:
    rng = np.random.default_rng(8)
    values = rng.standard_normal((6, 7, 8)).astype(np.float32)
    expected = empty_histogram().update(np.ascontiguousarray(values[:, ::2].T).ravel())
    assert empty_histogram().update(values[:, ::2].T) == expected


def test_empty_arrays_change_nothing() -> None:
    h = empty_histogram().update(np.array([1.0, -3.0]))
    assert h.update(np.empty(0, np.float32)) == h
    assert h.update(np.empty((0, 3))) == h
    assert empty_histogram().update(np.empty(0)) == empty_histogram()


def test_update_returns_new_and_counts_are_read_only() -> None:
    h = empty_histogram().update(np.array([1.0, 2.0]))
    h2 = h.update(np.array([100.0]))
    assert h.amax == 2.0 and h.counts.sum() == 2
    assert h2.amax == 100.0 and h2.counts.sum() == 3
    with pytest.raises(ValueError):
        h.counts[0] = 5


def test_edges_are_multiples_of_the_width() -> None:
    h = empty_histogram(8).update(np.array([5.0]))
    assert h.bin_width == 1.0
    assert np.array_equal(h.edges(), np.arange(9.0))


@pytest.mark.parametrize("make", [
    lambda m: empty_histogram().update(m), lambda m: empty_histogram(), lambda m: empty_histogram(16),
    lambda m: empty_histogram().update(np.zeros(5)).update(np.array([np.nan])),
])
def test_to_arrays_round_trip_through_npz(mixed: np.ndarray, make) -> None:
    h = make(mixed)
    buffer = io.BytesIO()
    np.savez(buffer, **h.to_arrays())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as archive:
        restored = Histogram.from_arrays(dict(archive))
    assert restored == h
    assert all(a.dtype.kind in "if" for a in h.to_arrays().values())


def test_from_arrays_rejects_inconsistent_data(mixed: np.ndarray) -> None:
    good = empty_histogram().update(mixed).to_arrays()
    broken = [
        ({k: v for k, v in good.items() if k != "zeros"}, "lack zeros"),
        ({**good, "exponent": good["exponent"] + 1}, "exponent"),
        ({**good, "amax": np.array(float(good["amax"]) * 4)}, "exponent|end in the bin"),
        ({**good, "counts": np.append(good["counts"][:-1], 1)}, "end in the bin"),
        ({**good, "counts": -good["counts"]}, "non-negative"),
        ({**good, "nan_count": np.array(-1)}, "out of range"),
        ({**good, "amax": np.array([1.0])}, "0-d"),
    ]
    for arrays, message in broken:
        with pytest.raises(ValueError, match=message):
            Histogram.from_arrays(arrays)
