"""The accuracy target's measurements on a Ray worker pool: a `Measurer` (onnxq.steps.accuracy.gate_workers)
whose gate vectors are measured by the pool's actors, one `GateWorker` per actor.

The gated model goes through the object store once per measurer (every run of the pool refers to the
same stored bytes, so a worker loads it once), and so do the held-back samples with the float model's
outputs. Each gate vector is one item; results come back by item id and are put in input order, so the
ranking and the chosen float layers are those of the serial run. Every result carries the digest of the
model it was measured on and is refused if it is not the gated model's. ONNX Runtime gives the same bits
with one thread per worker as with its default threads (tests/steps/accuracy/test_parallel.py), so the
metrics are equal, not close.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxq.cluster.pool import WorkerPool
from onnxq.cluster.worker import Delivery
from onnxq.errors import ClusterError
from onnxq.steps.accuracy.gate_workers import GateWorker, Measurer, MeasurerFactory, Metrics
from onnxq.steps.accuracy.held_back import HeldBack

__all__ = ["GateWork", "RayMeasurer", "ray_measurers"]


@dataclass(frozen=True)
class GateWork:
    """Measure gate vectors of a gated model; `held` holds the object reference of the held-back samples
    (in a tuple, so Ray hands it over unresolved and a worker fetches it only when it loads the model)."""

    held: tuple[Any, ...]
    providers: tuple[str, ...]
    gates_input: str

    def load(self, model: bytes, threads: int) -> _LoadedGates:
        import ray

        worker = GateWorker()
        worker.setup(model, ray.get(self.held[0]), self.providers, threads, self.gates_input)
        return _LoadedGates(worker)


class _LoadedGates:
    def __init__(self, worker: GateWorker) -> None:
        self.worker = worker

    def run(self, item: tuple[np.ndarray, int | None]) -> Generator[int, None, Metrics]:
        gates, samples = item
        yield 0  # the fault-injection hook (onnxq.cluster.worker) runs here, as on calibration's first report
        return self.worker.measure(gates, samples)

    def close(self) -> None:
        self.worker.close()


class RayMeasurer:
    """Measures batches of gate vectors on `pool`'s workers; results in input order. `jobs`: the pool's size,
    how many the accuracy search measures ahead (onnxq.steps.accuracy.speculation)."""

    def __init__(self, pool: WorkerPool, model: onnx.ModelProto, gates_input: str, held: HeldBack,
                 providers: Sequence[str]) -> None:
        ray = pool.cluster.ray
        self._pool = pool
        self._model = pool.store(model.SerializeToString())
        self._work = GateWork((ray.put(held),), tuple(providers), gates_input)
        self.jobs = pool.size  # gate vectors measured at once: the fallback search measures this many ahead

    def measure_many(self, gate_vectors: Sequence[np.ndarray], samples: int | None = None,
                     on_result: Callable[[], None] | None = None) -> list[Metrics]:
        results: dict[int, Metrics] = {}

        def accept(delivery: Delivery) -> None:
            if delivery.digest != self._model.digest:
                raise ClusterError(f"gate vector {delivery.item_id} was measured by {delivery.worker} on another "
                                   f"model (digest {delivery.digest[:12]}…, expected {self._model.digest[:12]}…)")
            if delivery.item_id not in results:  # the first delivery of an id counts
                results[delivery.item_id] = delivery.value
                if on_result is not None:
                    on_result()

        items = {index: (np.asarray(gates), samples) for index, gates in enumerate(gate_vectors)}
        self._pool.run(self._work, self._model, items, accept)
        return [results[index] for index in range(len(items))]

    def close(self) -> None:
        """Nothing to release here: the pool's workers drop the model when they load another one."""


def ray_measurers(pool: WorkerPool) -> MeasurerFactory:
    """A `MeasurerFactory` whose measurers run on `pool` (for `MeetAccuracy(measurers=...)`)."""

    def factory(model: onnx.ModelProto, gates_input: str, held: HeldBack, providers: Sequence[str]) -> Measurer:
        return RayMeasurer(pool, model, gates_input, held, providers)

    return factory
