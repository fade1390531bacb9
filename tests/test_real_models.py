"""The shipped real models, calibrated on real data and compared with their float originals in ORT.

Figures measured when these tests were written (for the thresholds' margins): EfficientNet-Lite0 on
all 192 evaluation photos, max calibration on the 64 calibration photos: top-1 agreement 0.80,
cosine 0.959; PP-OCR classifier on 200 text lines: agreement 0.99, label accuracy 0.99 (= float).
"""

from __future__ import annotations

import json

import numpy as np

from onnxq.pipeline import quantize
from onnxq.data.sources import input_specs, open_source
from onnxq.data.images import ImagePreprocess
from onnxq.runtime.session import open_session
from onnxq.io import load_model
from onnxq.metrics import compare_models
from tests.support.paths import MODELS
from tests.support.qdq_checks import check_trt_qdq

PHOTOS = MODELS / "data" / "photos"
TEXTLINES = MODELS / "data" / "textlines"
LITE0_PREPROCESS = ImagePreprocess(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


def test_efficientnet_lite0_on_real_photos() -> None:
    model = load_model(MODELS / "efficientnet_lite0.onnx")
    result = quantize(model, PHOTOS / "calib", preprocess=LITE0_PREPROCESS)
    counts = check_trt_qdq(result.model)
    assert counts["weighted_int8"] == 50  # 49 Conv + the classifier Gemm
    assert result.calibration.samples == 64
    held_out = open_source(PHOTOS / "eval", input_specs(model), LITE0_PREPROCESS)
    (logits,) = compare_models(model, result.model, held_out.batches(32))
    assert logits.samples == 192
    assert logits.top1_agreement is not None and logits.top1_agreement >= 0.75, logits
    assert logits.cosine >= 0.94, logits
    assert result.model.metadata_props == model.metadata_props
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]


def _label_accuracy(model, x: np.ndarray, labels: np.ndarray) -> float:
    with open_session(model) as session:
        (scores,) = session.run({"x": x}).values()
    return float(np.mean(scores.argmax(axis=1) == labels))


def test_ppocr_classifier_with_constant_node_weights_at_opset_11() -> None:
    model = load_model(MODELS / "ppocr_mobile_v2_cls.onnx")
    assert model.opset_import[0].version == 11
    result = quantize(model, TEXTLINES / "ppocr_cls_calib.npz")
    counts = check_trt_qdq(result.model)
    assert counts["weighted_int8"] == 54 and counts.get("BatchNormalization", 0) == 0
    assert result.model.opset_import[0].version >= 13
    held_out = np.load(TEXTLINES / "ppocr_cls_eval.npz")["x"]
    labels = np.asarray(json.loads((TEXTLINES / "ppocr_cls_eval_labels.json").read_text())["label"])
    (scores,) = compare_models(model, result.model, [{"x": held_out}])
    assert scores.top1_agreement is not None and scores.top1_agreement >= 0.97, scores
    assert _label_accuracy(result.model, held_out, labels) >= _label_accuracy(model, held_out, labels) - 0.02
