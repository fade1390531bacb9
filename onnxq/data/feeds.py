"""Calibration data already in memory: a list of feed dicts, for the Python API and tests."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from onnxq.errors import CalibrationError
from onnxq.data.sources import cut_samples, samples_in

__all__ = ["FeedsSource"]

Feed = dict[str, np.ndarray]


class FeedsSource:
    """Feeds held in memory, re-batched along their sample axes (rank-0 inputs are passed with every batch).

    `sample_axes` names the inputs whose samples are not stacked on axis 0, e.g. {"state": 1} for a
    recurrent state [layers, N, hidden]; every other input of rank >= 1 has them on axis 0.
    """

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], description: str = "in-memory feeds",
                 sample_axes: Mapping[str, int] | None = None) -> None:
        if not feeds:
            raise CalibrationError(f"{description}: no feeds")
        names = set(feeds[0])
        for i, feed in enumerate(feeds):
            if set(feed) != names:
                raise CalibrationError(f"{description}: feed {i} has inputs {sorted(feed)}, feed 0 has {sorted(names)}")
        self._feeds = [{k: np.asarray(v) for k, v in feed.items()} for feed in feeds]
        self._description = description
        self._axes = {name: (sample_axes or {}).get(name, 0) for name, a in self._feeds[0].items() if a.ndim > 0}

    def describe(self) -> str:
        return f"{self.num_samples()} samples of {self._description}"

    def num_samples(self) -> int:
        return sum(samples_in(f, self._axes) for f in self._feeds)

    def batches(self, batch_size: int) -> Iterator[Feed]:
        scalars = {n: a for n, a in self._feeds[0].items() if a.ndim == 0}
        if not self._axes:
            yield from (dict(f) for f in self._feeds)
            return
        joined = {n: np.concatenate([f[n] for f in self._feeds], axis=axis) for n, axis in self._axes.items()}
        total = samples_in(joined, self._axes)
        for start in range(0, total, batch_size):
            yield {**{n: cut_samples(a, self._axes[n], start, start + batch_size) for n, a in joined.items()},
                   **scalars}
