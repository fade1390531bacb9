"""Quantization schemes and scales.

Activations follow a target's `ActivationScheme`: symmetric INT8 (TensorRT: `s = amax / 127`, zero point
0, `q = clamp(rne(x / s), -128, 127)`) or asymmetric uint8 (ONNX Runtime's CPU kernels: the range
[low, high] over 255 steps with a zero point). Weights are always symmetric INT8 per channel.

Source: ONNX QuantizeLinear (round half to even, saturate to [-128, 127]); TensorRT IQuantizeLayer
(symmetric only, every scale strictly positive). Per-channel weight amax is the max of |W| over
every axis but the output-channel axis.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from onnxq.errors import CalibrationError

__all__ = [
    "AMAX_FLOOR", "ActivationParams", "ActivationScheme", "INT8_SYMMETRIC", "UINT8_ASYMMETRIC", "activation_scale", "symmetric_int8", "asymmetric_uint8", "weight_amax",
    "weight_scales", "quantize_weight", "quantize_bias",
]

# A dead tensor (amax 0) still needs a positive scale; 2^-24 * 127 keeps s = 2^-24, far from denormals.
AMAX_FLOOR = float(np.float32(2.0**-24 * 127))


def activation_scale(tensor_name: str, amax: float) -> np.float32:
    """The per-tensor scale of an activation, refusing NaN/Inf ranges."""
    if not np.isfinite(amax):
        raise CalibrationError(
            f"tensor '{tensor_name}': calibrated range is {amax}; the data drives it to NaN/Inf. "
            "Hint: exclude the node that reads it (--exclude-nodes) or check the calibration data")
    return np.float32(max(float(amax), AMAX_FLOOR)) / np.float32(127)


@dataclass(frozen=True)
class ActivationParams:
    """Per-tensor quantization parameters: float32 scale and a scalar zero point (int8 or uint8)."""

    scale: np.float32
    zero_point: np.ndarray


def symmetric_int8(tensor_name: str, amax: float) -> ActivationParams:
    """TensorRT's scheme: s = amax / 127, zero point int8 0."""
    return ActivationParams(activation_scale(tensor_name, amax), np.zeros((), np.int8))


def asymmetric_uint8(tensor_name: str, low: float, high: float) -> ActivationParams:
    """uint8 affine quantization of [low, high] (widened to hold 0): s = (high - low) / 255,
    zero point = round(-low / s) in [0, 255], so 0 is exact (Jacob et al., "Quantization and Training
    of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, eq. 1-2)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        raise CalibrationError(f"tensor '{tensor_name}': calibrated range [{low}, {high}] is not finite")
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    span = max(high - low, 2 * AMAX_FLOOR)
    scale = np.float32(span / 255.0)
    zero_point = np.clip(np.rint(-low / float(scale)), 0, 255).astype(np.uint8)
    return ActivationParams(scale, np.asarray(zero_point, dtype=np.uint8))


def quantize_bias(values: np.ndarray, input_scale: np.float32, weight_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """INT32 bias and its per-channel scale s_input * s_weight[c]: b_q = rne(b / scale)."""
    scale = (np.float32(input_scale) * weight_scales.astype(np.float32)).astype(np.float32)
    quantized = np.clip(np.rint(values.astype(np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
    return quantized, scale


def weight_amax(values: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel max |W| along `axis` (float64)."""
    reduce_axes = tuple(i for i in range(values.ndim) if i != axis)
    return np.abs(values.astype(np.float64)).max(axis=reduce_axes)


def weight_scales(values: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel float32 scales for a weight, each strictly positive."""
    return (np.maximum(weight_amax(values, axis), AMAX_FLOOR) / 127).astype(np.float32)


def quantize_weight(values: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """INT8 weights: clamp(rne(W / s), -128, 127) with s broadcast along `axis`."""
    shape = [1] * values.ndim
    shape[axis] = -1
    scaled = values.astype(np.float32) / scales.reshape(shape)
    return np.clip(np.rint(scaled), -128, 127).astype(np.int8)


@dataclass(frozen=True)
class ActivationScheme:
    """How a target quantizes activations; every range method and `insert_qdq` follow it.

    Attributes:
        name: for messages and reports, e.g. "int8 symmetric".
        symmetric: True: int8, s = amax / 127, zero point 0. False: uint8 over [low, high] clipped to
            +-amax, s = (high - low) / 255, zero point from the range (`asymmetric_uint8`).
    """

    name: str
    symmetric: bool

    def levels(self, low: float, high: float) -> int:
        """Quantization steps between 0 and amax on |x|: the grid the MSE and entropy searches fit.

        Symmetric INT8: 127. Asymmetric uint8: 255 for a one-signed range (a ReLU output: all 255 steps
        lie on one side of 0); 127 when both signs occur (255 steps over about [-amax, amax], 127.5 a
        side, rounded down to the integer grid that is not finer than the real one).
        """
        if self.symmetric or (low < 0.0 < high):
            return 127
        return 255

    def params(self, tensor_name: str, low: float, high: float, amax: float) -> ActivationParams:
        """The scale and zero point for a tensor seen over [low, high] whose chosen range is +-amax."""
        if self.symmetric:
            return symmetric_int8(tensor_name, amax)
        return asymmetric_uint8(tensor_name, max(low, -amax), min(high, amax))


#: TensorRT's explicit quantization: signed INT8, zero point 0.
INT8_SYMMETRIC = ActivationScheme("int8 symmetric", symmetric=True)
#: ONNX Runtime's x86 integer kernels (u8s8): uint8 activations with a zero point.
UINT8_ASYMMETRIC = ActivationScheme("uint8 asymmetric", symmetric=False)
