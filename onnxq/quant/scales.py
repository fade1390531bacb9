"""INT8 symmetric scales: `s = amax / 127`, zero point 0, `q = clamp(rne(x / s), -128, 127)`.

Source: ONNX QuantizeLinear (round half to even, saturate to [-128, 127]); TensorRT IQuantizeLayer
(symmetric only, every scale strictly positive). Per-channel weight amax is the max of |W| over
every axis but the output-channel axis.
"""

from __future__ import annotations

import numpy as np

from ..errors import CalibrationError

__all__ = ["AMAX_FLOOR", "activation_scale", "weight_amax", "weight_scales", "quantize_weight"]

# A dead tensor (amax 0) still needs a positive scale; 2^-24 * 127 keeps s = 2^-24, far from denormals.
AMAX_FLOOR = float(np.float32(2.0**-24 * 127))


def activation_scale(tensor_name: str, amax: float) -> np.float32:
    """The per-tensor scale of an activation, refusing NaN/Inf ranges."""
    if not np.isfinite(amax):
        raise CalibrationError(
            f"tensor '{tensor_name}': calibrated range is {amax}; the data drives it to NaN/Inf. "
            "Hint: exclude the node that reads it (--exclude-nodes) or check the calibration data")
    return np.float32(max(float(amax), AMAX_FLOOR)) / np.float32(127)


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
