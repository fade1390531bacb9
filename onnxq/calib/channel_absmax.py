"""Per-channel activation ranges: max |x| of each hidden channel (the last axis) over the calibration data.

SmoothQuant needs, for every smoothed tensor X of shape [..., K], the vector max_j |X[..., j]| over all
tokens (Xiao et al., "SmoothQuant", ICML 2023, section 4). The tensors are exposed as graph outputs and
the data runs through ONNX Runtime batch by batch, as in `calibrate`; each batch is reduced at once
over every axis but the last and folded into a running per-channel max, so no activation is kept.
NaN, +-Inf and sentinels (|x| >= `SENTINEL_ABS`, the float32-min fill of attention masks) are left out
of the max, as in the per-tensor statistics, and counted in a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.options import CalibConfig
from onnxq.errors import CalibrationError, ModelError
from onnxq.io import from_graph
from onnxq.calib.expose import expose_tensors
from onnxq.calib.calibrate import full_batches
from onnxq.data.sources import CalibSource, graph_sample_axes, samples_in
from onnxq.calib.histogram import SENTINEL_ABS
from onnxq.runtime.session import open_session

__all__ = ["channel_absmax"]

log = logging.getLogger(__name__)


def channel_absmax(graph: gs.Graph, tensor_names: Iterable[str], source: CalibSource,
                   config: CalibConfig) -> dict[str, np.ndarray]:
    """max |x| per channel of the last axis, for each named tensor, over all of `source`.

    Args:
        graph: the prepared float graph (the one the smoothing pass will rewrite).
        tensor_names: tensors to measure; graph inputs are read from the feeds.
        source: calibration batches.
        config: batch size and execution providers (the method is irrelevant here).

    Returns:
        Tensor name -> float32 vector of length K (the tensor's last dimension). A channel with no
        usable value has range 0.

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
    running: dict[str, np.ndarray] = {}
    ignored = dict.fromkeys(names, 0)
    samples = 0
    axes = graph_sample_axes(graph)
    with open_session(from_graph(expose_tensors(graph, exposed)), config.providers, spin_after_run=False) as session:
        for feed in full_batches(source, graph, config.batch_size):
            outputs = session.run(feed, exposed) if exposed else {}
            outputs.update({n: feed[n] for n in names if n in input_names})
            for name in names:
                batch_max, dropped = _reduce(name, outputs.pop(name))
                ignored[name] += dropped
                running[name] = _fold(name, running.get(name), batch_max)
            samples += samples_in(feed, axes)
    if samples == 0:
        raise CalibrationError(f"{source.describe()}: no calibration samples")
    for name, count in ignored.items():
        if count:
            log.warning("tensor '%s': %d NaN, Inf or sentinel values left out of its channel ranges", name, count)
    return {name: running[name].astype(np.float32) for name in names}


def _reduce(name: str, values: np.ndarray) -> tuple[np.ndarray, int]:
    """(max |x| over all axes but the last, in float64; how many values were left out)."""
    data = np.asarray(values)
    if data.ndim == 0:
        raise CalibrationError(f"tensor '{name}' is a scalar: it has no channel axis to smooth")
    if data.size == 0:
        return np.zeros(data.shape[-1]), 0
    magnitude = np.abs(data.reshape(-1, data.shape[-1]))
    batch_max = magnitude.max(axis=0).astype(np.float64)
    if np.all(batch_max < SENTINEL_ABS):  # also False for NaN: the slow path then drops them
        return batch_max, 0
    usable = np.isfinite(magnitude) & (magnitude < SENTINEL_ABS)
    return np.where(usable, magnitude, 0).max(axis=0).astype(np.float64), int(usable.size - usable.sum())


def _fold(name: str, running: np.ndarray | None, batch_max: np.ndarray) -> np.ndarray:
    if running is None:
        return batch_max
    if running.shape != batch_max.shape:
        raise CalibrationError(f"tensor '{name}' has {batch_max.size} channels in one batch and "
                               f"{running.size} in another; its last axis must be fixed")
    return np.maximum(running, batch_max)
