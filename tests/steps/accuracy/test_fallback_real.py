"""Fallback on a shipped model and on the outlier encoder, against excluding a whole op type."""

from __future__ import annotations

import json

import numpy as np

import models
import onnxq
from tests.support.paths import MODELS

TEXTLINES = MODELS / "data" / "textlines"


def test_ppocr_fallback_meets_the_target_with_one_layer_instead_of_every_conv() -> None:
    """The real PP-OCR classifier, entropy calibration (cosine 0.998 fully INT8): cosine >= 0.999 on 32
    held-back text lines."""
    model = onnxq.load_model(MODELS / "ppocr_mobile_v2_cls.onnx")
    entropy = onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod.ENTROPY))
    result = onnxq.quantize(model, TEXTLINES / "ppocr_cls_calib.npz", entropy,
                            eval_source=TEXTLINES / "ppocr_cls_eval.npz",
                            accuracy=onnxq.AccuracyGoal(min_cosine=0.999, samples=32))
    assert result.fallback is not None and result.fallback.met
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    assert 0 < len(result.fallback.float_layers) < convs  # excluding the op type would leave all 53 float
    assert result.fallback.after[0].cosine >= 0.999 > result.fallback.before[0].cosine
    labels = np.asarray(json.loads((TEXTLINES / "ppocr_cls_eval_labels.json").read_text())["label"])
    held_out = np.load(TEXTLINES / "ppocr_cls_eval.npz")["x"]
    (scores,) = onnxq.compare_models(model, result.model, [{"x": held_out}])
    assert scores.top1_agreement >= 0.98 and labels.size == scores.samples


def test_outlier_encoder_fallback_and_smoothquant() -> None:
    model = models.BUILDERS["outlier_encoder"]()
    calib = onnxq.FeedsSource([models.random_feeds(model, batch=64, seed=1)])
    held_out = onnxq.FeedsSource([models.random_feeds(model, batch=64, seed=2)])
    target = onnxq.AccuracyGoal(min_cosine=0.99)
    plain = onnxq.QuantConfig(smoothquant=False)
    fallen = onnxq.quantize(model, calib, plain, eval_source=held_out, accuracy=target)
    matmuls = sum(node.op_type == "MatMul" for node in model.graph.node)
    assert fallen.fallback is not None and fallen.fallback.met
    assert 0 < len(fallen.fallback.float_layers) < matmuls
    smoothed = onnxq.quantize(model, calib, onnxq.QuantConfig(smoothquant=0.5), eval_source=held_out, accuracy=target)
    assert smoothed.fallback is not None and smoothed.fallback.met and not smoothed.fallback.float_layers
    assert smoothed.fallback.before[0].cosine > fallen.fallback.before[0].cosine + 0.1
    default = onnxq.quantize(model, calib, eval_source=held_out, accuracy=target)  # SmoothQuant, alpha measured
    assert default.fallback is not None and default.fallback.met and not default.fallback.float_layers
    assert default.fallback.before[0].cosine > fallen.fallback.before[0].cosine + 0.1
