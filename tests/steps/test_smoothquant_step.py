"""The SmoothQuant step: channel profiles, alpha measured per layer on held-out rows, on by default."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
import onnxq
from onnxq.calib.channel_absmax import channel_profiles
from onnxq.errors import ConfigError
from onnxq.lower.scales import INT8_SYMMETRIC, UINT8_ASYMMETRIC
from onnxq.passes.smooth_sites import smooth_sites
from onnxq.steps.smooth_alpha import EXPLICIT_MIN_ERROR, MIN_ROWS, choose_alpha
from onnxq.steps.smoothquant import Smoothed
from tests.support.paths import MODELS

GELU = "layer1/ffn/gelu/mul_half_output_0"
ATTENTION_OUT = "layer1/attn/merge_reshape_output_0"
NORM = "layer1/attn_norm_output_0"


def _encoder() -> tuple[onnx.ModelProto, onnxq.FeedsSource]:
    model = models.BUILDERS["outlier_encoder"]()
    return model, onnxq.FeedsSource([models.random_feeds(model, batch=16, seed=s) for s in range(2)])


def _profiles(model: onnx.ModelProto, source: onnxq.FeedsSource, rows: int = 512):
    graph = onnxq.prepare(model)
    sites = {c.tensor_name: site for c, site in smooth_sites(graph, explicit=True) if site is not None}
    return graph, sites, channel_profiles(graph, sites, source, onnxq.CalibConfig(batch_size=5), rows=rows)


def test_channel_profiles_match_numpy_and_sample_real_rows() -> None:
    model, source = _encoder()
    graph, _, profiles = _profiles(model, source, rows=100)
    exposed = onnxq.from_graph(graph, template=model)
    for output in (GELU, NORM):
        exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    for name in (GELU, NORM):
        values = np.concatenate([session.run([name], feed)[0] for feed in source.batches(16)])
        values = values.reshape(-1, values.shape[-1])
        profile = profiles[name]
        np.testing.assert_allclose(profile.low, values.min(axis=0), rtol=1e-6)
        np.testing.assert_allclose(profile.high, values.max(axis=0), rtol=1e-6)
        np.testing.assert_allclose(profile.absmax, np.abs(values).max(axis=0), rtol=1e-6)
        assert profile.rows.shape == (100, values.shape[1])
        nearest = np.abs(profile.rows[:, None, :] - values[None, :, :]).max(axis=2).min(axis=1)
        assert nearest.max() <= 1e-5 * np.abs(values).max()  # rows of the data (to rounding), not made up


def test_alpha_is_measured_per_layer_and_explicit_muls_must_pay_for_themselves() -> None:
    model, source = _encoder()
    _, sites, profiles = _profiles(model, source)
    gelu = choose_alpha(sites[GELU], profiles[GELU], INT8_SYMMETRIC)
    assert gelu.explicit and gelu.alpha is not None and gelu.error < 0.05 * gelu.unsmoothed_error, gelu
    assert "through an explicit Mul" in gelu.reason and "tried 0.3:" in gelu.reason
    norm = choose_alpha(sites[NORM], profiles[NORM], UINT8_ASYMMETRIC)
    assert not norm.explicit and norm.alpha is not None and norm.error < 0.05 * norm.unsmoothed_error, norm
    attention = choose_alpha(sites[ATTENTION_OUT], profiles[ATTENTION_OUT], INT8_SYMMETRIC)
    assert attention.alpha is None and attention.unsmoothed_error < EXPLICIT_MIN_ERROR, attention
    assert "worth its run time" in attention.reason
    few = type(profiles[GELU])(profiles[GELU].low, profiles[GELU].high, profiles[GELU].rows[:MIN_ROWS - 1])
    assert choose_alpha(sites[GELU], few, INT8_SYMMETRIC).alpha is None


def test_lite0_classifier_input_is_left_alone() -> None:
    """Measured on held-out rows the classifier input of EfficientNet-Lite0 does not need an explicit Mul (in
    sample, its error fell 60 % with alpha 0.7, and the output cosine on new photos fell 0.959 -> 0.946)."""
    model = onnxq.load_model(MODELS / "efficientnet_lite0.onnx")
    source = onnxq.open_source(MODELS / "data" / "photos" / "calib", onnxq.input_specs(model),
                               onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3))
    result = onnxq.quantize(model, source, onnxq.QuantConfig(bias_correction=False))
    found = result.finding(Smoothed)
    assert isinstance(found, Smoothed) and found.tensors == () and len(found.choices) == 1
    assert found.choices[0].alpha is None and found.choices[0].tensor == "/Reshape_output_0"
    assert not [n for n in result.model.graph.node if "smoothquant" in n.name]


def test_on_by_default_measured_and_reported() -> None:
    model, source = _encoder()
    result = onnxq.quantize(model, source)
    found = result.finding(Smoothed)
    assert isinstance(found, Smoothed) and found.alpha is None
    assert sorted(found.explicit) == ["layer1/ffn/gelu/mul_half_output_0", "layer2/ffn/gelu/mul_half_output_0"]
    assert len(found.tensors) == 6 and len(found.choices) == 8 and found.seconds > 0
    assert sorted(name for name, _ in found.left_alone) == [ATTENTION_OUT, "layer2/attn/merge_reshape_output_0"]
    assert found.describe().startswith("alpha measured per layer: 6 of 8 linear-layer inputs smoothed (2 through")
    divides = [n for n in result.model.graph.node if n.name.endswith("smoothquant_divide")]
    assert len(divides) == 2
    off = onnxq.quantize(model, source, onnxq.QuantConfig(smoothquant=False))
    assert off.finding(Smoothed) is None
    held_out = [models.random_feeds(model, batch=16, seed=9)]
    (smoothed,), (plain,) = (onnxq.compare_models(model, r.model, held_out) for r in (result, off))
    assert smoothed.sqnr_db > plain.sqnr_db + 10.0, (smoothed, plain)


def test_statistics_files_skip_it_by_default_and_refuse_it_when_asked(tmp_path) -> None:
    model, source = _encoder()
    stats, _ = onnxq.collect_stats(model, source)
    result = onnxq.quantize(model, stats=stats, config=onnxq.QuantConfig(bias_correction=False))
    skipped = [f for f in result.findings if isinstance(f, onnxq.StepSkipped) and f.step == "SmoothQuant"]
    assert len(skipped) == 1 and "statistics file" in skipped[0].reason
    for asked in (True, 0.5):
        with pytest.raises(ConfigError, match="--smoothquant needs --calib"):
            onnxq.quantize(model, stats=stats, config=onnxq.QuantConfig(smoothquant=asked, bias_correction=False))
    with pytest.raises(ConfigError, match="alpha"):
        onnxq.QuantConfig(smoothquant=1.5)
