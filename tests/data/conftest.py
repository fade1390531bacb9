"""Fixtures for the data-layer tests: Silero VAD's signature and labelled Silero-style feeds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
import pytest

from onnxq.data.signature import Feed, ModelSignature, signature_of
from tests.support.paths import MODELS

SILERO = MODELS / "silero_vad.onnx"


@pytest.fixture(scope="session")
def silero_signature() -> ModelSignature:
    """Silero VAD's inputs: audio 'input' (N, ?), recurrent 'state' (2, N, 128), rank-0 'sr'."""
    return signature_of(onnx.load(SILERO))


@pytest.fixture(scope="session")
def vad_feed() -> Callable[..., Feed]:
    """make(samples, first=0): a Silero-style feed whose sample i (counting from `first`) is labelled i:
    its audio row input[i, :] is all i, its state column state[l, i, :] is all 1000 * l + i."""

    def make(samples: int, first: int = 0) -> Feed:
        labels = np.arange(first, first + samples, dtype=np.float32)
        state = np.stack([np.repeat(1000 * layer + labels[:, None], 128, axis=1) for layer in range(2)])
        return {"input": np.repeat(labels[:, None], 512, axis=1), "state": state, "sr": np.array(16000, np.int64)}

    return make


@pytest.fixture(scope="session")
def vad_labels() -> Callable[[Iterable[Mapping[str, np.ndarray]]], list[int]]:
    """labels(feeds): the sample labels of `vad_feed` data in order, after checking that every feed keeps
    each sample's audio row and state columns together (and `sr` whole)."""

    def labels(feeds: Iterable[Mapping[str, np.ndarray]]) -> list[int]:
        found: list[int] = []
        for feed in feeds:
            audio, state = feed["input"], feed["state"]
            assert state.shape == (2, audio.shape[0], 128) and feed["sr"].shape == () and int(feed["sr"]) == 16000
            assert np.all(audio == audio[:, :1]) and np.all(state == state[:, :, :1])
            assert np.array_equal(state[0, :, 0], audio[:, 0]) and np.array_equal(state[1, :, 0], 1000 + audio[:, 0])
            found += audio[:, 0].astype(int).tolist()
        return found

    return labels
