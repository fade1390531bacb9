"""Run the calibration data through the model and fold each batch into per-tensor statistics at once.

Only running statistics are kept (a max, or a histogram, per tensor), updated in place: each activation
is dropped as soon as it is folded in, so at most one batch of activations is alive.

The session runs with ONNX Runtime's graph optimisations on: every measured tensor is a graph output,
which ORT's fusions never remove, so the statistics are those of the unfused graph up to the float
rounding of reordered arithmetic (amax within 1e-6 relative on EfficientNet-Lite0 and the PP-OCR
classifier), and calibration runs 15-30% faster than with optimisations off. ORT's memory pattern is
off: with many outputs it over-allocates (see `open_session`).

With `max`, tensors that cannot be negative (ReLU, ReLU6, sigmoid outputs) are read as channel maxima
computed inside ORT by a second session (see in_graph_max.py): EfficientNet-Lite0's per-sample cost
drops from 1.5x to 1.2x plain inference. The first run of each input shape goes through the full
session to learn those tensors' sizes; a run with a NaN or Inf anywhere re-reads them whole.

Folding runs between ONNX Runtime's runs, not beside them: ORT already keeps every physical core busy,
so folding batch k while ORT ran batch k+1 only slowed `Session.run` down and kept a second batch of
activations alive (measured with benchmarks/calibration_cost.py: no faster on EfficientNet-Lite0 or the
PP-OCR classifier, and 30-40 MiB more peak memory that grew with the sample count). Instead, while ORT
is idle, the tensors of a batch are folded in parallel, one thread per core (the binning kernel
releases the GIL; each tensor has its own accumulator, so the result does not depend on the threads).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.options import CalibConfig
from onnxq.errors import CalibrationError
from onnxq.data.sources import CalibSource, graph_sample_axes, samples_in
from onnxq.calib.readout import ActivationReader
from onnxq.calib.stats import TensorStats, check_stats, new_accumulator

__all__ = ["CalibrationResult", "calibrate", "full_batches", "model_batch_size"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True)
class CalibrationResult:
    """Per-tensor statistics and what it took to collect them."""

    stats: Mapping[str, TensorStats]
    samples: int
    batches: int
    providers: tuple[str, ...]
    seconds: float

    @property
    def amax(self) -> dict[str, float]:
        """max |x| per tensor (NaN, Inf and sentinels left out)."""
        return {name: s.amax for name, s in self.stats.items()}


def model_batch_size(graph: gs.Graph) -> int | None:
    """The fixed batch size of the model's inputs, or None when the batch dimension is free."""
    fixed = set()
    shapes = {tensor.name: tensor.shape or () for tensor in graph.inputs}
    for name, axis in graph_sample_axes(graph).items():
        size = shapes[name][axis]
        if not isinstance(size, int) or size <= 0:
            return None
        fixed.add(size)
    return fixed.pop() if len(fixed) == 1 else None


def _fold_threads() -> int:
    """One folding thread per usable core (ONNX Runtime is idle while a batch is folded)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


# At most this many bytes of measured activations come out of one ONNX Runtime run: a batch whose
# activations are larger runs in slices (EfficientNet-Lite0, 27 MB per sample: batches of 8 run as two
# runs of 4, peak 587 -> 452 MiB at 64 samples, no slower; the statistics do not depend on batching).
RUN_BUDGET_BYTES = 128 << 20


def _splittable(feed: Mapping[str, np.ndarray], fixed: bool, axes: Mapping[str, int]) -> bool:
    """True if every input of `feed` has the batch on axis 0 and the model takes any batch size."""
    samples = samples_in(feed, axes)
    return (not fixed and samples > 1 and all(axes.get(name) == 0 for name in feed)
            and all(a.ndim > 0 and a.shape[0] == samples for a in feed.values()))


def _slices(feed: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """`feed` (every input batched on axis 0) cut into runs of at most `size` samples (views, no copies)."""
    samples = next(iter(feed.values())).shape[0]
    return [{name: array[start:start + size] for name, array in feed.items()} for start in range(0, samples, size)]


def _run_size(bytes_per_sample: float) -> int:
    """Samples per run that keep one run's measured activations within RUN_BUDGET_BYTES (at least 1)."""
    return max(1, int(RUN_BUDGET_BYTES // max(bytes_per_sample, 1.0)))


def full_batches(source: CalibSource, graph: gs.Graph, batch_size: int) -> Iterator[Mapping[str, np.ndarray]]:
    """The source's batches of `batch_size` samples, or of the model's own batch size if it fixes one;
    such a model gets only full batches (the short last one is left out with a warning)."""
    fixed = model_batch_size(graph)
    axes = graph_sample_axes(graph)
    for feed in source.batches(fixed or batch_size):
        if fixed is not None and samples_in(feed, axes) != fixed:
            log.warning("the model takes batches of exactly %d; the last %d samples are left out",
                        fixed, samples_in(feed, axes))
            continue
        yield feed


def calibrate(graph: gs.Graph, tensor_names: Iterable[str], source: CalibSource, config: CalibConfig,
              on_progress: ProgressCallback | None = None, *, histograms: bool | None = None,
              in_graph_max: bool = True) -> CalibrationResult:
    """Collect statistics for `tensor_names` of `graph` over `source`.

    Args:
        graph: the prepared float graph the Q/DQ will be inserted into.
        tensor_names: activation tensors to measure.
        source: calibration batches.
        config: method (max needs only a running max; the others histograms), batch size, providers.
        on_progress: called after each batch with (samples done, total samples or None).
        histograms: force histogram collection on or off (default: what `config.method` needs).
        in_graph_max: without histograms, let ORT reduce the tensors that cannot be negative to channel
            maxima (see in_graph_max.py); the statistics are the same either way.
    """
    started = time.perf_counter()
    names = tuple(dict.fromkeys(tensor_names))
    fixed = model_batch_size(graph)
    axes = graph_sample_axes(graph)
    use_histograms = config.method.needs_histogram if histograms is None else histograms
    accumulators = {n: new_accumulator(use_histograms, config.num_bins) for n in names}
    samples = batches = 0
    total = source.num_samples()
    threads = _fold_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="onnxq-fold") if threads > 1 else nullcontext() as pool, \
            ActivationReader(graph, names, accumulators, config, pool, in_graph_max=in_graph_max) as reader:
        bytes_per_sample: float | None = None
        for feed in full_batches(source, graph, config.batch_size):
            parts: list[Mapping[str, np.ndarray]] = [feed]
            if _splittable(feed, fixed is not None, axes):
                rest = feed
                if bytes_per_sample is None:  # the first sample alone tells how large a sample's activations are
                    head = {name: array[:1] for name, array in feed.items()}
                    rest = {name: array[1:] for name, array in feed.items()}
                    bytes_per_sample = reader.fold(head)
                parts = _slices(rest, _run_size(bytes_per_sample))
            for part in parts:
                reader.fold(part)
            samples += samples_in(feed, axes)
            batches += 1
            if on_progress is not None:
                on_progress(samples, total)
        providers = reader.providers
    if samples == 0:
        raise CalibrationError(f"{source.describe()}: no calibration samples")
    stats = {name: accumulator.freeze() for name, accumulator in accumulators.items()}
    check_stats(stats)
    return CalibrationResult(stats, samples, batches, providers, time.perf_counter() - started)

