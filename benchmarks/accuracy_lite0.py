"""EfficientNet-Lite0 accuracy, side by side in one run (run on demand, not a test).

Prints top-1 agreement with the float model and output cosine on the 192 evaluation photos for:
  - onnxq max calibration (TensorRT placement),
  - ONNX Runtime quantize_static with MinMax calibration (defaults, and int8-symmetric per-channel),
  - the float model itself under half a grey level of pixel noise and under a 1-pixel shift,
    which is how unstable the float model's top-1 is on these (non-ImageNet) photos.

    .venv/bin/python benchmarks/accuracy_lite0.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime import quantization as ortq

import onnxq

ROOT = Path(__file__).parents[1]
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
PHOTOS = ROOT / "models" / "data" / "photos"
PREPROCESS = onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)


def _images(folder: Path) -> np.ndarray:
    source = onnxq.open_source(folder, onnxq.input_specs(onnxq.load_model(MODEL)), PREPROCESS)
    return np.concatenate([feed["input"] for feed in source.batches(64)])


def _logits(model_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _row(label: str, reference: np.ndarray, logits: np.ndarray) -> None:
    agreement = np.mean(logits.argmax(1) == reference.argmax(1))
    cosine = float((reference * logits).sum() / np.linalg.norm(reference) / np.linalg.norm(logits))
    print(f"{label:58s} top-1 agreement {agreement:.3f}   cosine {cosine:.4f}")


class _Reader(ortq.CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.batches = iter([{"input": x[i:i + 8]} for i in range(0, len(x), 8)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def main() -> None:
    ort.set_default_logger_severity(3)
    calib, held_out = _images(PHOTOS / "calib"), _images(PHOTOS / "eval")
    reference = _logits(MODEL, held_out)
    with tempfile.TemporaryDirectory() as tmp:
        ours = Path(tmp) / "onnxq.onnx"
        onnxq.save_model(onnxq.quantize(MODEL, onnxq.FeedsSource([{"input": calib}])).model, ours)
        _row("onnxq, max calibration, TensorRT placement", reference, _logits(ours, held_out))
        for label, options in (
            ("ORT quantize_static MinMax, defaults (QDQ, u8 act, s8 weight)", {}),
            ("ORT quantize_static MinMax, s8 symmetric act, per-channel", {
                "per_channel": True, "activation_type": ortq.QuantType.QInt8,
                "weight_type": ortq.QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}}),
        ):
            theirs = Path(tmp) / "ort.onnx"
            ortq.quantize_static(str(MODEL), str(theirs), _Reader(calib), quant_format=ortq.QuantFormat.QDQ,
                                 calibrate_method=ortq.CalibrationMethod.MinMax, **options)
            _row(label, reference, _logits(theirs, held_out))
    noise = np.random.default_rng(0).normal(0.0, 0.5 / 128, held_out.shape).astype(np.float32)
    _row("float model, input + 0.5/255 pixel noise", reference, _logits(MODEL, held_out + noise))
    _row("float model, input shifted by one pixel", reference, _logits(MODEL, np.roll(held_out, 1, axis=3)))


if __name__ == "__main__":
    main()
