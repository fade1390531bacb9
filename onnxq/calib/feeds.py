"""Calibration data already in memory: a list of feed dicts, for the Python API and tests."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from ..errors import CalibrationError

__all__ = ["FeedsSource"]

Feed = dict[str, np.ndarray]


class FeedsSource:
    """Feeds held in memory, re-batched along axis 0 (rank-0 inputs are passed with every batch)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], description: str = "in-memory feeds") -> None:
        if not feeds:
            raise CalibrationError(f"{description}: no feeds")
        names = set(feeds[0])
        for i, feed in enumerate(feeds):
            if set(feed) != names:
                raise CalibrationError(f"{description}: feed {i} has inputs {sorted(feed)}, feed 0 has {sorted(names)}")
        self._feeds = [{k: np.asarray(v) for k, v in feed.items()} for feed in feeds]
        self._description = description

    def describe(self) -> str:
        return f"{self.num_samples()} samples of {self._description}"

    def num_samples(self) -> int:
        return sum(max((a.shape[0] for a in f.values() if a.ndim > 0), default=1) for f in self._feeds)

    def batches(self, batch_size: int) -> Iterator[Feed]:
        batched = [n for n, a in self._feeds[0].items() if a.ndim > 0]
        scalars = {n: a for n, a in self._feeds[0].items() if a.ndim == 0}
        if not batched:
            yield from (dict(f) for f in self._feeds)
            return
        joined = {n: np.concatenate([f[n] for f in self._feeds]) for n in batched}
        total = joined[batched[0]].shape[0]
        for start in range(0, total, batch_size):
            yield {**{n: a[start:start + batch_size] for n, a in joined.items()}, **scalars}
