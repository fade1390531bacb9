"""Models for onnxq's demo and tests: synthetic builders, random inputs, and onnx's "light" models.

`BUILDERS` maps a short name to a ``build_<name>(seed=0) -> onnx.ModelProto`` function (see
`models.builders`); `random_feeds` makes matching inputs for any model; `light_model_paths` lists the
nine real architectures with placeholder weights that the onnx package ships for its backend tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from models import builders
from models.builders_outliers import build_outlier_encoder

__all__ = ["BUILDERS", "DEFAULT_SYMBOLIC_DIM", "light_model_paths", "random_feeds"]

BUILDERS: Mapping[str, Callable[..., onnx.ModelProto]] = {
    "residual_cnn": builders.build_residual_cnn,
    "depthwise_cnn": builders.build_depthwise_cnn,
    "separable_relu_cnn": builders.build_separable_relu_cnn,
    "conv_transpose": builders.build_conv_transpose,
    "gemm_mlp": builders.build_gemm_mlp,
    "yolo_neck_head": builders.build_yolo_neck_head,
    "transformer_encoder": builders.build_transformer_encoder,
    "conv_bn_constant_weights": builders.build_conv_bn_constant_weights,
    "concat_branches": builders.build_concat_branches,
    "outlier_encoder": build_outlier_encoder,
}

DEFAULT_SYMBOLIC_DIM = 16
SMALL_INT_LIMIT = 8  # integer inputs are drawn from [0, SMALL_INT_LIMIT)
_FLOAT_TYPES = {
    TensorProto.FLOAT16,
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
}


def random_feeds(
    model: onnx.ModelProto,
    batch: int = 2,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input of `model` that is not an initializer.

    Shapes: fixed dims as declared; a symbolic (or unknown) dim takes ``dims[name]`` if given, else
    `batch` on axis 0 and `DEFAULT_SYMBOLIC_DIM` elsewhere. Values: standard normal for float
    inputs; for inputs whose name contains "mask", 0/1 rows that keep a prefix and pad the rest
    (each row keeps at least one position and, if longer than 1, pads at least one); small
    non-negative integers for integer inputs; random booleans for bool inputs.
    """
    rng = np.random.default_rng(seed)
    dims = dims or {}
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        if not value.type.HasField("tensor_type"):
            raise ValueError(f"input {value.name!r} is not a tensor; random_feeds cannot fill it")
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise ValueError(f"input {value.name!r} has unknown rank; random_feeds cannot shape it")
        shape = _concrete_shape(tensor_type.shape, batch, dims)
        feeds[value.name] = _random_tensor(rng, value.name, tensor_type.elem_type, shape)
    return feeds


def _concrete_shape(
    shape: onnx.TensorShapeProto, batch: int, dims: Mapping[str, int]
) -> tuple[int, ...]:
    concrete = []
    for axis, dim in enumerate(shape.dim):
        if dim.HasField("dim_value"):
            concrete.append(dim.dim_value)
        elif dim.HasField("dim_param") and dim.dim_param in dims:
            concrete.append(int(dims[dim.dim_param]))
        else:
            concrete.append(batch if axis == 0 else DEFAULT_SYMBOLIC_DIM)
    return tuple(concrete)


def _random_tensor(
    rng: np.random.Generator, name: str, elem_type: int, shape: tuple[int, ...]
) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if "mask" in name.lower():
        return _padding_mask(rng, shape).astype(dtype)
    if elem_type in _FLOAT_TYPES:
        return rng.standard_normal(shape).astype(dtype)
    if elem_type == TensorProto.BOOL:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, SMALL_INT_LIMIT, shape).astype(dtype)
    raise ValueError(f"input {name!r} has element type {elem_type}; random_feeds cannot fill it")


def _padding_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """1 for a kept prefix of the last axis, 0 for the padded rest, one length per row."""
    if len(shape) == 0:
        return np.ones(shape)
    length = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    mask = np.ones((rows, length))
    for row in range(rows):
        kept = int(rng.integers(1, length)) if length > 1 else 1
        mask[row, kept:] = 0
    return mask.reshape(shape)


def light_model_paths() -> list[Path]:
    """The ``onnx/backend/test/data/light/*.onnx`` models onnx ships (placeholder weights), sorted.

    They are real architectures (AlexNet, DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet,
    SqueezeNet, VGG-19, ZFNet-512). Returns [] when this onnx installation does not include them.
    """
    light_dir = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    if not light_dir.is_dir():
        return []
    return sorted(light_dir.glob("*.onnx"))
