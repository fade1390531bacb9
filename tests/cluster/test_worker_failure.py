"""What the scheduler does with lost, repeated and foreign results: a worker that dies mid-shard is replaced
and its shard run again; a shard delivered twice counts once; a shard computed on another model is refused."""

from __future__ import annotations

import pytest

from onnxq.calib.calibrate import Calibrator
from onnxq.cluster.backend import RayBackend
from onnxq.cluster.calibration import ShardLedger
from onnxq.cluster.pool import open_pool
from onnxq.cluster.worker import CRASH_ONCE_ENV, Delivery, model_digest
from onnxq.data.shards import Shard
from onnxq.errors import CalibrationError, InternalError
from tests.cluster.test_ray_calibration import CASES, max_calibration


def test_a_worker_that_dies_mid_shard_is_replaced_and_the_result_is_exact(ray_session: object, tmp_path) -> None:
    marker = tmp_path / "died"
    with open_pool(RayBackend(workers=2, env={CRASH_ONCE_ENV: str(marker)})) as pool:
        on_ray, here = max_calibration("ppocr", pool)
        assert marker.exists(), "no worker ran into the crash hook"
        assert pool.replaced == 1
    assert on_ray.stats == here.stats
    assert on_ray.samples == here.samples == 64


def _shard_deliveries(digest: str, count: int = 4) -> tuple[list[Delivery], object]:
    """The max statistics of each shard of the PP-OCR calibration data, computed here, as deliveries; and the
    statistics of all of it in one pass."""
    import onnxq
    from onnxq.data.signature import signature_of
    from onnxq.io import load_model
    from onnxq.pipeline import prepare
    from onnxq.targets import get_target
    from tests.support.paths import MODELS

    case = CASES["ppocr"]
    model = load_model(MODELS / case.model)
    signature, graph = signature_of(model), prepare(model, "trt")
    names = get_target("trt").plan(graph, onnxq.Selection()).activation_names
    with Calibrator(graph, names, onnxq.CalibConfig(), signature=signature) as calibrator:
        shards = [calibrator.collect(case.data.open(signature, Shard(index, count))) for index in range(count)]
        whole = calibrator.collect(case.data.open(signature))
    return [Delivery(index, digest, result, "here") for index, result in enumerate(shards)], whole


def test_a_shard_delivered_twice_counts_once_and_merging_waits_for_every_shard() -> None:
    digest = model_digest(b"model")
    deliveries, whole = _shard_deliveries(digest)
    ledger = ShardLedger(4, digest, total=64)
    for delivery in (deliveries[2], deliveries[0], deliveries[2], deliveries[1]):
        ledger.add(delivery)
    assert ledger.dropped == 1 and ledger.missing() == [3]
    with pytest.raises(InternalError, match=r"shards \[3\] of 4 have no result"):
        ledger.merged()
    # A repeat carrying other statistics (a shard run again after a worker was presumed lost) is dropped too.
    assert ledger.add(Delivery(1, digest, deliveries[3].value, "elsewhere")) is False
    assert ledger.add(deliveries[3]) is True
    merged = ledger.merged()
    assert merged.stats == whole.stats and (merged.samples, merged.batches) == (whole.samples, whole.batches) == (64, 8)


def test_a_shard_computed_on_another_model_is_refused() -> None:
    deliveries, _ = _shard_deliveries(model_digest(b"another model"), count=2)
    ledger = ShardLedger(2, model_digest(b"model"))
    with pytest.raises(CalibrationError, match=r"shard 0/2 came from a worker holding another model"):
        ledger.add(deliveries[0])
    assert ledger.missing() == [0, 1]
