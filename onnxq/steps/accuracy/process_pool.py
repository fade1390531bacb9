"""Gate vectors measured in several local processes, each with an ONNX Runtime session of its own.

`ProcessPool(jobs, ...)` starts `jobs` fresh interpreters (no copy of this process's threads, locks or
ONNX Runtime state), sends each the serialized gated model and the held-back samples once over its
stdin, and each sets up a `GateWorker` with cores // jobs intra-op threads. A batch is handed out one
gate vector at a time to whichever process is free and the results are put back by index, so
`measure_many` returns what `InProcess` returns, in input order (tests compare them).

The processes are started with `subprocess` running this module's `serve_stdio`, not with
multiprocessing's 'spawn' or 'forkserver' methods: those re-run the caller's main script in every child,
so a script without an `if __name__ == "__main__":` guard would start processes recursively (it did);
here any script, notebook or CLI may ask for `jobs`.

Ctrl-C: each process runs in a session of its own, so a Ctrl-C at the terminal, which goes to the
foreground process group, interrupts only this process; its KeyboardInterrupt ends them (at once when it
interrupts a batch, else through `close`). A process that dies (killed, out of memory, a crash in native
code) ends the batch with `WorkerDiedError` at once; an error raised in a process comes back and is
raised here. A driver that dies leaves its processes an empty stdin, and they end. POSIX only: on other
systems `local_measurers` measures in this process.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx

import onnxq.external_data as external_data
from onnxq.errors import ConfigError, InternalError, OnnxqError, first_line
from onnxq.steps.accuracy.gate_workers import GateWorker, Measurer, MeasurerFactory, Metrics, in_process
from onnxq.steps.accuracy.held_back import HeldBack

__all__ = ["WorkerDiedError", "ProcessPool", "local_measurers", "threads_per_job", "usable_cores"]

_STOP = pickle.dumps(("stop",))
_STOP_WITHIN = 5.0  # seconds a process gets to end by itself before it is terminated


class WorkerDiedError(OnnxqError):
    """A measuring process ended without answering."""


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """ONNX Runtime intra-op threads for each of `jobs` sessions sharing the cores: cores // jobs, at least 1."""
    return max(1, (usable_cores() if cores is None else cores) // jobs)


def local_measurers(jobs: int = 1) -> MeasurerFactory:
    """Measurers on this machine: `jobs` == 1 in this process (ONNX Runtime's default threads), else a
    `ProcessPool` of that many processes.

    A gated model too large to serialize (over 2 GB) is measured in this process whatever `jobs` says
    (each process would need a copy of it), and so is every model on a system other than POSIX.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1 or os.name != "posix":
        return in_process

    def factory(model: onnx.ModelProto, gates_input: str, held: HeldBack, providers: Sequence[str]) -> Measurer:
        if external_data.is_large(model):
            return in_process(model, gates_input, held, providers)
        return ProcessPool(jobs, model.SerializeToString(), gates_input, held, providers, threads_per_job(jobs))

    return factory


# --- the wire: length-prefixed pickles over the worker's stdin and stdout ------------------------------

_HEADER = struct.Struct("<Q")


def _write(stream: BinaryIO, data: bytes) -> None:
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read(stream: BinaryIO) -> bytes | None:
    """One message, or None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    return data if len(data) == size else None


def _pickle(message: object) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


# --- in the worker process ------------------------------------------------------------------------

def serve_stdio() -> None:
    """A worker process's main: answer ("setup", ...) and ("measure_many", ...) requests read from stdin
    on stdout until ("stop",) or the end of stdin. Every error is sent back, never printed; anything a
    library prints goes to stderr, not into the replies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")
    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    from onnxq.runtime.session import set_runtime_log_level

    set_runtime_log_level(False)  # errors come back as exceptions; ORT's own log would reach the terminal
    worker = GateWorker()
    try:
        while (data := _read(requests)) is not None:
            request = pickle.loads(data)
            if request[0] == "stop":
                break
            try:
                reply = ("ok", getattr(worker, request[0])(*request[1:]))
            except BaseException as err:  # noqa: BLE001 - sent back to the driver, which raises it
                reply = ("error", _portable(err))
            try:
                _write(replies, _pickle(reply))
            except OSError:  # the driver is gone
                break
    finally:
        worker.close()


def _portable(err: BaseException) -> BaseException:
    """`err` if it survives pickling, else an InternalError quoting it."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any pickling failure
        return InternalError(f"{type(err).__name__}: {first_line(err)}")


# --- in the driver --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Worker:
    number: int
    process: subprocess.Popen[bytes]

    @property
    def requests(self) -> BinaryIO:
        assert self.process.stdin is not None
        return self.process.stdin

    @property
    def replies(self) -> BinaryIO:
        assert self.process.stdout is not None
        return self.process.stdout


def _start(number: int) -> _Worker:
    """A fresh interpreter running `serve_stdio`, importing this very onnxq, in a session of its own (a
    Ctrl-C at the terminal does not reach it)."""
    package_root = str(Path(__file__).resolve().parents[3])  # the folder holding onnxq/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", "from onnxq.steps.accuracy.process_pool import serve_stdio; serve_stdio()"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                               start_new_session=True)
    return _Worker(number, process)


class ProcessPool:
    """`jobs` local processes, each a `GateWorker` on the gated model: a `Measurer`.

    Args:
        jobs: processes.
        gated_model: the serialized gated model.
        gates_input: its gate-vector input.
        held: the held-back samples and float outputs (sent once to each process).
        providers: execution providers.
        threads: ONNX Runtime intra-op threads in each process.

    Raises:
        WorkerDiedError: a process died before its session was ready.
        ModelError, ConfigError: a process could not open the session.
    """

    def __init__(self, jobs: int, gated_model: bytes, gates_input: str, held: HeldBack, providers: Sequence[str],
                 threads: int | None) -> None:
        self.jobs, self.threads = jobs, threads
        self._workers: list[_Worker] = []
        try:
            for number in range(1, jobs + 1):
                self._workers.append(_start(number))
            setup = _pickle(("setup", gated_model, held, tuple(providers), threads, gates_input))
            for worker in self._workers:
                self._send(worker, setup, "starting")
            for worker in self._workers:
                self._receive(worker, "opening its session")
        except BaseException:
            self._terminate()
            raise

    @property
    def pids(self) -> tuple[int, ...]:
        """The worker processes' ids."""
        return tuple(worker.process.pid for worker in self._workers)

    def measure_many(self, gate_vectors: Sequence[np.ndarray], samples: int | None = None,
                     on_result: Callable[[], None] | None = None) -> list[Metrics]:
        """Each gate vector's metrics, in input order; the processes take one vector at a time."""
        if not self._workers:
            raise InternalError("ProcessPool.measure_many after close")
        results: list[Metrics | None] = [None] * len(gate_vectors)
        pending, busy = deque(range(len(gate_vectors))), {}  # busy: worker number -> vector index
        doing = "measuring gate vector {} of %d" % len(gate_vectors)
        try:
            while pending or busy:
                for worker in self._workers:
                    if worker.number not in busy and pending:
                        index = pending.popleft()
                        self._send(worker, _pickle(("measure_many", [gate_vectors[index]], samples)),
                                   doing.format(index + 1))
                        busy[worker.number] = index
                working = [worker for worker in self._workers if worker.number in busy]
                ready = wait([worker.replies for worker in working])
                for worker in working:
                    if worker.replies in ready:
                        index = busy.pop(worker.number)
                        (results[index],) = self._receive(worker, doing.format(index + 1))
                        if on_result is not None:
                            on_result()
        except BaseException:
            self._terminate()
            raise
        return results  # type: ignore[return-value]  # every index was filled

    def close(self) -> None:
        """Ask every process to stop, wait for them, and terminate any that does not end."""
        try:
            for worker in self._workers:
                try:
                    _write(worker.requests, _STOP)
                except OSError:
                    pass
            for worker in self._workers:
                try:
                    worker.process.wait(_STOP_WITHIN)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._terminate()

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, worker: _Worker, data: bytes, doing: str) -> None:
        try:
            _write(worker.requests, data)
        except OSError:
            raise self._died(worker, doing) from None

    def _receive(self, worker: _Worker, doing: str) -> object:
        """The worker's answer (waiting for it); its error raised here; WorkerDiedError when it died instead."""
        data = _read(worker.replies)
        if data is None:
            raise self._died(worker, doing)
        status, value = pickle.loads(data)
        if status == "error":
            raise value
        return value

    def _died(self, worker: _Worker, doing: str) -> WorkerDiedError:
        try:
            code: int | None = worker.process.wait(1.0)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            how = "closed its output"
        elif code < 0:
            how = f"was killed by {_signal_name(-code)}"
        else:
            how = f"exited with code {code}"
        return WorkerDiedError(f"measuring process {worker.number} of {self.jobs} (pid {worker.process.pid}) {how} "
                               f"while {doing}; the accuracy measurements stopped")

    def _terminate(self) -> None:
        """End every process now (SIGTERM, then SIGKILL) and wait for it."""
        workers, self._workers = self._workers, []
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in workers:
            try:
                worker.process.wait(2.0)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            for stream in (worker.process.stdin, worker.process.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
