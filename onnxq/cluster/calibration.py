"""Calibration on a Ray worker pool, bit-identical to `onnxq.calib.calibrate.calibrate` in one process.

The driver prepares the graph once and sends it, serialized, through the object store; each worker opens
one `Calibrator` (its ONNX Runtime sessions, threads = its CPU share) and runs shard after shard of the
data, read where it lives (`ShardedData`), each into fresh statistics. `ShardLedger` keeps the first
result per shard id, refuses one computed on another model (its digest), and merges only when every id
is present, in shard order. The merge is exact: histograms on power-of-two grids nest and their counts
add, maxima take the max (onnxq/calib/histogram.py), so the result equals one pass over all the data.

Progress: with an `on_progress`, each worker streams its samples done within its shard after every batch
(onnxq/cluster/pool.py says how), and the ledger shows the sum over shards of the most samples any attempt
at a shard has reached (a finished shard: its whole size). A shard lost with its worker and run again keeps
the count it had reached until the new attempt passes it, so the shown count never goes back, never counts
a sample twice, and never exceeds the total.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
import time

from onnxq.calib.calibrate import CalibrationResult, Calibrator, finish
from onnxq.calib.stats import merge_all
from onnxq.cluster.backend import ShardedData
from onnxq.cluster.pool import WorkerPool
from onnxq.cluster.worker import Delivery, model_digest
from onnxq.data.shards import Shard
from onnxq.data.signature import ModelSignature
from onnxq.errors import CalibrationError, InternalError
from onnxq.options import CalibConfig

__all__ = ["CalibrationWork", "ShardLedger", "calibrate_on_ray", "shard_count"]

ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True)
class CalibrationWork:
    """Calibrate `tensor_names` of the model with `config`, on shards of `data`."""

    tensor_names: tuple[str, ...]
    config: CalibConfig
    histograms: bool | None
    signature: ModelSignature
    data: ShardedData

    def load(self, model: bytes, threads: int) -> _LoadedCalibration:
        import onnx

        from onnxq.io import to_graph

        graph = to_graph(onnx.load_from_string(model))
        calibrator = Calibrator(graph, self.tensor_names, self.config, histograms=self.histograms,
                                signature=self.signature, threads=threads)
        return _LoadedCalibration(self, calibrator.__enter__())


class _LoadedCalibration:
    def __init__(self, work: CalibrationWork, calibrator: Calibrator) -> None:
        self.work, self.calibrator = work, calibrator

    def run(self, shard: Shard) -> Generator[int, None, CalibrationResult]:
        return self.calibrator.collecting(self.work.data.open(self.work.signature, shard))

    def close(self) -> None:
        self.calibrator.__exit__(None, None, None)


class ShardLedger:
    """The shards' results as they arrive: the first per shard id kept, later ones dropped, each checked
    against the model's digest; `merged` once every id is present. `on_progress(samples done, total)` is
    called whenever the count of samples done (`report`s within shards, and kept shards) rises."""

    def __init__(self, count: int, digest: str, total: int | None = None,
                 on_progress: ProgressCallback | None = None) -> None:
        self.count, self.digest, self.total, self.on_progress = count, digest, total, on_progress
        self.kept: dict[int, CalibrationResult] = {}
        self.dropped = 0
        self.reached: dict[int, int] = {}  # shard id -> the most samples done that any attempt at it reported
        self.done = self.shown = 0  # the sum of `reached`; the count last passed to on_progress

    def report(self, shard_id: int, done: int) -> None:
        """A worker has done `done` samples of shard `shard_id` (its attempt's own count, from 0)."""
        if shard_id not in self.kept:
            self._reach(shard_id, done)

    def _reach(self, shard_id: int, done: int) -> None:
        before = self.reached.get(shard_id, 0)
        if done > before:
            self.reached[shard_id] = done
            self.done += done - before
        shown = self.done if self.total is None else min(self.done, self.total)
        if shown > self.shown:
            self.shown = shown
            if self.on_progress is not None:
                self.on_progress(shown, self.total)

    def add(self, delivery: Delivery) -> bool:
        """Keep `delivery` (True) or drop it as a duplicate (False).

        Raises:
            CalibrationError: it was computed on another model than this run's.
            InternalError: it is no shard of this run.
        """
        shard = Shard(delivery.item_id, self.count)
        if delivery.digest != self.digest:
            raise CalibrationError(f"shard {shard} came from a worker holding another model (digest "
                                   f"{delivery.digest[:12]}, this run's {self.digest[:12]}); refused")
        if not 0 <= delivery.item_id < self.count or not isinstance(delivery.value, CalibrationResult):
            raise InternalError(f"a delivery for shard {delivery.item_id} of {self.count} holds {type(delivery.value)}")
        if delivery.item_id in self.kept:
            self.dropped += 1
            return False
        self.kept[delivery.item_id] = delivery.value
        self._reach(delivery.item_id, delivery.value.samples)
        return True

    def missing(self) -> list[int]:
        return [index for index in range(self.count) if index not in self.kept]

    def merged(self, seconds: float = 0.0) -> CalibrationResult:
        """Every shard's statistics merged in shard order (unchecked: see `finish`)."""
        if self.missing():
            raise InternalError(f"shards {self.missing()} of {self.count} have no result yet")
        ordered = [self.kept[index] for index in range(self.count)]
        names = ordered[0].stats.keys()
        stats = {name: merge_all([result.stats[name] for result in ordered]) for name in names}
        providers = tuple(dict.fromkeys(p for result in ordered for p in result.providers))
        return CalibrationResult(stats, sum(r.samples for r in ordered), sum(r.batches for r in ordered), providers,
                                 seconds)


def shard_count(total: int | None, unit: int, workers: int, per_worker: int) -> int:
    """About `per_worker` shards per worker, but no more shards than batches of `unit` samples."""
    wanted = workers * per_worker
    return wanted if total is None else max(1, min(wanted, total // max(unit, 1)))


def calibrate_on_ray(model: bytes, tensor_names: Iterable[str], data: ShardedData, config: CalibConfig,
                     pool: WorkerPool, *, signature: ModelSignature, histograms: bool | None = None,
                     on_progress: ProgressCallback | None = None) -> CalibrationResult:
    """`calibrate` of the serialized prepared `model` over `data`, spread over `pool`'s workers by shards.

    Args:
        model: the prepared graph, serialized (`from_graph(graph).SerializeToString()`).
        tensor_names, config, histograms, signature: as `calibrate`.
        data: the calibration data; the driver opens it whole to check it and count its samples.
        on_progress: (samples done, total) summed over the shards, after every batch a worker calibrates
            (see `ShardLedger`: never decreasing, at most the total).
    """
    started = time.perf_counter()
    whole = data.open(signature)
    total = whole.num_samples()
    count = shard_count(total, signature.batch_size(config.batch_size), pool.size, pool.backend.shards_per_worker)
    work = CalibrationWork(tuple(dict.fromkeys(tensor_names)), config, histograms, signature, data)
    ledger = ShardLedger(count, model_digest(model), total, on_progress)
    pool.run(work, model, {index: Shard(index, count) for index in range(count)}, ledger.add,
             ledger.report if on_progress is not None else None)
    return finish(ledger.merged(time.perf_counter() - started), whole.describe())
