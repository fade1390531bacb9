"""The actor each worker of a pool runs: one model loaded at a time (its sessions), any kind of `Work`.

A `Work` is a frozen, picklable description of what to do with a model (calibrate these tensors with this
config); `load` opens what it needs once per model on a worker, and `Loaded.run` does one item (a shard),
a generator that yields its progress within the item (samples done) and returns the item's result.
`Worker.run` returns the `Delivery` at the end; `Worker.stream`, called as a Ray streaming generator
(onnxq/cluster/pool.py), yields each progress count to the driver as it comes, then the `Delivery`.
The model's bytes come through Ray's object store, fetched by a worker only when it loads a model it does
not already hold; the worker hashes them itself, and every `Delivery` carries that digest, so the driver
can refuse a result computed on another model.

Fault injection for tests and drills: with ONNXQ_RAY_CRASH_ONCE=PATH in a worker's environment, the first
worker to report progress on an item creates PATH and ends its process at once (`os._exit`); later ones
find PATH and go on, so exactly one worker dies mid-item.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from onnxq.errors import InternalError

__all__ = ["CRASH_ONCE_ENV", "Delivery", "Loaded", "Work", "Worker", "model_digest"]

CRASH_ONCE_ENV = "ONNXQ_RAY_CRASH_ONCE"
#: The exit code of a worker ended by the fault-injection hook.
CRASH_EXIT_CODE = 86


class Loaded(Protocol):
    """A model made ready for one kind of work on one worker (e.g. a calibration's ORT sessions)."""

    def run(self, item: Any) -> Generator[int, None, Any]:
        """Do one item: yield the progress within it in the work's own unit (samples done), return its result."""

    def close(self) -> None: ...


class Work(Protocol):
    """One kind of work: frozen and picklable; two equal Works load a model the same way."""

    def load(self, model: bytes, threads: int) -> Loaded: ...


@dataclass(frozen=True)
class Delivery:
    """One item's result, with the digest of the model it was computed on and where."""

    item_id: int
    digest: str
    value: Any
    worker: str


def model_digest(model: bytes) -> str:
    """sha256 of a serialized model, hex."""
    return hashlib.sha256(model).hexdigest()


class Worker:
    """The actor class (made remote by `WorkerPool`); `threads`: its CPU share."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.key: tuple[Work, str] | None = None
        self.loaded: Loaded | None = None
        self.digest = ""
        self.name = f"{os.getpid()}@{socket.gethostname()}"

    def run(self, work: Work, model: list[Any], claimed: str, item_id: int, item: Any) -> Delivery:
        """Do `item` of `work` on the model behind `model[0]` (an object reference: nested in a list, so Ray
        hands it over unresolved and the bytes are fetched only when this worker loads that model)."""
        for report in self.stream(work, model, claimed, item_id, item):
            if isinstance(report, Delivery):
                return report
        raise InternalError(f"the work on item {item_id} ended without a delivery")

    def stream(self, work: Work, model: list[Any], claimed: str, item_id: int,
               item: Any) -> Iterator[int | Delivery]:
        """`run`, yielding the item's progress (its own count of samples done, rising) before its `Delivery`."""
        if self.key is None or self.key[0] != work or self.key[1] != claimed:
            import ray

            self.close()
            data = ray.get(model[0])
            self.loaded, self.key, self.digest = work.load(data, self.threads), (work, claimed), model_digest(data)
        assert self.loaded is not None
        crash = _crash_hook()
        steps = self.loaded.run(item)
        while True:
            try:
                done = next(steps)
            except StopIteration as end:
                yield Delivery(item_id, self.digest, end.value, self.name)
                return
            crash(done)
            yield done

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.close()
        self.loaded, self.key = None, None


def _crash_hook() -> Callable[[int], None]:
    marker = os.environ.get(CRASH_ONCE_ENV)

    def report(done: int) -> None:
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(CRASH_EXIT_CODE)

    return report
