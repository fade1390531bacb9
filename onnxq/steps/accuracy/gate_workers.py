"""Who measures gate vectors: one session in this process, or several elsewhere, with the same results.

A measurement is one pass of the gated model (`onnxq.lower.gate_qdq`) over the held-back samples with
one gate vector fed. Measurements of different gate vectors are independent, so a `Measurer` takes a
batch of them (`measure_many`) and returns their metrics in input order, however it spreads the work.

`GateWorker` is the unit of work every measurer runs: plain Python, picklable before `setup`, holding one
ONNX Runtime session of the gated model and the held-back samples (and float outputs) it was sent once.
`InProcess` runs one in this process (the serial behaviour, bit for bit); `onnxq.steps.accuracy.process_pool`
runs one per local process; a Ray actor can host it unchanged.

A `MeasurerFactory` opens a measurer for a gated model; `process_pool.local_measurers(jobs)` chooses
between the two local ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import onnx

from onnxq.errors import InternalError
from onnxq.lower.gate_qdq import GATES_INPUT
from onnxq.metrics import OutputMetrics
from onnxq.runtime.session import Session, open_session
from onnxq.steps.accuracy.held_back import HeldBack, accumulate

__all__ = ["GateWorker", "Measurer", "MeasurerFactory", "InProcess", "in_process", "parallelism"]

Metrics = tuple[OutputMetrics, ...]


class GateWorker:
    """One session of the gated model and the held-back samples: measures gate vectors.

    The session runs with ONNX Runtime's graph optimizations on: the Where nodes keep every Q/DQ pair
    out of its fusions, so only folding and layout changes apply, and the outputs stay those of the
    unoptimized graph (tested bit for bit against the written models).

    Create it empty (it pickles as nothing), then `setup` once where it runs.
    """

    def __init__(self) -> None:
        self._session: Session | None = None
        self._held: HeldBack | None = None
        self._gates_input = GATES_INPUT

    def setup(self, gated_model: bytes | onnx.ModelProto, held_back: HeldBack, providers: Sequence[str],
              threads: int | None = None, gates_input: str = GATES_INPUT) -> None:
        """Open the session.

        Args:
            gated_model: the gated model, serialized (or as a proto, in this process).
            held_back: the held-back feeds and the float model's outputs on them.
            providers: execution providers.
            threads: ONNX Runtime's intra-op threads (None: its default, all cores).
            gates_input: the name of the gated model's gate-vector input.
        """
        self.close()
        self._held, self._gates_input = held_back, gates_input
        self._session = open_session(gated_model, providers, optimize=True, intra_op_threads=threads)

    def measure_many(self, gate_vectors: Sequence[np.ndarray], samples: int | None = None) -> list[Metrics]:
        """Metrics against the float model for each gate vector, in order (on the first feeds that hold
        `samples` samples, when given)."""
        return [self.measure(gates, samples) for gates in gate_vectors]

    def measure(self, gates: np.ndarray, samples: int | None = None) -> Metrics:
        """Metrics for one gate vector."""
        if self._session is None or self._held is None:
            raise InternalError("GateWorker.measure before setup")
        session, names, gates_input = self._session, self._held.output_names, self._gates_input
        return accumulate(self._held, lambda feed: session.run({**feed, gates_input: gates}, names), samples)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session = None


class Measurer(Protocol):
    """Measures batches of gate vectors; results in input order.

    One that measures several vectors at once may say how many in an attribute `jobs` (`parallelism`
    reads it; without it, 1): the fallback search then hands it that many at a time, measured ahead.
    """

    def measure_many(self, gate_vectors: Sequence[np.ndarray], samples: int | None = None,
                     on_result: Callable[[], None] | None = None) -> list[Metrics]:
        """Metrics of each gate vector, in input order; `on_result` is called as each one is done."""
        ...

    def close(self) -> None:
        """Release the sessions (and end any process); safe to call more than once."""
        ...


def parallelism(measurer: object) -> int:
    """How many gate vectors `measurer` measures at once: its `jobs` attribute, else 1."""
    jobs = getattr(measurer, "jobs", 1)
    return jobs if isinstance(jobs, int) and jobs >= 1 else 1


#: Opens a measurer for (the gated model, its gate input's name, the held-back samples, the providers).
MeasurerFactory = Callable[[onnx.ModelProto, str, HeldBack, Sequence[str]], Measurer]


class InProcess:
    """One `GateWorker` in this process, with ONNX Runtime's default threads: the serial measurer."""

    def __init__(self, model: onnx.ModelProto, gates_input: str, held: HeldBack, providers: Sequence[str],
                 threads: int | None = None) -> None:
        self._worker = GateWorker()
        self._worker.setup(model, held, providers, threads, gates_input)

    def measure_many(self, gate_vectors: Sequence[np.ndarray], samples: int | None = None,
                     on_result: Callable[[], None] | None = None) -> list[Metrics]:
        results = []
        for gates in gate_vectors:
            results.append(self._worker.measure(gates, samples))
            if on_result is not None:
                on_result()
        return results

    def close(self) -> None:
        self._worker.close()


def in_process(model: onnx.ModelProto, gates_input: str, held: HeldBack, providers: Sequence[str]) -> InProcess:
    """The serial measurer (a `MeasurerFactory`)."""
    return InProcess(model, gates_input, held, providers)
