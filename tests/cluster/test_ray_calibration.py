"""Calibration on a Ray worker pool equals calibration in this process, bit for bit, on the shipped real models;
a worker that dies mid-shard changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import onnxq
from onnxq.calib.calibrate import calibrate
from onnxq.cluster.backend import ShardedData
from onnxq.cluster.calibration import calibrate_on_ray
from onnxq.cluster.pool import WorkerPool
from onnxq.data.images import ImagePreprocess
from onnxq.data.signature import signature_of
from onnxq.io import from_graph, load_model
from onnxq.pipeline import prepare
from onnxq.targets import get_target
from tests.support.paths import MODELS

METHODS = ("max", "entropy", "percentile", "mse")


@dataclass(frozen=True)
class Case:
    model: str
    data: ShardedData
    batch_size: int


CASES = {
    # 64 text lines in one .npz, batches of 8: 8 shards over 2 workers.
    "ppocr": Case("ppocr_mobile_v2_cls.onnx", ShardedData.at(MODELS / "data/textlines/ppocr_cls_calib.npz"), 8),
    # 16 photos of the image folder, batches of 4: 4 shards (each photo decoded on the worker that holds it).
    "lite0": Case("efficientnet_lite0.onnx", ShardedData.at(MODELS / "data/photos/calib", ImagePreprocess(
        mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)), max_samples=16), 4),
}


def _config(method: str, batch_size: int) -> onnxq.QuantConfig:
    return onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod(method), batch_size=batch_size))


@pytest.mark.parametrize("name", sorted(CASES))
def test_ray_histograms_equal_collect_stats_and_every_method_gives_the_same_ranges(name: str, pool: WorkerPool) -> None:
    case = CASES[name]
    model = load_model(MODELS / case.model)
    config = _config("entropy", case.batch_size)
    progress: list[tuple[str, int, int | None]] = []
    on_ray, calibration = onnxq.collect_stats(model, case.data, config, backend=pool,
                                              on_progress=lambda *report: progress.append(report))
    here, _ = onnxq.collect_stats(model, case.data, config)
    assert on_ray.samples == here.samples == calibration.samples and on_ray.batches == here.batches
    assert on_ray.histograms.keys() == here.histograms.keys() and len(here.histograms) > 30
    assert all(on_ray.histograms[tensor] == here.histograms[tensor] for tensor in here.histograms)
    # Progress: samples summed over the shards as they arrive, ending at the whole.
    done = [report[1] for report in progress]
    assert done == sorted(done) and done[-1] == here.samples and len(done) > 1
    assert {report[2] for report in progress} == {here.samples}
    plan = onnxq.inspect(model)
    for method in METHODS:
        calib = onnxq.CalibConfig(method=onnxq.CalibMethod(method))
        assert onnxq.group_amax(plan, on_ray.histograms, calib) == onnxq.group_amax(plan, here.histograms, calib)


def max_calibration(name: str, pool: WorkerPool) -> tuple[onnxq.CalibrationResult, onnxq.CalibrationResult]:
    """`max` statistics (in-graph channel maxima included) of `name` on `pool` and in this process."""
    case = CASES[name]
    model = load_model(MODELS / case.model)
    signature, config = signature_of(model), _config("max", case.batch_size)
    graph = prepare(model, "trt")
    names = get_target("trt").plan(graph, onnxq.Selection()).activation_names
    on_ray = calibrate_on_ray(from_graph(graph).SerializeToString(), names, case.data, config.calib, pool,
                              signature=signature)
    here = calibrate(graph, names, case.data.open(signature), config.calib, signature=signature)
    return on_ray, here


def test_ray_max_statistics_equal_calibration_in_this_process(pool: WorkerPool) -> None:
    on_ray, here = max_calibration("ppocr", pool)
    assert on_ray.stats == here.stats and len(here.stats) > 30
    assert (on_ray.samples, on_ray.batches) == (here.samples, here.batches) == (64, 8)
