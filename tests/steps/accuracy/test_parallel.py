"""The accuracy target measured in several processes (`AccuracyGoal.jobs`) gives the serial run's numbers.

Real shipped models, real processes: the per-layer metrics, the ranking, the layers left float, the notes
and the written model are compared for equality with `jobs=1` (not within a tolerance: ONNX Runtime gives
the same bits with one intra-op thread per process as with its default threads here), the fallback search
measuring ahead with two processes (`speculation`) and still choosing what the serial search chooses. A worker that dies or
fails ends the run with a clear error and leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.errors import ModelError
from onnxq.steps.accuracy.gate_workers import Measurer
from onnxq.steps.accuracy.held_back import HeldBack
from onnxq.steps.accuracy.process_pool import ProcessPool, WorkerDiedError, local_measurers, threads_per_job
from onnxq.steps.accuracy.step import MeetAccuracy
from tests.support.damaged_mlp import damaged_mlp, mlp_feeds
from tests.support.paths import MODELS

pytestmark = pytest.mark.skipif(os.name != "posix", reason="--jobs runs processes on POSIX systems only")

TEXTLINES = MODELS / "data" / "textlines"
PHOTOS = MODELS / "data" / "photos"


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _quantize_twice(model: onnx.ModelProto, calib: Callable[[], object], eval_source: Callable[[], object],
                    goal: onnxq.AccuracyGoal, config: onnxq.QuantConfig) -> tuple[list[onnxq.QuantResult], list[list]]:
    """`quantize` with `goal` at jobs=1 and at jobs=2; the results and the progress reports of the accuracy stage."""
    results, progress = [], []
    for jobs in (1, 2):
        calls: list[tuple[int, int | None]] = []

        def on_progress(stage: str, done: int, total: int | None, calls: list = calls) -> None:
            if stage == "measuring accuracy":
                calls.append((done, total))

        results.append(onnxq.quantize(model, calib(), config, eval_source=eval_source(),
                                      accuracy=replace(goal, jobs=jobs), on_progress=on_progress))
        progress.append(calls)
    return results, progress


def _assert_same(serial: onnxq.QuantResult, parallel: onnxq.QuantResult) -> None:
    assert serial.sensitivity is not None and parallel.sensitivity is not None
    assert serial.fallback is not None and parallel.fallback is not None
    assert parallel.sensitivity.layers == serial.sensitivity.layers  # every figure, in the same order
    assert parallel.sensitivity.float_vs_int8 == serial.sensitivity.float_vs_int8
    assert parallel.sensitivity.runs == serial.sensitivity.runs
    assert parallel.fallback.float_layers == serial.fallback.float_layers
    assert parallel.fallback.after == serial.fallback.after and parallel.fallback.estimate == serial.fallback.estimate
    assert parallel.fallback.note == serial.fallback.note and parallel.notes == serial.notes
    # the search measured ahead with two processes: more runs, exactly the wasted ones
    assert serial.fallback.wasted == 0
    assert parallel.fallback.runs - parallel.fallback.wasted == serial.fallback.runs
    assert parallel.model.SerializeToString() == serial.model.SerializeToString()


def test_ppocr_jobs_2_gives_the_serial_ranking_and_model() -> None:
    model = onnxq.load_model(MODELS / "ppocr_mobile_v2_cls.onnx")
    entropy = onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod.ENTROPY))
    (serial, parallel), (serial_calls, parallel_calls) = _quantize_twice(
        model, lambda: TEXTLINES / "ppocr_cls_calib.npz", lambda: TEXTLINES / "ppocr_cls_eval.npz",
        onnxq.AccuracyGoal(min_cosine=0.9995, samples=32), entropy)
    _assert_same(serial, parallel)
    assert serial.fallback is not None and parallel.fallback is not None
    assert len(serial.fallback.float_layers) == 6  # the target needed a fallback, and a search of 11 gated runs
    assert serial.fallback.runs == 11 + 1 and parallel.fallback.wasted > 0  # (+1: the built model's check)
    # progress counts every run, whoever ran it: the ranking's alike, the search's with the wasted ones
    ranking = [call for call in serial_calls if call[1] is not None]
    assert [call for call in parallel_calls if call[1] is not None] == ranking
    assert len(parallel_calls) == len(serial_calls) + parallel.fallback.wasted
    for calls in (serial_calls, parallel_calls):
        assert [done for done, _total in calls] == list(range(1, len(calls) + 1))


def test_efficientnet_jobs_2_gives_the_serial_ranking_and_model() -> None:
    model = onnxq.load_model(MODELS / "efficientnet_lite0.onnx")
    specs, preprocess = onnxq.input_specs(model), onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)
    (serial, parallel), _ = _quantize_twice(
        model, lambda: onnxq.open_source(PHOTOS / "calib", specs, preprocess, 16),
        lambda: onnxq.open_source(PHOTOS / "eval", specs, preprocess),
        onnxq.AccuracyGoal(min_cosine=0.995, samples=4), onnxq.QuantConfig(bias_correction=False))
    _assert_same(serial, parallel)
    assert serial.fallback is not None and 0 < len(serial.fallback.float_layers) < len(serial.sensitivity.layers)
    assert parallel.fallback is not None and parallel.fallback.wasted > 0  # the search did measure ahead


class _KillFirstWorker:
    """A measurer factory: a pool of 2 whose first process is SIGKILLed before the first batch."""

    def __init__(self) -> None:
        self.pids: tuple[int, ...] = ()

    def __call__(self, *args: object) -> Measurer:
        pool = local_measurers(2)(*args)  # type: ignore[arg-type]
        assert isinstance(pool, ProcessPool)
        self.pids, self.pool = pool.pids, pool
        return self

    def measure_many(self, gate_vectors: Sequence[np.ndarray], samples: int | None = None, on_result=None) -> list:
        os.kill(self.pids[0], signal.SIGKILL)
        return self.pool.measure_many(gate_vectors, samples, on_result)

    def close(self) -> None:
        self.pool.close()


def _workers() -> list[int]:
    """This process's measuring processes still alive."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == os.getpid() and b"serve_stdio" in command:
            found.append(int(stat.parent.name))
    return found


def test_a_killed_worker_ends_the_run_with_one_clear_error_and_no_process_left() -> None:
    killer = _KillFirstWorker()
    step = MeetAccuracy(onnxq.AccuracyGoal(min_cosine=0.99), mlp_feeds(16, 2), measurers=killer)
    started = time.monotonic()
    with pytest.raises(WorkerDiedError) as caught:
        onnxq.quantize(damaged_mlp(), mlp_feeds(64, 1), steps=[step])
    assert time.monotonic() - started < 60
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"measuring process 1 of 2 (pid {killer.pids[0]}) was killed "
                                                      "by SIGKILL while measuring gate vector"), message
    assert len(killer.pids) == 2 and not any(_alive(pid) for pid in killer.pids) and not _workers()


def test_an_error_in_a_worker_is_raised_here_and_the_processes_end() -> None:
    held = HeldBack((), (), (), 0, "none")
    with pytest.raises(ModelError, match="ONNX Runtime cannot load the model"):
        ProcessPool(2, b"not an ONNX model", "onnxq_gates", held, ("CPUExecutionProvider",), 1)
    assert not _workers()


def test_threads_per_job_share_the_cores() -> None:
    assert [threads_per_job(jobs, cores=8) for jobs in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_jobs_below_one_is_refused() -> None:
    with pytest.raises(onnxq.ConfigError, match="--jobs"):
        onnxq.AccuracyGoal(min_cosine=0.99, jobs=0)
