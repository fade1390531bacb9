"""Calibration data already in memory: a list of feed dicts, for the Python API and tests."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from onnxq.errors import CalibrationError
from onnxq.data.signature import Feed, InputSpec, ModelSignature, SignedSource
from onnxq.data.sources import check_arrays

__all__ = ["FeedsSource"]


class FeedsSource(SignedSource):
    """Feeds held in memory, re-batched along their sample axes (rank-0 inputs are passed with every batch).

    With `signature` (`signature_of(model)`), every feed is checked against the model's inputs and the
    samples are cut along each input's own sample axis, e.g. axis 1 of a recurrent state
    [layers, N, hidden]. Without it, every input of rank >= 1 holds its samples on axis 0.
    `sample_axes` is the older way to name the inputs whose samples are elsewhere, e.g. {"state": 1};
    it is deprecated in favour of `signature`.
    """

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], description: str = "in-memory feeds",
                 signature: ModelSignature | Sequence[InputSpec] | None = None, *,
                 sample_axes: Mapping[str, int] | None = None) -> None:
        if isinstance(signature, Mapping):  # FeedsSource(feeds, description, {"state": 1}): the old third argument
            signature, sample_axes = None, signature
        if sample_axes is not None:
            warnings.warn("FeedsSource(sample_axes=) is deprecated: pass signature=onnxq.signature_of(model)",
                          DeprecationWarning, stacklevel=2)
            if signature is not None:
                raise CalibrationError(f"{description}: give signature= or sample_axes=, not both")
        if not feeds:
            raise CalibrationError(f"{description}: no feeds")
        names = set(feeds[0])
        for i, feed in enumerate(feeds):
            if set(feed) != names:
                raise CalibrationError(f"{description}: feed {i} has inputs {sorted(feed)}, feed 0 has {sorted(names)}")
        self._feeds = [{k: np.asarray(v) for k, v in feed.items()} for feed in feeds]
        self._description = description
        if signature is None:
            self._signature = ModelSignature.of_feed(self._feeds[0], sample_axes)
        else:
            self._signature = ModelSignature.of(signature)
            for i, feed in enumerate(self._feeds):
                check_arrays(f"{description} feed {i}", {n: (a.shape, a.dtype) for n, a in feed.items()},
                             self._signature)

    def describe(self) -> str:
        """E.g. "64 samples of in-memory feeds"."""
        return f"{self.num_samples()} samples of {self._description}"

    def num_samples(self) -> int:
        """Samples over all feeds, along the sample axes (one per feed when no input has one)."""
        return sum(self._signature.samples_in(f) for f in self._feeds)

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """Batches of `batch_size` samples cut across feed boundaries (the last may be smaller); rank-0
        inputs come from the first feed."""
        signature = self._signature
        if not signature.sample_axes:
            yield from (dict(f) for f in self._feeds)
            return
        joined = signature.join(self._feeds)
        total = signature.samples_in(joined)
        for start in range(0, total, batch_size):
            yield signature.cut(joined, start, start + batch_size)
