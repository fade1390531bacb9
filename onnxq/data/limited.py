"""`FirstSamples`: at most N samples of another calibration source (`--max-samples N`).

It makes an endless data-loader generator a finite source: each pass over the data takes the first N samples
the loader gives and then closes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from onnxq.errors import ConfigError
from onnxq.data.signature import Feed, ModelSignature, SignedSource

__all__ = ["FirstSamples"]


class _Source(Protocol):
    """`onnxq.data.sources.CalibSource` (not imported: that module imports this one)."""

    def describe(self) -> str: ...

    def num_samples(self) -> int | None: ...

    def batches(self, batch_size: int) -> Iterator[Feed]: ...


class FirstSamples(SignedSource):
    """The first `limit` samples of `source` (all of them if it has fewer), in batches cut to fit."""

    def __init__(self, source: _Source, limit: int, signature: ModelSignature) -> None:
        if limit < 1:
            raise ConfigError(f"--max-samples must be at least 1, got {limit}")
        self._source, self._limit, self._signature = source, limit, signature

    def describe(self) -> str:
        """E.g. "at most 64 samples of feeds from loader.py:load_data"."""
        return f"at most {self._limit} samples of {self._source.describe()}"

    def num_samples(self) -> int | None:
        """The limit, or fewer when the source says it holds fewer (None: unknown until read)."""
        total = self._source.num_samples()
        return None if total is None else min(total, self._limit)

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """The source's batches until `limit` samples have been given, the last one cut short if needed."""
        left = self._limit
        inner = self._source.batches(batch_size)
        try:
            for feed in inner:
                count = self._signature.samples_in(feed)
                if count >= left:
                    yield feed if count == left else dict(self._signature.cut(feed, 0, left))
                    return
                left -= count
                yield feed
        finally:
            close = getattr(inner, "close", None)
            if close is not None:  # ends the loader's generator now, not whenever it is collected
                close()
