"""Per-tensor calibration statistics: a running max, or a histogram (see histogram.py).

Both ignore the same values: NaN, +-Inf and sentinels (|x| >= SENTINEL_ABS, e.g. the float32 min that
attention masks add), so a mask value never becomes a tensor's range. After calibration,
`check_stats` warns about ignored values, naming the tensor, and refuses tensors with no usable value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from onnxq.errors import CalibrationError
from onnxq.calib.histogram import SENTINEL_ABS, Histogram, HistogramAccumulator

__all__ = ["MaxStats", "TensorStats", "StatsAccumulator", "new_accumulator", "check_stats", "merge_all"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaxStats:
    """max |x| over usable values, and how many values were ignored."""

    amax: float = 0.0
    num_values: int = 0
    nan_count: int = 0
    inf_count: int = 0
    sentinel_count: int = 0
    low: float = 0.0   # min(0, smallest usable x): the signed range, for asymmetric (uint8) targets
    high: float = 0.0  # max(0, largest usable x)

    def update(self, values: np.ndarray) -> MaxStats:
        data = np.asarray(values)
        if data.size == 0:
            return self
        low, high = float(data.min()), float(data.max())
        batch_amax = max(-low, high)
        nan = inf = sentinel = 0
        if not (np.isfinite(batch_amax) and batch_amax < SENTINEL_ABS):
            signed = data.astype(np.float64, copy=False).ravel()
            magnitude = np.abs(signed)
            nan, inf = int(np.isnan(magnitude).sum()), int(np.isinf(magnitude).sum())
            usable = signed[np.isfinite(magnitude) & (magnitude < SENTINEL_ABS)]
            sentinel = int(data.size - nan - inf - usable.size)
            low, high = (float(usable.min()), float(usable.max())) if usable.size else (0.0, 0.0)
            batch_amax = max(-low, high)
            used = usable.size
        else:
            used = data.size
        return MaxStats(max(self.amax, batch_amax), self.num_values + used, self.nan_count + nan,
                        self.inf_count + inf, self.sentinel_count + sentinel,
                        min(self.low, low), max(self.high, high))

    def merge(self, other: MaxStats) -> MaxStats:
        return MaxStats(max(self.amax, other.amax), self.num_values + other.num_values,
                        self.nan_count + other.nan_count, self.inf_count + other.inf_count,
                        self.sentinel_count + other.sentinel_count, min(self.low, other.low),
                        max(self.high, other.high))


TensorStats = MaxStats | Histogram


class StatsAccumulator(Protocol):
    """Running statistics of one tensor, updated in place batch by batch."""

    def add(self, values: np.ndarray) -> None: ...

    def freeze(self) -> TensorStats: ...


class MaxAccumulator:
    """`MaxStats` updated in place (a MaxStats is a handful of scalars: nothing to save by mutating it)."""

    def __init__(self) -> None:
        self.stats = MaxStats()

    def add(self, values: np.ndarray) -> None:
        self.stats = self.stats.update(values)

    def add_maxima(self, maxima: np.ndarray, num_values: int) -> bool:
        """Fold the channel maxima of a tensor that cannot be negative and holds `num_values` values.

        Returns False, folding nothing, when a maximum is NaN, Inf or a sentinel: the caller then adds
        the whole tensor, so those values are counted and left out as `update` does.
        """
        data = np.asarray(maxima)
        if data.size == 0:
            return num_values == 0
        high = max(float(data.max()), 0.0)
        if not (np.isfinite(high) and high < SENTINEL_ABS):  # also catches a NaN maximum
            return False
        s = self.stats
        self.stats = MaxStats(max(s.amax, high), s.num_values + num_values, s.nan_count, s.inf_count,
                              s.sentinel_count, min(s.low, 0.0), max(s.high, high))
        return True

    def freeze(self) -> MaxStats:
        return self.stats


def new_accumulator(histogram: bool, num_bins: int) -> StatsAccumulator:
    return HistogramAccumulator(num_bins=num_bins) if histogram else MaxAccumulator()


def merge_all(stats: list[TensorStats]) -> TensorStats:
    merged = stats[0]
    for other in stats[1:]:
        merged = merged.merge(other)  # type: ignore[arg-type]
    return merged


def check_stats(stats: Mapping[str, TensorStats]) -> None:
    """Warn about ignored values per tensor; raise for a tensor with no usable value at all."""
    for name, tensor_stats in stats.items():
        ignored = tensor_stats.nan_count + tensor_stats.inf_count + tensor_stats.sentinel_count
        if tensor_stats.num_values == 0 and ignored > 0:
            raise CalibrationError(
                f"tensor '{name}': every calibration value is NaN, Inf or a sentinel (|x| >= {SENTINEL_ABS:.3g}); "
                "Hint: exclude the node that reads it (--exclude-nodes) or check the calibration data")
        if tensor_stats.nan_count or tensor_stats.inf_count:
            log.warning("tensor '%s': %d NaN and %d Inf values ignored in calibration",
                        name, tensor_stats.nan_count, tensor_stats.inf_count)
        if tensor_stats.sentinel_count:
            log.info("tensor '%s': %d sentinel values (|x| >= %.3g, e.g. attention-mask fills) left out of its range",
                     name, tensor_stats.sentinel_count, SENTINEL_ABS)
