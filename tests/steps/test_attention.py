"""The attention step: on ort-cpu, attention MatMuls stay quantized only if measured harmless."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import models
import onnxq
from onnxq.steps.attention import TOLERANCE_DB, AttentionChoice, ChooseAttention
from tests.support.runtime import optimized_session


def _source(model: onnx.ModelProto, seed: int = 0) -> onnxq.FeedsSource:
    return onnxq.FeedsSource([models.random_feeds(model, batch=32, seed=seed)])


@pytest.mark.parametrize("name", ["outlier_encoder", "transformer_encoder"])
def test_ort_cpu_measures_attention_and_follows_the_measurement(name: str, tmp_path) -> None:
    model = models.BUILDERS[name]()
    result = onnxq.quantize(model, _source(model), onnxq.QuantConfig(target="ort-cpu"))
    found = result.finding(AttentionChoice)
    assert isinstance(found, AttentionChoice) and found.samples == 8  # every 4th of 32
    assert found.quantized == (found.sqnr_db_quantized >= found.sqnr_db_float - TOLERANCE_DB)
    scores = list(found.matmuls)
    assert sorted(scores) == [f"layer{i}/attn/{op}" for i in (1, 2) for op in ("context", "scores")]
    assert set(scores) < set(found.nodes)
    decisions = {d.node_name: d for d in result.plan.decisions}
    assert all(decisions[n].quantized == found.quantized for n in scores)
    if not found.quantized:
        assert all("attention" in decisions[n].reason for n in scores)
    _, ops = optimized_session(result.model, tmp_path)
    assert (ops["QLinearMatMul"] > 0) == found.quantized, ops


def test_the_outlier_encoder_keeps_attention_float_and_is_better_for_it() -> None:
    """Measured on 32 new samples: output SQNR 22.1 dB with attention kept float, 21.3 dB forced quantized."""
    model = models.BUILDERS["outlier_encoder"]()
    calib, held_out = _source(model), [models.random_feeds(model, batch=32, seed=7)]
    chosen = onnxq.quantize(model, calib, onnxq.QuantConfig(target="ort-cpu"))
    forced = onnxq.quantize(model, calib, onnxq.QuantConfig(target="ort-cpu",
                                                           selection=onnxq.Selection(quantize_attention=True)))
    found = chosen.finding(AttentionChoice)
    assert isinstance(found, AttentionChoice) and not found.quantized, found
    assert forced.finding(AttentionChoice) is None  # the user chose: nothing measured
    (kept,), (quantized,) = (onnxq.compare_models(model, r.model, held_out) for r in (chosen, forced))
    assert kept.sqnr_db > quantized.sqnr_db + 0.5, (kept, quantized)
    assert "attention MatMul(s) kept float" in found.describe()


def test_only_where_the_target_quantizes_attention_by_default() -> None:
    assert not any(isinstance(s, ChooseAttention) for s in onnxq.steps_for(onnxq.QuantConfig(target="trt")))
    assert any(isinstance(s, ChooseAttention) for s in onnxq.steps_for(onnxq.QuantConfig(target="ort-cpu")))
    asked = onnxq.QuantConfig(target="ort-cpu", selection=onnxq.Selection(quantize_attention=False))
    assert not any(isinstance(s, ChooseAttention) for s in onnxq.steps_for(asked))
    cnn = models.BUILDERS["residual_cnn"]()  # nothing to decide: no finding
    feeds = onnxq.FeedsSource([models.random_feeds(cnn, batch=8, seed=s) for s in range(2)])
    assert onnxq.quantize(cnn, feeds, onnxq.QuantConfig(target="ort-cpu")).finding(AttentionChoice) is None


def test_a_statistics_file_keeps_the_target_default_and_says_so() -> None:
    model = models.BUILDERS["outlier_encoder"]()
    config = onnxq.QuantConfig(target="ort-cpu", bias_correction=False)
    stats, _ = onnxq.collect_stats(model, _source(model), config)
    result = onnxq.quantize(model, stats=stats, config=config)
    skipped = [f for f in result.findings if isinstance(f, onnxq.StepSkipped) and f.step == "attention"]
    assert len(skipped) == 1 and "statistics file" in skipped[0].reason
    assert result.plan.decision("layer1/attn/scores").quantized
    assert np.isfinite(stats.samples)
