"""Per-channel activation ranges: max |x| of each hidden channel (the last axis) over the calibration data.

SmoothQuant needs, for every smoothed tensor X of shape [..., K], the vector max_j |X[..., j]| over all
tokens (Xiao et al., "SmoothQuant", ICML 2023, section 4). The tensors are exposed as graph outputs and
the data runs through ONNX Runtime batch by batch, as in `calibrate`; each batch is reduced at once
over every axis but the last and folded into a running per-channel max, so no activation is kept.
NaN, +-Inf and sentinels (|x| >= `SENTINEL_ABS`, the float32-min fill of attention masks) are left out
of the max, as in the per-tensor statistics, and counted in a warning.

`channel_profiles` also keeps, per tensor, the per-channel min and max and an evenly spaced sample of
at most `rows` rows (vectors of the last axis, from every batch; rows holding a dropped value are
skipped), on which SmoothQuant's per-layer alpha is measured.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.options import CalibConfig
from onnxq.errors import CalibrationError, ModelError
from onnxq.calib.expose import expose_tensors
from onnxq.calib.calibrate import full_batches
from onnxq.data.signature import ModelSignature, signature_of
from onnxq.data.sources import CalibSource
from onnxq.calib.histogram import SENTINEL_ABS
from onnxq.runtime.session import open_session

__all__ = ["ChannelProfile", "channel_absmax", "channel_profiles"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelProfile:
    """One tensor's per-channel ranges over the calibration data, and a sample of its rows.

    Attributes:
        low: min per channel of the last axis (float64; 0 for a channel with no usable value).
        high: max per channel.
        rows: [R, K] float32 rows, evenly spaced over every batch.
    """

    low: np.ndarray
    high: np.ndarray
    rows: np.ndarray

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))


def channel_absmax(graph: gs.Graph, tensor_names: Iterable[str], source: CalibSource,
                   config: CalibConfig, *, signature: ModelSignature | None = None) -> dict[str, np.ndarray]:
    """max |x| per channel of the last axis, for each named tensor, over all of `source`.

    Args and raises: as `channel_profiles`.

    Returns:
        Tensor name -> float32 vector of length K (the tensor's last dimension). A channel with no
        usable value has range 0.
    """
    profiles = channel_profiles(graph, tensor_names, source, config, signature=signature, rows=0)
    return {name: profile.absmax.astype(np.float32) for name, profile in profiles.items()}


def channel_profiles(graph: gs.Graph, tensor_names: Iterable[str], source: CalibSource, config: CalibConfig, *,
                     signature: ModelSignature | None = None, rows: int = 512) -> dict[str, ChannelProfile]:
    """Per-channel min and max of the last axis and a sample of `rows` rows, for each named tensor.

    Args:
        graph: the prepared float graph (the one the smoothing pass will rewrite).
        tensor_names: tensors to measure; graph inputs are read from the feeds.
        source: calibration batches.
        config: batch size and execution providers (the method is irrelevant here).
        signature: the model's inputs, how batches are counted (default: `signature_of(graph)`).
        rows: how many rows to keep per tensor (0: none).

    Raises:
        ModelError: a name is not a tensor of `graph`.
        CalibrationError: `source` holds no samples, a tensor is a scalar, or its last dimension
            changes between batches.
    """
    names = tuple(dict.fromkeys(tensor_names))
    known = graph.tensors()
    for name in names:
        if name not in known:
            raise ModelError(f"tensor '{name}' is not in the graph; cannot measure its channel ranges")
    if not names:
        return {}
    input_names = {t.name for t in graph.inputs}
    exposed = [n for n in names if n not in input_names]
    running = {name: _Running(name, rows) for name in names}
    samples = 0
    signature = signature_of(graph) if signature is None else signature
    with open_session(expose_tensors(graph, exposed), config.providers, optimize=True,
                      spin_after_run=False) as session:
        for feed in full_batches(source, graph, config.batch_size, signature=signature):
            outputs = session.run(feed, exposed) if exposed else {}
            outputs.update({n: feed[n] for n in names if n in input_names})
            for name in names:
                running[name].add(outputs.pop(name))
            samples += signature.samples_in(feed)
    if samples == 0:
        raise CalibrationError(f"{source.describe()}: no calibration samples")
    for name, state in running.items():
        if state.ignored:
            log.warning("tensor '%s': %d NaN, Inf or sentinel values left out of its channel ranges", name,
                        state.ignored)
    return {name: state.profile() for name, state in running.items()}


class _Running:
    """One tensor's running per-channel min/max and row sample."""

    def __init__(self, name: str, rows: int) -> None:
        self.name, self.rows = name, rows
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.kept: list[np.ndarray] = []
        self.ignored = 0

    def add(self, values: np.ndarray) -> None:
        data = np.asarray(values)
        if data.ndim == 0:
            raise CalibrationError(f"tensor '{self.name}' is a scalar: it has no channel axis to smooth")
        flat = data.reshape(-1, data.shape[-1]) if data.size else np.zeros((0, data.shape[-1]), data.dtype)
        if self.low is not None and self.low.shape[0] != flat.shape[1]:
            raise CalibrationError(f"tensor '{self.name}' has {flat.shape[1]} channels in one batch and "
                                   f"{self.low.shape[0]} in another; its last axis must be fixed")
        usable = np.isfinite(flat) & (np.abs(flat) < SENTINEL_ABS)
        self.ignored += int(usable.size - usable.sum())
        low = np.where(usable, flat, np.inf).min(axis=0, initial=np.inf).astype(np.float64)
        high = np.where(usable, flat, -np.inf).max(axis=0, initial=-np.inf).astype(np.float64)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)
        if self.rows:
            clean = flat[usable.all(axis=1)]
            self.kept.append(_evenly(clean, self.rows).astype(np.float32))
            if sum(len(k) for k in self.kept) > 4 * self.rows:
                self.kept = [_evenly(np.concatenate(self.kept), 2 * self.rows)]

    def profile(self) -> ChannelProfile:
        assert self.low is not None and self.high is not None
        low = np.where(np.isfinite(self.low), self.low, 0.0)
        high = np.where(np.isfinite(self.high), self.high, 0.0)
        channels = low.shape[0]
        rows = _evenly(np.concatenate(self.kept), self.rows) if self.kept else np.zeros((0, channels), np.float32)
        return ChannelProfile(low, high, rows)


def _evenly(rows: np.ndarray, count: int) -> np.ndarray:
    """At most `count` rows of `rows`, evenly spaced."""
    if len(rows) <= count:
        return rows
    return rows[np.linspace(0, len(rows) - 1, count).round().astype(int)]
