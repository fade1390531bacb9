"""The held-back split on Silero-style data: samples are held back along each input's own sample axis,
axis 1 of the recurrent state [2, N, 128] beside axis 0 of the audio, and never calibrated on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from onnxq.data.feeds import FeedsSource
from onnxq.data.held_back import HELD_BACK_EVERY, held_back_sources
from onnxq.data.signature import Feed
from onnxq.data.sources import open_source
from onnxq.errors import ConfigError


class _Unsigned:
    """A source of one's own: batches of a FeedsSource, without a `signature` attribute."""

    def __init__(self, inner: FeedsSource) -> None:
        self._inner = inner

    def describe(self) -> str:
        return self._inner.describe()

    def num_samples(self) -> int:
        return self._inner.num_samples()

    def batches(self, batch_size: int) -> Iterator[Feed]:
        return self._inner.batches(batch_size)


@pytest.mark.parametrize("how", ["the source's own signature", "signature= for a source without one",
                                 "an opened .npz"])
def test_every_fourth_sample_is_held_back_along_each_inputs_axis(how: str, silero_signature, vad_feed, vad_labels,
                                                                 tmp_path: Path) -> None:
    signed = FeedsSource([vad_feed(10), vad_feed(12, first=10)], signature=silero_signature)  # 22 samples
    if how == "the source's own signature":
        kept, held = held_back_sources(signed, None, samples=4)
    elif how == "signature= for a source without one":
        kept, held = held_back_sources(_Unsigned(signed), None, samples=4, signature=silero_signature)
    else:
        np.savez(tmp_path / "vad.npz", **signed.signature.join([vad_feed(10), vad_feed(12, first=10)]))
        kept, held = held_back_sources(open_source(tmp_path / "vad.npz", silero_signature), None, samples=4)
    assert HELD_BACK_EVERY == 4
    held_batches, kept_batches = list(held.batches(3)), list(kept.batches(3))
    assert vad_labels(held_batches) == [3, 7, 11, 15]  # capped at 4 samples; 19 goes to calibration
    assert [b["state"].shape for b in held_batches] == [(2, 3, 128), (2, 1, 128)]
    assert [b["input"].shape for b in held_batches] == [(3, 512), (1, 512)]
    kept_labels = vad_labels(kept_batches)
    assert kept_labels == [label for label in range(22) if label not in (3, 7, 11, 15)]
    assert [b["state"].shape[1] for b in kept_batches] == [3] * 6
    assert held.num_samples() == 4 and kept.num_samples() == 18
    # Together, the held-back and the kept samples are the original data, each sample whole.
    together = silero_signature.join(held_batches + kept_batches)
    order = np.argsort(vad_labels([together]))
    original = silero_signature.join([vad_feed(22)])
    assert np.array_equal(together["input"][order], original["input"])
    assert np.array_equal(together["state"][:, order], original["state"])


def test_evaluation_data_gives_its_first_samples_and_calibration_keeps_everything(silero_signature, vad_feed,
                                                                                    vad_labels) -> None:
    calib = FeedsSource([vad_feed(8)], signature=silero_signature)
    evaluation = FeedsSource([vad_feed(4, first=100), vad_feed(6, first=104)], signature=silero_signature)
    kept, held = held_back_sources(calib, evaluation, samples=6)
    assert kept is calib and vad_labels(kept.batches(3)) == list(range(8))
    held_batches = list(held.batches(4))
    assert [b["state"].shape for b in held_batches] == [(2, 4, 128), (2, 2, 128)]
    assert vad_labels(held_batches) == list(range(100, 106)) and held.num_samples() == 6
    first_six = silero_signature.cut(silero_signature.join([vad_feed(4, first=100), vad_feed(6, first=104)]), 0, 6)
    joined = silero_signature.join(held_batches)
    assert all(np.array_equal(joined[name], first_six[name]) for name in first_six)
    _, whole = held_back_sources(calib, evaluation, samples=50)
    assert vad_labels(whole.batches(4)) == list(range(100, 110)) and whole.num_samples() == 10


def test_held_back_samples_are_every_fourth_and_never_calibrated() -> None:
    x = np.arange(22, dtype=np.float32).reshape(22, 1)
    calib, held = held_back_sources(FeedsSource([{"x": x}]), None, samples=4)
    held_values = np.concatenate([feed["x"] for feed in held.batches(3)]).ravel()
    calib_batches = list(calib.batches(3))
    calib_values = np.concatenate([feed["x"] for feed in calib_batches]).ravel()
    assert held_values.tolist() == [3, 7, 11, 15]  # capped at 4; 19 goes to calibration
    assert sorted(calib_values.tolist() + held_values.tolist()) == list(range(22))
    assert [len(feed["x"]) for feed in calib_batches] == [3, 3, 3, 3, 3, 3]
    assert held.num_samples() == 4 and calib.num_samples() == 18


def test_held_back_from_evaluation_data_takes_its_first_samples() -> None:
    evaluation = FeedsSource([{"x": np.arange(10, dtype=np.float32).reshape(10, 1)}])
    calib = FeedsSource([{"x": np.zeros((4, 1), np.float32)}])
    kept, held = held_back_sources(calib, evaluation, samples=6)
    assert kept is calib
    assert np.concatenate([f["x"] for f in held.batches(4)]).ravel().tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="--eval"):
        held_back_sources(None, None, samples=6)


def test_a_source_without_a_signature_holds_its_samples_on_axis_0() -> None:
    x = np.arange(22, dtype=np.float32).reshape(22, 1)
    calib, held = held_back_sources(_Unsigned(FeedsSource([{"x": x}])), None, samples=4)
    assert np.concatenate([f["x"] for f in held.batches(3)]).ravel().tolist() == [3, 7, 11, 15]
    assert len(np.concatenate([f["x"] for f in calib.batches(3)])) == 18
