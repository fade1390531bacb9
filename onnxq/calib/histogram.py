"""Streaming histograms of |x| whose result depends only on the multiset of values seen.

pytorch_quantization's `HistogramCalibrator` and ONNX Runtime's `HistogramCollector` fix the bin width
from the FIRST batch (`w = max|x_batch1| / num_bins`) and only append bins of that width later, so the
histogram, and every amax computed from it, changes with the batch size and the order of the data.

Design used here (every claim below is exact, not approximate):

* The bin width is a power of two, `w = 2**e`, with `e` the smallest integer >= `MIN_EXPONENT` such that
  `num_bins * w > amax` (amax = max |x| seen). `e` is a function of amax alone. The inequality is strict
  so that amax itself lands in the last bin without clamping: a clamped top bin would not nest when the
  width doubles. (For num_bins a power of two it differs from `>=` only when amax is a power of two.)
* Bin index `k = floor(|x| / w) = floor(|x| * 2**-e)`: multiplying by a power of two only shifts the
  binary exponent, so the product is exact whenever it is a normal number. It is computed in float32
  for float32 inputs (float16 is widened exactly to float32), so no float64 copy of a large activation
  is made. A product that underflows is below 1 and floors to 0, which is the right bin.
* When a batch raises amax past `num_bins * w`, `e` grows by `d` and old bin `k` becomes bin `k >> d`:
  `floor(x / 2**(e+d)) = floor(floor(x / 2**e) / 2**d)` for every real x, i.e. power-of-two grids nest
  at 0. So the counts after any sequence of updates equal those of one pass over all the data at the
  final width: the histogram is bit-identical for any batching and any order, and `merge` of two shard
  histograms (both coarsened to the larger width, counts added) equals a single pass over both shards.
* Resolution: amax falls in the upper half of the range (unless e = MIN_EXPONENT), so between
  num_bins/2 and num_bins bins are used (1025..2048 by default), against exactly num_bins in
  pytorch_quantization.

Values that carry no range information are counted, never binned, and never widen the range:
* NaN and +-Inf (`nan_count`, `inf_count`); the caller warns naming the tensor. A tensor whose values
  are all NaN/Inf/sentinel has `num_values == 0`: the caller raises.
* Sentinels, |x| >= `SENTINEL_ABS` = 2**99 (~6.3e29): the `finfo(float32).min` (-3.4e38) and -1e30
  fills of attention masks and similar "minus infinity" constants. 2**99 is the largest power of two
  below 1e30, so a -1e30 fill counts too; a power of two is exact in float32 and float64, so the test
  gives the same answer whatever dtype a value arrives in, and it bounds `e` (<= 99) so that 2**-e
  stays a normal float32. A genuine activation is many orders of magnitude smaller (fp16 tops out at
  65504) and an INT8 scale of 1e27 would zero every real value, so nothing is lost by not calibrating
  on them. Smaller masking constants (-1e4, -1e9) are ordinary values: they are binned, and
  percentile/entropy/MSE clip them away.
* Exact zeros (`zeros`) are kept out of `counts`, so `counts[0]` holds only 0 < |x| < w. A zero is
  represented exactly by every scale and ReLU outputs are often half zeros; keeping them apart lets a
  histogram of only zeros exist without a width (`exponent is None`) and lets each amax method decide
  (percentile counts them in bin 0, entropy overwrites bin 0 anyway, MSE ignores them: their error is
  0 for every amax).

`MIN_EXPONENT = -126`: the width 2**-126 is the smallest normal float32 and its reciprocal 2**126, the
factor of the float32 product, is finite (the largest float32 power of two is 2**127; the reciprocal
of a subnormal width would overflow). With that floor every float32 input, subnormals included (down to
2**-149), is binned exactly; amaxes this small are anyway floored by the
caller (`AMAX_FLOOR` ~ 7.6e-6), so a finer width would buy nothing. A range of 1e-30 (~2**-100) still
gets its full num_bins resolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

from onnxq.errors import InternalError

try:  # the compiled one-pass kernel (_binning.c); optional, the numpy path below gives the same counts
    from onnxq.calib import _binning
except ImportError:  # pragma: no cover - depends on whether the install had a C compiler
    _binning = None

__all__ = ["DEFAULT_NUM_BINS", "MIN_EXPONENT", "SENTINEL_ABS", "Histogram", "HistogramAccumulator",
           "binning_kernel", "empty_histogram"]

DEFAULT_NUM_BINS = 2048
SENTINEL_ABS = 2.0**99
MIN_EXPONENT = -126
# `to_arrays` stores `exponent=None` as this value; every real exponent is in [-126, 99].
_NO_EXPONENT = int(np.iinfo(np.int64).min)
# Values binned per chunk: float and intp temporaries of 0.5 + 1 MB (float32) stay in cache.
_CHUNK = 1 << 17
_SCALARS = ("exponent", "zeros", "amax", "nan_count", "inf_count", "sentinel_count", "low", "high")
_FLOAT_SCALARS = ("amax", "low", "high")


@dataclass(frozen=True, eq=False)
class Histogram:
    """Histogram of |x| over `[0, num_bins * 2**exponent)`, plus counts of values kept out of it.

    `counts[k]` = #{x : k * w <= |x| < (k + 1) * w, x != 0}; exact zeros are in `zeros`. `counts` is
    stored as a read-only int64 copy. Instances compare equal when every field is identical.
    """

    counts: np.ndarray
    exponent: int | None
    zeros: int
    amax: float
    nan_count: int
    inf_count: int
    sentinel_count: int
    num_bins: int = DEFAULT_NUM_BINS
    low: float = 0.0   # min(0, smallest usable x): the signed range, for asymmetric (uint8) targets
    high: float = 0.0  # max(0, largest usable x)

    def __post_init__(self) -> None:
        if self.num_bins < 1:
            raise InternalError(f"a histogram needs at least one bin, got num_bins={self.num_bins}")
        counts = np.array(self.counts, dtype=np.int64)
        if counts.shape != (self.num_bins,):
            raise InternalError(f"histogram counts have shape {counts.shape}, expected ({self.num_bins},)")
        counts.setflags(write=False)
        object.__setattr__(self, "counts", counts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return np.array_equal(self.counts, other.counts) and all(
            getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.name != "counts")

    __hash__ = None  # type: ignore[assignment]  # equal histograms need not be the same object

    @property
    def bin_width(self) -> float:
        """`2**exponent`, or 0.0 while no non-zero value has been seen."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def num_values(self) -> int:
        """How many values carry range information: exact zeros + binned values (0 = nothing usable)."""
        return self.zeros + int(self.counts.sum())

    @property
    def num_ignored(self) -> int:
        """How many values were NaN, +-Inf or sentinels."""
        return self.nan_count + self.inf_count + self.sentinel_count

    def edges(self) -> np.ndarray:
        """The num_bins + 1 bin edges `k * w`, k = 0..num_bins (float64; all 0 while exponent is None)."""
        return np.arange(self.num_bins + 1, dtype=np.float64) * self.bin_width

    def update(self, values: np.ndarray) -> Histogram:
        """This histogram with `values` (any shape) added; `self` is unchanged.

        Cost: one pass over the input in cache-sized chunks; per chunk a min and a max, then one pass
        of the compiled kernel (`_binning.c`; or numpy's |x|, exact scale, int cast and `np.bincount`).
        A chunk that raises the range coarsens the counts so far (exact, see the module docstring), so
        chunking changes nothing in the result. Chunks holding NaN/Inf/sentinels take one extra
        filtering pass. Calibration uses `HistogramAccumulator`, which saves the copy of the counts.
        """
        if np.asarray(values).size == 0:
            return self
        accumulator = HistogramAccumulator(self)
        accumulator.add(values)
        return accumulator.freeze()

    def merge(self, other: Histogram) -> Histogram:
        """The histogram of both data sets: exactly what one pass over all of their values gives."""
        if other.num_bins != self.num_bins:
            raise InternalError(f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins")
        amax = max(self.amax, other.amax)
        exponent = _exponent_for(amax, self.num_bins)
        counts = _coarsen(self.counts, self.exponent, exponent) + _coarsen(other.counts, other.exponent,
                                                                             exponent)
        return Histogram(counts, exponent, self.zeros + other.zeros, amax,
                         self.nan_count + other.nan_count, self.inf_count + other.inf_count,
                         self.sentinel_count + other.sentinel_count, self.num_bins,
                         min(self.low, other.low), max(self.high, other.high))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numeric arrays (savable with `np.savez`, loadable without pickle).

        `counts` int64 (num_bins,); 0-d int64 `exponent` (None stored as int64 min), `zeros`,
        `nan_count`, `inf_count`, `sentinel_count`; 0-d float64 `amax`.
        """
        arrays = {"counts": self.counts.copy()}
        for name in _SCALARS:
            value = getattr(self, name)
            if name == "exponent" and value is None:
                value = _NO_EXPONENT
            arrays[name] = np.array(value, dtype=np.float64 if name in _FLOAT_SCALARS else np.int64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Histogram:
        """Rebuild a histogram from `to_arrays` output, checking it is self-consistent.

        Raises:
            ValueError: a key is missing or the arrays cannot come from `to_arrays` (the caller, who
                knows the file and the tensor, turns this into a CalibrationError).
        """
        missing = [k for k in ("counts", *_SCALARS) if k not in arrays]
        if missing:
            raise ValueError(f"histogram arrays lack {', '.join(missing)}")
        counts = np.asarray(arrays["counts"])
        scalars = {k: np.asarray(arrays[k]) for k in _SCALARS}
        if counts.ndim != 1 or counts.size == 0 or counts.dtype.kind not in "iu" or np.any(counts < 0):
            raise ValueError("histogram counts must be a non-empty 1-D array of non-negative integers")
        if any(a.shape != () for a in scalars.values()):
            raise ValueError("histogram scalars must be 0-d arrays")
        ints = {k: int(a) for k, a in scalars.items() if k not in _FLOAT_SCALARS}
        amax, low, high = (float(scalars[k]) for k in _FLOAT_SCALARS)
        exponent = None if ints.pop("exponent") == _NO_EXPONENT else int(scalars["exponent"])
        if min(ints.values()) < 0 or not 0.0 <= amax < SENTINEL_ABS or not -amax <= low <= 0.0 <= high <= amax:
            raise ValueError("histogram scalars out of range")
        result = cls(counts, exponent, amax=amax, num_bins=counts.size, low=low, high=high, **ints)
        _check_consistent(result)
        return result


class HistogramAccumulator:
    """A running histogram that is updated in place: `add` batch after batch, `freeze` at the end.

    Same result as chaining `Histogram.update`, without copying the counts on every batch (calibration
    adds one batch per tensor per step, so that copy is a fixed cost per tensor and batch).
    """

    def __init__(self, start: Histogram | None = None, num_bins: int = DEFAULT_NUM_BINS) -> None:
        h = empty_histogram(num_bins) if start is None else start
        self.num_bins = h.num_bins
        self.counts = np.array(h.counts, dtype=np.int64)  # a writable copy
        self.exponent, self.amax, self.zeros = h.exponent, h.amax, h.zeros
        self.low, self.high = h.low, h.high
        self.nan, self.inf, self.sentinels = h.nan_count, h.inf_count, h.sentinel_count

    def add(self, values: np.ndarray) -> None:
        """Fold `values` (any shape) in: one pass in cache-sized chunks (see `Histogram.update`)."""
        flat = _flat_float(np.asarray(values))
        if flat.size == 0 or self._fold_compiled(flat):
            return
        for start in range(0, flat.size, _CHUNK):
            self._fold(flat[start:start + _CHUNK])

    def freeze(self) -> Histogram:
        """The histogram so far (the accumulator stays usable)."""
        return Histogram(self.counts.copy(), self.exponent, self.zeros, self.amax, self.nan, self.inf,
                         self.sentinels, self.num_bins, self.low, self.high)

    def _fold_compiled(self, flat: np.ndarray) -> bool:
        """Fold all of `flat` in one pass of the C kernel; False (nothing changed) where it does not apply:
        no kernel, no range yet, not contiguous float32, or a value outside the current range (or NaN/Inf)."""
        if _binning is None or self.exponent is None or flat.dtype != np.float32 or not flat.flags.c_contiguous:
            return False
        try:
            folded = _binning.fold_f32(flat, math.ldexp(1.0, -self.exponent), self.counts)
        except ValueError as exc:
            raise InternalError(f"{exc} (exponent {self.exponent}, {self.num_bins} bins)") from exc
        if folded is None:
            return False
        zeros, low, high = folded
        self.zeros += zeros
        self.low, self.high = min(self.low, low), max(self.high, high)
        self.amax = max(self.amax, high, -low)  # inside the range: the exponent stays
        return True

    def _fold(self, chunk: np.ndarray) -> None:
        low, high = chunk.min(), chunk.max()
        if not (high < SENTINEL_ABS and -low < SENTINEL_ABS):  # NaN fails every comparison
            chunk, nan, inf, sentinels = _drop_unbinnable(chunk)
            self.nan, self.inf, self.sentinels = self.nan + nan, self.inf + inf, self.sentinels + sentinels
            if chunk.size == 0:
                return
            low, high = chunk.min(), chunk.max()
        self.low, self.high = min(self.low, float(low)), max(self.high, float(high))
        peak = float(max(high, -low))
        if peak > self.amax:
            self.amax = peak
            exponent = _exponent_for(peak, self.num_bins)
            self.counts = _coarsen(self.counts, self.exponent, exponent)
            self.exponent = exponent
        if peak == 0.0 or self.exponent is None:
            self.zeros += chunk.size
            return
        if not self._fold_compiled(chunk):  # every value is inside the range now: refused only without the kernel
            self.zeros += self._add_bins(chunk)

    def _add_bins(self, chunk: np.ndarray) -> int:
        """numpy: add floor(|x| * 2**-exponent) of the non-zero values to `counts`; return #exact zeros."""
        counts, zeros = _bin_counts(chunk, self.exponent, self.num_bins)
        self.counts += counts
        return zeros


def binning_kernel() -> str:
    """Which binning code runs: "compiled" (the C kernel built at install) or "numpy" (no compiler)."""
    return "numpy" if _binning is None else "compiled"


def empty_histogram(num_bins: int = DEFAULT_NUM_BINS) -> Histogram:
    """A histogram that has seen no values."""
    return Histogram(np.zeros(num_bins, np.int64), None, 0, 0.0, 0, 0, 0, num_bins)


def _check_consistent(h: Histogram) -> None:
    """Raise ValueError unless exponent and counts are what the updates would have produced for amax."""
    if h.exponent != _exponent_for(h.amax, h.num_bins):
        raise ValueError(f"histogram exponent {h.exponent} does not match amax {h.amax!r}")
    used = np.flatnonzero(h.counts)
    top = -1 if h.exponent is None else int(math.ldexp(h.amax, -h.exponent))
    if (used[-1] if used.size else -1) != top:
        raise ValueError(f"histogram counts do not end in the bin of amax {h.amax!r}")


def _exponent_for(amax: float, num_bins: int) -> int | None:
    """The smallest e >= MIN_EXPONENT with amax < num_bins * 2**e; None for amax 0."""
    if amax == 0.0:
        return None
    e = math.frexp(amax / num_bins)[1]  # right or off by one after rounding; fixed exactly below
    while e > MIN_EXPONENT and math.ldexp(num_bins, e - 1) > amax:
        e -= 1
    while math.ldexp(num_bins, e) <= amax:
        e += 1
    return max(e, MIN_EXPONENT)


def _coarsen(counts: np.ndarray, old: int | None, new: int | None) -> np.ndarray:
    """Counts on the grid of width 2**old re-expressed on the (nested) grid of width 2**new."""
    if old is None or old == new:
        return counts
    if new is None or new < old:
        raise InternalError(f"a histogram's bin width can only grow (exponent {old} -> {new})")
    shift = new - old
    out = np.zeros(counts.size, np.int64)
    if shift >= (counts.size - 1).bit_length():  # every old bin k < 2**shift lands in bin 0
        out[0] = counts.sum()
        return out
    merged = np.add.reduceat(counts, np.arange(0, counts.size, 1 << shift))  # old bin k -> k >> shift
    out[:merged.size] = merged
    return out


def _flat_float(data: np.ndarray) -> np.ndarray:
    """`data` flattened (a view when possible) as float32 for float16/32 input, float64 otherwise."""
    if data.dtype not in (np.float32, np.float64):
        small_float = data.dtype.kind == "f" and data.dtype.itemsize < 4
        data = data.astype(np.float32 if small_float else np.float64)  # exact widening for floats
    return data.ravel(order="K")


def _drop_unbinnable(flat: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """(the binnable values, #NaN, #Inf, #sentinels)."""
    mags = np.abs(flat)
    keep = mags < SENTINEL_ABS  # False for NaN and Inf as well
    nan = int(np.count_nonzero(np.isnan(mags)))
    inf = int(np.count_nonzero(np.isinf(mags)))
    kept = flat[keep]
    return kept, nan, inf, mags.size - kept.size - nan - inf


def _bin_counts(flat: np.ndarray, exponent: int, num_bins: int,
                buffer: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(counts of floor(|x| * 2**-exponent) without the exact zeros, #exact zeros): the numpy reference.

    `_binning.bin_abs_f32` computes the same counts in one pass; this is what runs for float64 input,
    non-contiguous chunks, or when the C kernel was not built.

    Works through `flat` in chunks of `_CHUNK` values so the float and intp temporaries stay in cache
    and peak memory does not grow with the tensor.
    """
    scale = flat.dtype.type(math.ldexp(1.0, -exponent))  # exact: a power of two, normal in float32
    as_int = np.int32 if flat.dtype.itemsize == 4 else np.int64  # |x| == 0 iff its bits are 0
    if buffer is None or buffer.dtype != flat.dtype or buffer.size < min(_CHUNK, flat.size):
        buffer = np.empty(min(_CHUNK, flat.size), flat.dtype)
    counts = np.zeros(num_bins, np.int64)
    zeros = 0
    for start in range(0, flat.size, _CHUNK):
        part = buffer[:min(_CHUNK, flat.size - start)]
        np.abs(flat[start:start + _CHUNK], out=part)
        zeros += part.size - int(np.count_nonzero(part.view(as_int)))
        np.multiply(part, scale, out=part)
        chunk_counts = np.bincount(part.astype(np.intp), minlength=num_bins)  # truncation == floor
        if chunk_counts.size != num_bins:
            raise InternalError(f"a value fell past the last of {num_bins} bins (exponent {exponent})")
        counts += chunk_counts
    counts[0] -= zeros
    return counts, zeros
