"""Progress of a calibration on Ray moves per batch, not per shard: every worker streams its samples done
within its shard, and the driver shows their sum, never going back (a shard lost with its worker and run
again included) and never beyond the total."""

from __future__ import annotations

from pathlib import Path

import onnxq
from onnxq.calib.calibrate import CalibrationResult, calibrate
from onnxq.cluster.backend import RayBackend
from onnxq.cluster.calibration import ShardLedger, calibrate_on_ray
from onnxq.cluster.pool import open_pool
from onnxq.cluster.worker import CRASH_ONCE_ENV, model_digest
from onnxq.data.signature import signature_of
from onnxq.io import from_graph, load_model
from onnxq.pipeline import prepare
from onnxq.targets import get_target
from tests.cluster.test_ray_calibration import CASES
from tests.cluster.test_worker_failure import _shard_deliveries
from tests.support.paths import MODELS

SAMPLES = 64  # the PP-OCR calibration data


def _calibrate_with_progress(backend: RayBackend) -> tuple[list[tuple[int, int | None]], CalibrationResult,
                                                           CalibrationResult, int]:
    """PP-OCR's `max` calibration (batches of 8) on a pool of `backend`: the progress reports, the result,
    the one-process result, and how many workers were replaced."""
    case = CASES["ppocr"]
    model = load_model(MODELS / case.model)
    signature, calib = signature_of(model), onnxq.CalibConfig(batch_size=case.batch_size)
    graph = prepare(model, "trt")
    names = get_target("trt").plan(graph, onnxq.Selection()).activation_names
    reports: list[tuple[int, int | None]] = []
    with open_pool(backend) as pool:
        on_ray = calibrate_on_ray(from_graph(graph).SerializeToString(), names, case.data, calib, pool,
                                  signature=signature, on_progress=lambda done, total: reports.append((done, total)))
        replaced = pool.replaced
    here = calibrate(graph, names, case.data.open(signature), calib, signature=signature)
    return reports, on_ray, here, replaced


def _assert_monotone_to_the_total(reports: list[tuple[int, int | None]]) -> None:
    done = [report[0] for report in reports]
    assert all(later >= earlier for earlier, later in zip(done, done[1:])), done
    assert done[-1] == SAMPLES and all(0 < value <= SAMPLES for value in done), done
    assert {report[1] for report in reports} == {SAMPLES}


def test_progress_moves_per_batch_across_two_shards(ray_session: object) -> None:
    # 2 workers, 1 shard each: 2 shards of 32 samples, 4 batches of 8 each.
    reports, on_ray, here, _ = _calibrate_with_progress(RayBackend(workers=2, shards_per_worker=1))
    assert (on_ray.samples, on_ray.batches) == (here.samples, here.batches) == (SAMPLES, 8)
    assert on_ray.stats == here.stats
    assert len(reports) > 2, reports  # more reports than shards: per batch, not per shard
    _assert_monotone_to_the_total(reports)


def test_progress_stays_monotone_when_a_worker_dies_mid_shard(ray_session: object, tmp_path: Path) -> None:
    marker = tmp_path / "died"
    backend = RayBackend(workers=2, shards_per_worker=1, env={CRASH_ONCE_ENV: str(marker)})
    reports, on_ray, here, replaced = _calibrate_with_progress(backend)
    assert marker.exists() and replaced == 1
    assert on_ray.stats == here.stats and on_ray.samples == SAMPLES
    _assert_monotone_to_the_total(reports)


def test_a_shard_run_again_keeps_the_count_it_had_reached() -> None:
    """The ledger's sum over shards, with shard 0's first attempt lost at 24 of 32 samples and run again
    from 0: the shown count holds until the new attempt passes 24, and no sample counts twice."""
    digest = model_digest(b"model")
    deliveries, _ = _shard_deliveries(digest, count=2)
    shown: list[int] = []
    ledger = ShardLedger(2, digest, SAMPLES, lambda done, total: shown.append(done))
    for shard, done in ((0, 8), (1, 8), (0, 16), (0, 24), (1, 16),  # shard 0's worker dies here
                        (0, 8), (0, 16), (0, 24), (1, 24)):
        ledger.report(shard, done)
    assert shown == [8, 16, 24, 32, 40, 48]
    assert ledger.add(deliveries[1]) and shown[-1] == 56  # shard 1's last batch arrives with its result
    ledger.report(1, 8)  # a late report of a shard already in changes nothing
    assert ledger.add(deliveries[0]) and shown == [8, 16, 24, 32, 40, 48, 56, 64]
    assert ledger.add(deliveries[0]) is False and shown[-1] == SAMPLES  # a repeat neither
