"""Read a slice's measured tensors out of ONNX Runtime and fold them into their running statistics.

Every measured tensor is exposed as a graph output of one session ("the full read"). Under `max`
calibration, the tensors `plan_in_graph_max` clears are instead read as channel maxima from a second
session that computes them inside ORT; the full session then runs only for the first slice of each
input shape (the sizes of those tensors, for their value counts) and to re-read a slice in which a
NaN or Inf showed up, so the statistics are those of the full read either way (see in_graph_max.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from types import TracebackType

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.options import CalibConfig
from onnxq.graph.names import NameSource
from onnxq.calib.expose import expose_channel_max, expose_tensors
from onnxq.data.signature import ModelSignature, signature_of
from onnxq.calib.in_graph_max import plan_in_graph_max
from onnxq.runtime.session import Session, open_session
from onnxq.calib.stats import MaxAccumulator, StatsAccumulator

__all__ = ["ActivationReader", "fold"]


def fold(accumulators: Mapping[str, StatsAccumulator], outputs: dict[str, np.ndarray],
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


def _finite(values: np.ndarray) -> bool:
    return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())


def _signature(feed: Mapping[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((name, tuple(array.shape)) for name, array in feed.items()))


class ActivationReader:
    """The ORT sessions of one calibration, and `fold(part)`: run a slice and fold what it measured.

    `accumulators` may be replaced by fresh ones of the same kinds between slices (a worker calibrating
    shard after shard on the same sessions); `threads`: intra-op threads of the sessions (None: ORT's
    default, one per physical core).
    """

    def __init__(self, graph: gs.Graph, names: tuple[str, ...], accumulators: Mapping[str, StatsAccumulator],
                 config: CalibConfig, pool: ThreadPoolExecutor | None, *, in_graph_max: bool,
                 signature: ModelSignature | None = None, threads: int | None = None) -> None:
        self.accumulators = accumulators
        self.pool = pool
        self.input_names = [n for n in names if n in {t.name for t in graph.inputs}]
        self.exposed = [n for n in names if n not in self.input_names]
        maxima_ok = in_graph_max and all(isinstance(accumulators[n], MaxAccumulator) for n in self.exposed)
        reductions = plan_in_graph_max(graph, self.exposed) if maxima_ok else ()
        fresh_name = NameSource(graph)
        self.max_outputs = {r.tensor_name: fresh_name(f"{r.tensor_name}_channel_max") for r in reductions if r.in_graph}
        self.whole = [n for n in self.exposed if n not in self.max_outputs]
        self.model_outputs = [t.name for t in graph.outputs if t.name not in names] if self.max_outputs else []
        self.values_per_run: dict[tuple, dict[str, int]] = {}  # in-graph tensors' sizes, by input shapes
        self.signature = signature_of(graph) if signature is None else signature  # counts a slice's samples
        self._graph, self._config, self._threads = graph, config, threads
        self._stack = ExitStack()
        self.full: Session | None = None
        self.reduced: Session | None = None

    def __enter__(self) -> ActivationReader:
        graph, config = self._graph, self._config
        # With a reduced session beside it, the full one runs rarely: no arena kept, no spinning.
        rare = bool(self.max_outputs)
        self.full = self._stack.enter_context(open_session(
            expose_tensors(graph, self.exposed), config.providers, optimize=True, intra_op_threads=self._threads,
            memory_pattern=False, arena=not rare, spin=not rare, spin_after_run=False))
        if self.max_outputs:
            reading = expose_channel_max(expose_tensors(graph, self.whole), self.max_outputs)
            self.reduced = self._stack.enter_context(open_session(
                reading, config.providers, optimize=True, intra_op_threads=self._threads, memory_pattern=False,
                spin_after_run=False))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stack.close()

    @property
    def providers(self) -> tuple[str, ...]:
        assert self.full is not None, "use ActivationReader as a context manager"
        return self.full.providers

    def fold(self, part: Mapping[str, np.ndarray]) -> float:
        """Run one slice, fold it in, and return the bytes per sample of what it read out of ORT."""
        assert self.full is not None, "use ActivationReader as a context manager"
        signature = _signature(part)
        if self.reduced is None or signature not in self.values_per_run:  # a full read tells the sizes
            outputs = self.full.run(part, self.exposed)
            self.values_per_run[signature] = {n: outputs[n].size for n in self.max_outputs}
            return self._fold_whole(part, outputs)
        outputs = self.reduced.run(part, [*self.whole, *self.model_outputs, *self.max_outputs.values()])
        maxima = {n: outputs.pop(output) for n, output in self.max_outputs.items()}
        model_finite = all(_finite(outputs.pop(n)) for n in self.model_outputs)
        seen_before = self._nonfinite_seen()
        size = self._fold_whole(part, outputs) + sum(m.nbytes for m in maxima.values()) / self.signature.samples_in(part)
        # A NaN or Inf anywhere in the run may also sit in a reduced tensor, where ORT's max can drop it
        # (and with it the values before it): then those tensors are read whole, as is a tensor whose
        # own maxima show a NaN, Inf or sentinel.
        if not model_finite or self._nonfinite_seen() != seen_before:
            again = list(maxima)
        else:
            sizes = self.values_per_run[signature]
            again = [n for n, m in maxima.items() if not self._max(n).add_maxima(m, sizes[n])]
        if again:
            fold(self.accumulators, self.full.run(part, again), self.pool)
        return size

    def _fold_whole(self, part: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray]) -> float:
        size = sum(a.nbytes for a in outputs.values()) / self.signature.samples_in(part)
        outputs.update({n: part[n] for n in self.input_names})
        fold(self.accumulators, outputs, self.pool)
        return size

    def _max(self, name: str) -> MaxAccumulator:
        accumulator = self.accumulators[name]
        assert isinstance(accumulator, MaxAccumulator)
        return accumulator

    def _nonfinite_seen(self) -> int:
        """NaN and Inf values counted so far by the accumulators of the tensors read whole."""
        stats = [self._max(n).stats for n in (*self.whole, *self.input_names)]
        return sum(s.nan_count + s.inf_count for s in stats)
