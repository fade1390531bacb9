"""Run the calibration data through the model and reduce each batch into per-tensor ranges at once.

Only running statistics are kept (one float per tensor for max calibration): the activations of a
batch are dropped before the next batch runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..config import CalibConfig
from ..errors import CalibrationError
from ..io import from_graph
from ..passes.expose_tensors import expose_tensors
from .data import CalibSource
from .session import open_session

__all__ = ["CalibrationResult", "calibrate", "model_batch_size"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True)
class CalibrationResult:
    """Per-tensor amax (max |x| over every calibration sample) and what it took."""

    amax: Mapping[str, float]
    samples: int
    batches: int
    providers: tuple[str, ...]
    seconds: float


def model_batch_size(graph: gs.Graph) -> int | None:
    """The fixed batch size of the model's inputs, or None when the batch dimension is free."""
    fixed = set()
    for tensor in graph.inputs:
        shape = tensor.shape or ()
        if len(shape) == 0:
            continue
        first = shape[0]
        if not isinstance(first, int) or first <= 0:
            return None
        fixed.add(first)
    return fixed.pop() if len(fixed) == 1 else None


def _batch_amax(tensor_name: str, values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    amax = float(np.max(np.abs(values)))
    if np.isfinite(amax):
        return amax
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise CalibrationError(f"tensor '{tensor_name}': every calibration value is NaN or Inf")
    log.warning("tensor '%s': %d NaN/Inf values ignored in calibration", tensor_name, values.size - finite.size)
    return float(np.max(np.abs(finite)))


def _samples_in(feed: Mapping[str, np.ndarray]) -> int:
    sizes = [a.shape[0] for a in feed.values() if a.ndim > 0]
    return max(sizes) if sizes else 1


def calibrate(graph: gs.Graph, tensor_names: Iterable[str], source: CalibSource, config: CalibConfig,
              on_progress: ProgressCallback | None = None) -> CalibrationResult:
    """Max-calibrate `tensor_names` of `graph` over `source`.

    Args:
        graph: the prepared float graph the Q/DQ will be inserted into.
        tensor_names: activation tensors to measure.
        source: calibration batches.
        config: batch size and execution providers.
        on_progress: called after each batch with (samples done, total samples or None).
    """
    started = time.perf_counter()
    names = tuple(dict.fromkeys(tensor_names))
    input_names = {t.name for t in graph.inputs}
    exposed = [n for n in names if n not in input_names]
    fixed_batch = model_batch_size(graph)
    batch_size = fixed_batch or config.batch_size
    amax = dict.fromkeys(names, 0.0)
    samples = batches = 0
    total = source.num_samples()
    with open_session(from_graph(expose_tensors(graph, exposed)), config.providers) as session:
        for feed in source.batches(batch_size):
            if fixed_batch is not None and _samples_in(feed) != fixed_batch:
                log.warning("the model takes batches of exactly %d; the last %d samples are left out",
                            fixed_batch, _samples_in(feed))
                continue
            outputs = session.run(feed, exposed)
            outputs.update({n: feed[n] for n in names if n in input_names})
            for name in names:
                amax[name] = max(amax[name], _batch_amax(name, outputs[name]))
            del outputs
            samples += _samples_in(feed)
            batches += 1
            if on_progress is not None:
                on_progress(samples, total)
        providers = session.providers
    if samples == 0:
        raise CalibrationError(f"{source.describe()}: no calibration samples")
    return CalibrationResult(amax, samples, batches, providers, time.perf_counter() - started)
