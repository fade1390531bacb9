"""The accuracy target's per-layer runs on a Ray worker pool give the serial run's ranking, float layers and
model, bit for bit, on a real shipped model; a worker that dies mid-measurement changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import onnxq
from onnxq.cluster.backend import RayBackend, ShardedData
from onnxq.cluster.gates import ray_measurers
from onnxq.cluster.pool import WorkerPool, open_pool
from onnxq.cluster.worker import CRASH_ONCE_ENV
from onnxq.data.signature import signature_of
from onnxq.data.sources import open_source
from onnxq.steps.accuracy.step import MeetAccuracy
from tests.support.paths import MODELS

TEXTLINES = MODELS / "data" / "textlines"
GOAL = onnxq.AccuracyGoal(min_cosine=0.9995, samples=32)  # 6 of 72 layers fall back: the search measures ahead
ENTROPY = onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod.ENTROPY))


def _ppocr(backend: WorkerPool | None) -> onnxq.QuantResult:
    model = onnxq.load_model(MODELS / "ppocr_mobile_v2_cls.onnx")
    calib = ShardedData.at(TEXTLINES / "ppocr_cls_calib.npz") if backend is not None else TEXTLINES / "ppocr_cls_calib.npz"
    return onnxq.quantize(model, calib, ENTROPY, eval_source=TEXTLINES / "ppocr_cls_eval.npz", accuracy=GOAL,
                          backend=backend)


@pytest.fixture(scope="module")
def serial() -> onnxq.QuantResult:
    return _ppocr(None)


def test_ray_sensitivity_and_fallback_equal_the_serial_run(serial: onnxq.QuantResult, ray_session: object) -> None:
    with open_pool(RayBackend(workers=2)) as pool:  # not the module-wide pool: the next test needs the CPUs
        on_ray = _ppocr(pool)
    assert serial.sensitivity is not None and on_ray.sensitivity is not None
    assert serial.fallback is not None and on_ray.fallback is not None and serial.fallback.float_layers
    assert on_ray.sensitivity.layers == serial.sensitivity.layers  # every figure, in the same order
    assert on_ray.sensitivity.float_vs_int8 == serial.sensitivity.float_vs_int8
    assert on_ray.fallback.float_layers == serial.fallback.float_layers
    assert on_ray.fallback.after == serial.fallback.after
    assert on_ray.fallback.note == serial.fallback.note and on_ray.fallback.estimate == serial.fallback.estimate
    assert on_ray.fallback.runs - on_ray.fallback.wasted == serial.fallback.runs and on_ray.fallback.wasted > 0
    assert on_ray.model.SerializeToString() == serial.model.SerializeToString()


def test_a_worker_dying_mid_measurement_is_replaced_and_the_metrics_are_exact(serial: onnxq.QuantResult,
                                                                             ray_session: object,
                                                                             tmp_path: Path) -> None:
    # calibration in this process, only the gated runs on the pool: the one crash is mid-measurement
    model = onnxq.load_model(MODELS / "ppocr_mobile_v2_cls.onnx")
    evaluation = open_source(TEXTLINES / "ppocr_cls_eval.npz", signature_of(model))
    backend = RayBackend(workers=2, env={CRASH_ONCE_ENV: str(tmp_path / "crashed")})
    with open_pool(backend) as crashing:
        on_ray = onnxq.quantize(model, TEXTLINES / "ppocr_cls_calib.npz", ENTROPY,
                                steps=[MeetAccuracy(GOAL, evaluation, measurers=ray_measurers(crashing))])
        assert crashing.replaced == 1 and (tmp_path / "crashed").exists()
    assert on_ray.sensitivity is not None and serial.sensitivity is not None
    assert on_ray.sensitivity.layers == serial.sensitivity.layers
    assert on_ray.model.SerializeToString() == serial.model.SerializeToString()
