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
from contextlib import AbstractContextManager, nullcontext
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..config import CalibConfig
from ..errors import CalibrationError
from ..io import from_graph
from ..graph.names import NameSource
from ..passes.expose_tensors import expose_channel_max, expose_tensors
from .data import CalibSource
from .in_graph_max import plan_in_graph_max
from .session import Session, open_session
from .stats import StatsAccumulator, check_stats, new_accumulator

__all__ = ["CalibrationResult", "calibrate", "model_batch_size"]

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
    for tensor in graph.inputs:
        shape = tensor.shape or ()
        if len(shape) == 0:
            continue
        first = shape[0]
        if not isinstance(first, int) or first <= 0:
            return None
        fixed.add(first)
    return fixed.pop() if len(fixed) == 1 else None


def _samples_in(feed: Mapping[str, np.ndarray]) -> int:
    sizes = [a.shape[0] for a in feed.values() if a.ndim > 0]
    return max(sizes) if sizes else 1


def _fold(accumulators: Mapping[str, StatsAccumulator], outputs: dict[str, np.ndarray],
          pool: ThreadPoolExecutor | None) -> None:
    """Fold every output into its accumulator, largest first, on `pool`'s threads when there is one."""

    def fold_one(name: str) -> None:
        accumulators[name].add(outputs.pop(name))  # drop each activation as soon as it is folded in

    names = sorted(outputs, key=lambda name: -outputs[name].size)
    if pool is None:
        for name in names:
            fold_one(name)
    else:
        for done in [pool.submit(fold_one, name) for name in names]:
            done.result()


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


def _splittable(feed: Mapping[str, np.ndarray], fixed: bool) -> bool:
    """True if every input of `feed` has the batch on axis 0 and the model takes any batch size."""
    samples = _samples_in(feed)
    return not fixed and samples > 1 and all(a.ndim > 0 and a.shape[0] == samples for a in feed.values())


def _slices(feed: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """`feed` cut along the batch axis into runs of at most `size` samples (views, no copies)."""
    samples = _samples_in(feed)
    return [{name: array[start:start + size] for name, array in feed.items()} for start in range(0, samples, size)]


def _run_size(bytes_per_sample: float) -> int:
    """Samples per run that keep one run's measured activations within RUN_BUDGET_BYTES (at least 1)."""
    return max(1, int(RUN_BUDGET_BYTES // max(bytes_per_sample, 1.0)))


def _full_batches(source: CalibSource, batch_size: int, fixed: bool) -> Iterable[Mapping[str, np.ndarray]]:
    for feed in source.batches(batch_size):
        if fixed and _samples_in(feed) != batch_size:
            log.warning("the model takes batches of exactly %d; the last %d samples are left out",
                        batch_size, _samples_in(feed))
            continue
        yield feed


def _finite(values: np.ndarray) -> bool:
    return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())


def _nonfinite_seen(accumulators: Mapping[str, StatsAccumulator], names: Iterable[str]) -> int:
    """NaN and Inf values the named tensors' accumulators have counted so far."""
    total = 0
    for name in names:
        stats = getattr(accumulators[name], "stats", None)
        total += stats.nan_count + stats.inf_count if stats is not None else 0
    return total


def _signature(feed: Mapping[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((name, tuple(array.shape)) for name, array in feed.items()))


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
    input_names = {t.name for t in graph.inputs}
    exposed = [n for n in names if n not in input_names]
    fixed = model_batch_size(graph)
    use_histograms = config.method.needs_histogram if histograms is None else histograms
    accumulators = {n: new_accumulator(use_histograms, config.num_bins) for n in names}
    reductions = plan_in_graph_max(graph, exposed) if in_graph_max and not use_histograms else ()
    fresh_name = NameSource(graph)
    max_outputs = {r.tensor_name: fresh_name(f"{r.tensor_name}_channel_max") for r in reductions if r.in_graph}
    whole = [n for n in exposed if n not in max_outputs]
    model_outputs = [t.name for t in graph.outputs if t.name not in names] if max_outputs else []
    samples = batches = 0
    total = source.num_samples()
    threads = _fold_threads()
    # With channel maxima read by a second session, the full session runs only to learn the in-graph
    # tensors' sizes (once per input shape) and for the rare re-read: no arena kept, no spinning beside it.
    rare = bool(max_outputs)
    with open_session(from_graph(expose_tensors(graph, exposed)), config.providers, optimize=True,
                      memory_pattern=False, arena=not rare, spin=not rare, spin_after_run=False) as session, \
            _reduced_session(graph, whole, max_outputs, config) as reduced, \
            ThreadPoolExecutor(threads, thread_name_prefix="onnxq-fold") if threads > 1 else nullcontext() as pool:
        values_per_run: dict[tuple, dict[str, int]] = {}  # in-graph tensors' sizes, by the runs' input shapes

        def run_and_fold(part: Mapping[str, np.ndarray]) -> float:
            """Run one slice, fold it in, and return the bytes per sample of what it read out of ORT."""
            signature = _signature(part)
            if reduced is None or signature not in values_per_run:  # a full read tells the sizes
                outputs = session.run(part, exposed)
                values_per_run[signature] = {n: outputs[n].size for n in max_outputs}
                maxima: dict[str, np.ndarray] = {}
            else:
                outputs = reduced.run(part, [*whole, *model_outputs, *max_outputs.values()])
                maxima = {n: outputs.pop(output) for n, output in max_outputs.items()}
                model_finite = all(_finite(outputs.pop(n)) for n in model_outputs)
            size = (sum(a.nbytes for a in outputs.values()) + sum(m.nbytes for m in maxima.values())) / _samples_in(part)
            outputs.update({n: part[n] for n in names if n in input_names})
            seen_before = _nonfinite_seen(accumulators, outputs)
            _fold(accumulators, outputs, pool)
            if not maxima:
                return size
            # A NaN or Inf anywhere in the run may also sit in a reduced tensor, where ORT's max can drop
            # it (and with it the values before it): then those tensors are read whole, as is a tensor
            # whose own maxima show a NaN, Inf or sentinel.
            if not model_finite or _nonfinite_seen(accumulators, outputs) != seen_before:
                again = list(maxima)
            else:
                again = [n for n, m in maxima.items()
                         if not accumulators[n].add_maxima(m, values_per_run[signature][n])]  # type: ignore[attr-defined]
            if again:
                _fold(accumulators, session.run(part, again), pool)
            return size

        bytes_per_sample: float | None = None
        for feed in _full_batches(source, fixed or config.batch_size, fixed is not None):
            parts: list[Mapping[str, np.ndarray]] = [feed]
            if _splittable(feed, fixed is not None):
                rest = feed
                if bytes_per_sample is None:  # the first sample alone tells how large a sample's activations are
                    head = {name: array[:1] for name, array in feed.items()}
                    rest = {name: array[1:] for name, array in feed.items()}
                    bytes_per_sample = run_and_fold(head)
                parts = _slices(rest, _run_size(bytes_per_sample))
            for part in parts:
                run_and_fold(part)
            samples += _samples_in(feed)
            batches += 1
            if on_progress is not None:
                on_progress(samples, total)
        providers = session.providers
    if samples == 0:
        raise CalibrationError(f"{source.describe()}: no calibration samples")
    stats = {name: accumulator.freeze() for name, accumulator in accumulators.items()}
    check_stats(stats)
    return CalibrationResult(stats, samples, batches, providers, time.perf_counter() - started)


def _reduced_session(graph: gs.Graph, whole: list[str], max_outputs: Mapping[str, str],
                     config: CalibConfig) -> AbstractContextManager[Session | None]:
    """The session that reads `whole` out whole and the keys of `max_outputs` as channel maxima."""
    if not max_outputs:
        return nullcontext()
    reading = expose_channel_max(expose_tensors(graph, whole), max_outputs)
    return open_session(from_graph(reading), config.providers, optimize=True, memory_pattern=False,
                        spin_after_run=False)
