"""Synthetic test models with known structure and deterministic weights: the public entry point.

Every ``build_<name>(seed=0)`` returns an `onnx.ModelProto` (opset 17 unless stated, lowest matching IR
version) that passes ``onnx.checker.check_model(model, full_check=True)`` and runs in ONNX Runtime.
The builders live in topic modules; this one gathers them. Each builder's docstring sketches its
topology, and `models.builders_common` describes how nodes, tensors and parameters are named.
"""

from __future__ import annotations

from models.builders_cnn import (
    build_concat_branches,
    build_conv_bn_constant_weights,
    build_conv_transpose,
    build_depthwise_cnn,
    build_residual_cnn,
    build_separable_relu_cnn,
)
from models.builders_mlp import build_gemm_mlp
from models.builders_transformer import build_transformer_encoder
from models.builders_yolo import build_yolo_neck_head

__all__ = [
    "build_concat_branches",
    "build_conv_bn_constant_weights",
    "build_conv_transpose",
    "build_depthwise_cnn",
    "build_gemm_mlp",
    "build_residual_cnn",
    "build_separable_relu_cnn",
    "build_transformer_encoder",
    "build_yolo_neck_head",
]
