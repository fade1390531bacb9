"""Held-back data: the samples an accuracy target is measured on, split off the calibration data.

Without separate evaluation data, every `HELD_BACK_EVERY`-th calibration sample is held back and never
calibrated on; with it, its first samples are held back. Samples are counted, selected and re-joined
along each input's own sample axis (the model's `ModelSignature`): axis 1 of a recurrent state
[layers, N, hidden] beside axis 0 of the audio in Silero VAD. Rank-0 inputs go whole with every batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from onnxq.data.signature import Feed, ModelSignature
from onnxq.data.sources import CalibSource
from onnxq.errors import ConfigError

__all__ = ["HELD_BACK_EVERY", "held_back_sources"]

#: Without separate evaluation data, every HELD_BACK_EVERY-th calibration sample is held back.
HELD_BACK_EVERY = 4


def _signature_for(source: CalibSource, signature: ModelSignature | None) -> ModelSignature | None:
    """The signature to split `source` by: the one given, else the source's own (None: read from its feeds)."""
    if signature is not None:
        return signature
    own = getattr(source, "signature", None)
    return own if isinstance(own, ModelSignature) else None


class _Subset:
    """The samples of `source` whose position (0, 1, ... over the whole source) `keep` accepts, selected
    along the sample axes of `signature` (None: the source's own, else those its feeds imply: axis 0).
    `stop`: no sample at or after this position is kept, so reading stops there."""

    def __init__(self, source: CalibSource, keep: Callable[[np.ndarray], np.ndarray], samples: int | None,
                 description: str, signature: ModelSignature | None, stop: int | None = None) -> None:
        self._source, self._keep, self._samples = source, keep, samples
        self._description, self._stop = description, stop
        self._signature = _signature_for(source, signature)

    @property
    def signature(self) -> ModelSignature | None:
        """The inputs the samples are selected along (None: implied by the source's feeds)."""
        return self._signature

    def describe(self) -> str:
        """Where the samples come from and which of them are kept."""
        return self._description

    def num_samples(self) -> int | None:
        """The samples kept, if the source knows its count."""
        return self._samples

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """Batches of `batch_size` kept samples (the last may be smaller); see `CalibSource.batches`."""
        signature = self._signature
        pending: list[Feed] = []
        position = count = 0
        for feed in self._source.batches(batch_size):
            if signature is None:
                signature = ModelSignature.of_feed(feed)
            size = signature.samples_in(feed)
            mask = self._keep(np.arange(position, position + size))
            position += size
            if not any(name in feed for name in signature.sample_axes):  # no sample axis: the feed is one sample
                if mask.all():
                    yield feed
            else:
                if mask.any():
                    pending.append(signature.select(feed, mask))
                    count += int(mask.sum())
                while count >= batch_size:
                    joined = signature.join(pending)
                    yield signature.cut(joined, 0, batch_size)
                    pending, count = [signature.cut(joined, batch_size, count)], count - batch_size
            if self._stop is not None and position >= self._stop:
                break  # nothing further is kept: do not read (decode) the rest
        if count > 0 and signature is not None:
            yield signature.join(pending)


def held_back_sources(calib: CalibSource | None, evaluation: CalibSource | None, samples: int, *,
                      signature: ModelSignature | None = None) -> tuple[CalibSource | None, CalibSource]:
    """Split off the held-back samples: (what calibration uses, what accuracy is measured on).

    With `evaluation`, its first `samples` samples are held back and calibration keeps all of
    `calib`. Without, every fourth calibration sample (the 4th, 8th, ...), up to `samples` of them,
    is held back and never used for calibration. Interleaving, rather than the last quarter, keeps
    both parts alike when the data is sorted, and needs no sample count (loader scripts have none).

    Args:
        calib: the calibration data, or None (statistics from a file).
        evaluation: separate evaluation data, or None.
        samples: at most this many samples are held back.
        signature: the model's inputs, along whose sample axes samples are counted and selected
            (default: each source's own `signature`, which the sources onnxq opens have; a source
            without one holds its samples on axis 0 of every input of rank >= 1).

    Raises:
        ConfigError: neither source is given (statistics files hold no samples to hold back).
    """
    if evaluation is not None:
        total = evaluation.num_samples()
        count = samples if total is None else min(samples, total)
        where = evaluation.describe() if total is not None and total <= samples else \
            f"the first {count} of {evaluation.describe()}"
        return calib, _Subset(evaluation, lambda p: p < samples, count, where, signature, stop=samples)
    if calib is None:
        raise ConfigError("an accuracy target needs held-back data: give --eval PATH (statistics files hold "
                          "no samples)")
    every = HELD_BACK_EVERY
    total = calib.num_samples()
    held = None if total is None else min(samples, total // every)

    def is_held(p: np.ndarray) -> np.ndarray:
        return (p % every == every - 1) & (p // every < samples)

    held_source = _Subset(calib, is_held, held, f"every {every}th of {calib.describe()}, up to {samples} "
                          "(not used for calibration)", signature, stop=every * samples)
    kept = None if total is None or held is None else total - held
    return (_Subset(calib, lambda p: ~is_held(p), kept, f"{calib.describe()} minus the held-back samples", signature),
            held_source)
