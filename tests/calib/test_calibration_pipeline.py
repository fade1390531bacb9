"""Calibration end to end: methods, statistics files, shards, batch invariance, degenerate data."""

from __future__ import annotations

from dataclasses import replace

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
import onnxq
from onnxq.calib.stats_file import load_stats, merge_stats, save_stats
from onnxq.errors import CalibrationError

METHODS = ("max", "entropy", "percentile", "mse")


def _config(method: str, batch_size: int = 4) -> onnxq.QuantConfig:
    return onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod(method), batch_size=batch_size))


def _feeds(model: onnx.ModelProto, count: int = 6, batch: int = 3) -> list[dict[str, np.ndarray]]:
    return [models.random_feeds(model, batch=batch, seed=s) for s in range(count)]


@pytest.mark.parametrize("method", METHODS)
def test_statistics_file_reuse_gives_the_identical_model(method: str, tmp_path) -> None:
    model = models.BUILDERS["residual_cnn"]()
    feeds = _feeds(model)
    # Bias correction and SmoothQuant's per-layer measurement need the samples themselves (a statistics
    # file holds none): off for the comparison.
    direct = onnxq.quantize(model, onnxq.FeedsSource(feeds),
                            replace(_config(method), bias_correction=False, smoothquant=False)).model
    stats, _ = onnxq.collect_stats(model, onnxq.FeedsSource(feeds), _config(method))
    save_stats(stats, tmp_path / "s.onnxq.npz")
    reused = onnxq.quantize(model, config=_config(method), stats=tmp_path / "s.onnxq.npz").model
    assert reused.SerializeToString() == direct.SerializeToString()


def test_methods_differ_and_clip_below_max_on_heavy_tails() -> None:
    """196k standard-normal input values and one outlier at 60: the histogram methods clip it away."""
    model = models.BUILDERS["residual_cnn"]()
    feeds = _feeds(model, count=8, batch=8)
    feeds[3]["input"][0, 0, 0, 0] = 60.0
    stats, _ = onnxq.collect_stats(model, onnxq.FeedsSource(feeds))
    plan = onnxq.inspect(model)
    amax = {m: onnxq.group_amax(plan, stats.histograms, onnxq.CalibConfig(method=onnxq.CalibMethod(m)))["input"]
            for m in METHODS}
    assert amax["max"] == pytest.approx(60.0)
    assert amax["entropy"] < 8.0 and amax["percentile"] < 8.0, amax
    # MSE weighs the outlier's clipping error (60 - a)^2 against the rounding noise of 196k values,
    # ~N (a / 127)^2 / 12 ~ a^2: the optimum is near a = 30.
    assert 25.0 < amax["mse"] < 35.0, amax


def test_shards_merge_exactly_into_one_pass(tmp_path) -> None:
    model = models.BUILDERS["yolo_neck_head"]()
    feeds = _feeds(model, count=6, batch=2)
    whole, _ = onnxq.collect_stats(model, onnxq.FeedsSource(feeds))
    first, _ = onnxq.collect_stats(model, onnxq.FeedsSource(feeds[:2]))
    second, _ = onnxq.collect_stats(model, onnxq.FeedsSource(feeds[2:]))
    save_stats(first, tmp_path / "a.npz")
    save_stats(second, tmp_path / "b.npz")
    merged = merge_stats(load_stats(tmp_path / "b.npz"), load_stats(tmp_path / "a.npz"))
    assert merged.samples == whole.samples == 12
    assert merged.histograms.keys() == whole.histograms.keys()
    assert all(merged.histograms[name] == whole.histograms[name] for name in whole.histograms)


@pytest.mark.parametrize("batch_size", [1, 5, 18])
def test_statistics_do_not_depend_on_batch_size_or_order(batch_size: int) -> None:
    model = models.BUILDERS["depthwise_cnn"]()
    feeds = _feeds(model, count=6, batch=3)
    reference, _ = onnxq.collect_stats(model, onnxq.FeedsSource(feeds), _config("entropy", batch_size=2))
    other, _ = onnxq.collect_stats(model, onnxq.FeedsSource(feeds[::-1]), _config("entropy", batch_size=batch_size))
    assert all(other.histograms[name] == reference.histograms[name] for name in reference.histograms)


def test_statistics_of_another_model_are_refused(tmp_path) -> None:
    stats, _ = onnxq.collect_stats(models.BUILDERS["gemm_mlp"](), onnxq.FeedsSource(_feeds(models.BUILDERS["gemm_mlp"]())))
    save_stats(stats, tmp_path / "s.npz")
    other = models.BUILDERS["gemm_mlp"](seed=1)  # same structure, other weights
    with pytest.raises(CalibrationError, match="different model"):
        onnxq.quantize(other, stats=tmp_path / "s.npz")


def test_foreign_and_pickled_files_are_refused_without_unpickling(tmp_path) -> None:
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(CalibrationError, match="not an onnxq statistics file"):
        load_stats(tmp_path / "plain.npz")
    np.savez(tmp_path / "pickled.npz", meta=np.array([{"format": "onnxq-stats"}], dtype=object))
    with pytest.raises(CalibrationError):
        load_stats(tmp_path / "pickled.npz")


def _masked_matmul_model() -> onnx.ModelProto:
    """x + bias_mask (float32 min where masked) -> MatMul(W): the MatMul input carries sentinels."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "mask"], ["masked"], name="add_mask"),
         helper.make_node("MatMul", ["masked", "w"], ["y"], name="matmul")],
        "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                   helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("method", METHODS)
def test_sentinel_values_do_not_become_the_range(method: str) -> None:
    model = _masked_matmul_model()
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(3):
        mask = np.where(rng.random((4, 8)) < 0.3, np.finfo(np.float32).min, 0.0).astype(np.float32)
        feeds.append({"x": rng.normal(size=(4, 8)).astype(np.float32), "mask": mask})
    result = onnxq.quantize(model, onnxq.FeedsSource(feeds), _config(method))
    assert 0.5 < result.group_amax["masked"] < 10.0, result.group_amax
    assert result.calibration.stats["masked"].sentinel_count > 0


def test_nan_values_are_ignored_with_a_warning_naming_the_tensor(caplog) -> None:
    model = _masked_matmul_model()
    x = np.random.default_rng(2).normal(size=(6, 8)).astype(np.float32)
    x[1, 3] = np.nan
    feeds = [{"x": x, "mask": np.zeros((6, 8), np.float32)}]
    with caplog.at_level(logging.WARNING):
        result = onnxq.quantize(model, onnxq.FeedsSource(feeds), _config("entropy"))
    assert np.isfinite(result.group_amax["masked"]) and result.group_amax["masked"] > 0
    assert any("'masked'" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("method", ["max", "entropy"])
def test_all_nan_tensor_is_an_error_naming_it(method: str) -> None:
    model = _masked_matmul_model()
    feeds = [{"x": np.full((2, 8), np.nan, np.float32), "mask": np.zeros((2, 8), np.float32)}]
    with pytest.raises(CalibrationError, match="'masked'"):
        onnxq.quantize(model, onnxq.FeedsSource(feeds), _config(method))


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_and_tiny_tensors_get_a_positive_scale(method: str) -> None:
    model = _masked_matmul_model()
    for scale in (0.0, 1e-30):
        feeds = [{"x": np.full((2, 8), scale, np.float32), "mask": np.zeros((2, 8), np.float32)}]
        result = onnxq.quantize(model, onnxq.FeedsSource(feeds), _config(method))
        scales = [numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "masked_scale"]
        assert len(scales) == 1 and scales[0] > 0 and np.isfinite(scales[0])
        assert scales[0] >= np.float32(2.0**-24)  # never a denormal scale


@pytest.mark.parametrize("budget, runs", [(1, 18), (1 << 40, 7)])
def test_batches_run_in_slices_within_the_activation_budget(monkeypatch, budget: int, runs: int) -> None:
    """6 batches of 3: the first sample alone, then slices within the budget; statistics unchanged."""
    from onnxq.calib import calibrate as calibration
    from onnxq.calib import readout

    model = models.BUILDERS["residual_cnn"]()
    feeds = _feeds(model, count=6, batch=3)
    reference, _ = onnxq.collect_stats(model, onnxq.FeedsSource(feeds), _config("entropy", batch_size=3))
    folds: list[int] = []
    real_fold = readout.fold

    def counting_fold(accumulators, outputs, pool) -> None:
        folds.append(next(iter(outputs.values())).shape[0])
        real_fold(accumulators, outputs, pool)

    monkeypatch.setattr(calibration, "RUN_BUDGET_BYTES", budget)
    monkeypatch.setattr(readout, "fold", counting_fold)
    sliced, result = onnxq.collect_stats(model, onnxq.FeedsSource(feeds), _config("entropy", batch_size=3))
    assert len(folds) == runs and sum(folds) == 18 and result.samples == 18
    assert sliced.histograms.keys() == reference.histograms.keys()
    for name, histogram in sliced.histograms.items():
        assert histogram == reference.histograms[name], name
