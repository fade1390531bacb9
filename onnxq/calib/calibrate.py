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
from contextlib import ExitStack
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.options import CalibConfig
from onnxq.errors import CalibrationError
from onnxq.data.signature import ModelSignature, signature_of
from onnxq.data.sources import CalibSource
from onnxq.calib.readout import ActivationReader
from onnxq.calib.stats import StatsAccumulator, TensorStats, check_stats, new_accumulator

__all__ = ["CalibrationResult", "Calibrator", "calibrate", "finish", "full_batches"]

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


def _splittable(feed: Mapping[str, np.ndarray], signature: ModelSignature) -> bool:
    """True if the model takes any batch size and `feed` holds more than one sample, the same number in
    every batched input (along its own sample axis)."""
    samples = signature.samples_in(feed)
    return (signature.fixed_batch is None and samples > 1
            and all(np.shape(feed[name])[axis] == samples for name, axis in signature.sample_axes.items() if name in feed))


def _slices(feed: Mapping[str, np.ndarray], size: int, signature: ModelSignature) -> list[dict[str, np.ndarray]]:
    """`feed` cut into runs of at most `size` samples along the sample axes (views, no copies)."""
    samples = signature.samples_in(feed)
    return [signature.cut(feed, start, start + size) for start in range(0, samples, size)]


def _run_size(bytes_per_sample: float) -> int:
    """Samples per run that keep one run's measured activations within RUN_BUDGET_BYTES (at least 1)."""
    return max(1, int(RUN_BUDGET_BYTES // max(bytes_per_sample, 1.0)))


def full_batches(source: CalibSource, graph: gs.Graph, batch_size: int, *,
                 signature: ModelSignature | None = None) -> Iterator[Mapping[str, np.ndarray]]:
    """The source's batches of `batch_size` samples, or of the model's own batch size if it fixes one;
    such a model gets only full batches (the short last one is left out with a warning).

    `signature`: the model's inputs (default: `signature_of(graph)`).
    """
    signature = signature_of(graph) if signature is None else signature
    fixed = signature.fixed_batch
    for feed in source.batches(signature.batch_size(batch_size)):
        if fixed is not None and signature.samples_in(feed) != fixed:
            log.warning("the model takes batches of exactly %d; the last %d samples are left out",
                        fixed, signature.samples_in(feed))
            continue
        yield feed


class Calibrator:
    """The ONNX Runtime sessions of one calibration, kept open: `collect` runs a source through them into
    fresh statistics, as often as asked (a worker calibrating shard after shard pays for its sessions once).

    Args: as `calibrate`; `threads`: ORT intra-op threads and folding threads (None: one per usable core).
    Use as a context manager.
    """

    def __init__(self, graph: gs.Graph, tensor_names: Iterable[str], config: CalibConfig, *,
                 histograms: bool | None = None, in_graph_max: bool = True, signature: ModelSignature | None = None,
                 threads: int | None = None) -> None:
        self.graph, self.config = graph, config
        self.names = tuple(dict.fromkeys(tensor_names))
        self.signature = signature_of(graph) if signature is None else signature
        self.histograms = config.method.needs_histogram if histograms is None else histograms
        fold_threads = _fold_threads() if threads is None else max(1, threads)
        self._stack = ExitStack()
        self._pool = (self._stack.enter_context(ThreadPoolExecutor(fold_threads, thread_name_prefix="onnxq-fold"))
                      if fold_threads > 1 else None)
        self._reader = ActivationReader(graph, self.names, self._fresh(), config, self._pool,
                                        in_graph_max=in_graph_max, signature=self.signature, threads=threads)

    def _fresh(self) -> dict[str, StatsAccumulator]:
        return {n: new_accumulator(self.histograms, self.config.num_bins) for n in self.names}

    def __enter__(self) -> Calibrator:
        try:
            self._stack.enter_context(self._reader)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def collect(self, source: CalibSource, on_progress: ProgressCallback | None = None) -> CalibrationResult:
        """The statistics of `source` alone, unchecked (`samples` may be 0: see `finish`); `on_progress` is
        called after each batch with (samples done, total samples or None)."""
        total = source.num_samples()
        steps = self.collecting(source)
        try:
            while True:
                done = next(steps)
                if on_progress is not None:
                    on_progress(done, total)
        except StopIteration as end:
            result: CalibrationResult = end.value
        return result

    def collecting(self, source: CalibSource) -> Generator[int, None, CalibrationResult]:
        """`collect` as a generator: yields the samples done after each batch, returns the statistics (a Ray
        worker streams these counts to the driver between batches: onnxq/cluster/worker.py)."""
        started = time.perf_counter()
        reader, signature = self._reader, self.signature
        reader.accumulators = accumulators = self._fresh()
        samples = batches = 0
        bytes_per_sample: float | None = None
        for feed in full_batches(source, self.graph, self.config.batch_size, signature=signature):
            parts: list[Mapping[str, np.ndarray]] = [feed]
            if _splittable(feed, signature):
                rest = feed
                if bytes_per_sample is None:  # the first sample alone tells how large a sample's activations are
                    count = signature.samples_in(feed)
                    head, rest = signature.cut(feed, 0, 1), signature.cut(feed, 1, count)
                    bytes_per_sample = reader.fold(head)
                parts = _slices(rest, _run_size(bytes_per_sample), signature)
            for part in parts:
                reader.fold(part)
            samples += signature.samples_in(feed)
            batches += 1
            yield samples
        stats = {name: accumulator.freeze() for name, accumulator in accumulators.items()}
        return CalibrationResult(stats, samples, batches, reader.providers, time.perf_counter() - started)


def finish(result: CalibrationResult, source: str) -> CalibrationResult:
    """`result` checked as a whole calibration: some samples (else an error naming `source`, the data's
    description), and every tensor with a usable value (`check_stats`: warnings name the others)."""
    if result.samples == 0:
        raise CalibrationError(f"{source}: no calibration samples")
    check_stats(result.stats)
    return result


def calibrate(graph: gs.Graph, tensor_names: Iterable[str], source: CalibSource, config: CalibConfig,
              on_progress: ProgressCallback | None = None, *, histograms: bool | None = None,
              in_graph_max: bool = True, signature: ModelSignature | None = None) -> CalibrationResult:
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
        signature: the model's inputs, how batches are counted and split (default: `signature_of(graph)`).
    """
    started = time.perf_counter()
    with Calibrator(graph, tensor_names, config, histograms=histograms, in_graph_max=in_graph_max,
                    signature=signature) as calibrator:
        result = calibrator.collect(source, on_progress)
    return finish(replace(result, seconds=time.perf_counter() - started), source.describe())  # sessions included
