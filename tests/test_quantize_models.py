"""End to end on every model: quantize, check TensorRT placement in the written model, compare numerics.

Numerics compare the INT8 Q/DQ model with the float model in ONNX Runtime on held-out inputs drawn
from the calibration distribution.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import models
from onnxq.pipeline import prepare, quantize
from onnxq.data.feeds import FeedsSource
from onnxq.config import QuantConfig
from onnxq.options import CalibConfig
from onnxq.io import from_graph
from onnxq.metrics import compare_models
from tests.support.qdq_checks import check_trt_qdq, float_weighted_with_constant_weight

# Random-weight synthetic models, 8-bit: the output must stay close to float.
MIN_COSINE = {"transformer_encoder": 0.98, "outlier_encoder": 0.8}  # outliers: see test_smoothquant.py
DEFAULT_MIN_COSINE = 0.99


def _quantize_and_check(model: onnx.ModelProto, calib: list, held_out: list, min_cosine: float) -> dict:
    result = quantize(model, FeedsSource(calib), QuantConfig(calib=CalibConfig(batch_size=4)))
    counts = check_trt_qdq(result.model)
    prepared = from_graph(prepare(model))
    assert counts["weighted_int8"] == len(float_weighted_with_constant_weight(prepared)), counts
    metrics = compare_models(model, result.model, FeedsSource(held_out).batches(4))
    for output in metrics:
        assert output.cosine >= min_cosine, output
    return counts


@pytest.mark.parametrize("name", sorted(models.BUILDERS))
def test_synthetic_model(name: str) -> None:
    model = models.BUILDERS[name]()
    calib = [models.random_feeds(model, batch=4, seed=s) for s in range(4)]
    held_out = [models.random_feeds(model, batch=4, seed=100 + s) for s in range(2)]
    counts = _quantize_and_check(model, calib, held_out, MIN_COSINE.get(name, DEFAULT_MIN_COSINE))
    assert counts.get("QuantizeLinear", 0) > 0


@pytest.mark.parametrize("path", models.light_model_paths(), ids=lambda p: p.stem)
def test_light_model(path) -> None:
    """The onnx package's real architectures (placeholder weights, IR 3, opset 9)."""
    model = onnx.load(str(path))
    calib = [models.random_feeds(model, batch=1, seed=s) for s in range(3)]
    held_out = [models.random_feeds(model, batch=1, seed=100)]
    result = quantize(model, FeedsSource(calib))
    counts = check_trt_qdq(result.model)
    assert counts["weighted_int8"] == len(float_weighted_with_constant_weight(from_graph(prepare(model))))
    assert result.model.opset_import[0].version >= 13
    metrics = compare_models(model, result.model, FeedsSource(held_out).batches(1))
    assert all(np.isfinite(m.cosine) for m in metrics)
    assert all(m.cosine > 0.9 for m in metrics), metrics
