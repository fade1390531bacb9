"""Shared machinery for the synthetic test models: a small graph builder and layer helpers.

Every builder in this package creates a `GraphBuilder`, appends layers to it with the helpers below and
calls `GraphBuilder.build()`. Weights come from the builder's `np.random.default_rng(seed)` and are
drawn in graph order, so the same seed always gives byte-identical models.

Naming scheme (the quantizer's tests assert on these names):

* nodes are scoped with "/": ``stem/conv``, ``block1/bn2``, ``layer1/attn/softmax``;
* a parameter is ``<node name>.<role>``: ``block1/conv2.weight``, ``block1/bn2.var``; a constant shared
  by several nodes is named after its scope and meaning: ``relu6.min``, ``attn.scale``;
* a node's output is ``<node name>_output_<i>`` unless it is a graph output (``logits``, ...);
* in constant-node mode (`constant_nodes=True`) each parameter is produced by a Constant node named
  ``const/<parameter name>`` instead of being an initializer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "BATCH_DIM",
    "DEFAULT_OPSET",
    "GraphBuilder",
    "batch_norm",
    "clip",
    "conv",
    "conv_transpose",
    "flatten_gemm_head",
    "gemm",
    "matmul_add",
    "int64s",
    "relu",
    "scalar",
    "silu",
]

DEFAULT_OPSET = 17
BATCH_DIM = "N"
PRODUCER_NAME = "onnxq.models"

Shape = Sequence[int | str]


class GraphBuilder:
    """Collects nodes, parameters and graph inputs/outputs, then emits a `ModelProto`."""

    def __init__(
        self,
        graph_name: str,
        seed: int,
        *,
        opset: int = DEFAULT_OPSET,
        constant_nodes: bool = False,
    ) -> None:
        self.graph_name = graph_name
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.constant_nodes = constant_nodes
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[TensorProto] = []
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[onnx.ValueInfoProto] = []
        self._node_names: set[str] = set()
        self._tensor_names: set[str] = set()

    # -- graph interface -------------------------------------------------------------------------

    def add_input(self, name: str, shape: Shape, elem_type: int = TensorProto.FLOAT) -> str:
        """Declare a graph input and return its tensor name."""
        self._claim_tensor(name)
        self._inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, name: str, shape: Shape, elem_type: int = TensorProto.FLOAT) -> None:
        """Declare a graph output; a node must produce it via `add_node(..., output=name)`."""
        self._outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def add_constant(self, name: str, value: np.ndarray) -> str:
        """Add a parameter (initializer, or Constant node in constant-node mode); return its name."""
        self._claim_tensor(name)
        tensor = numpy_helper.from_array(np.array(value, order="C"), name=name)
        if self.constant_nodes:
            node_name = f"const/{name}"
            self._claim_node(node_name)
            self._nodes.append(helper.make_node("Constant", [], [name], name=node_name, value=tensor))
        else:
            self._initializers.append(tensor)
        return name

    def constant(self, name: str) -> np.ndarray:
        """The values of the initializer `name` (not available in constant-node mode)."""
        return numpy_helper.to_array(self._initializer(name))

    def set_constant(self, name: str, value: np.ndarray) -> None:
        """Replace the values of the initializer `name`, keeping its name."""
        self._initializer(name).CopyFrom(numpy_helper.from_array(np.array(value, order="C"), name=name))

    def _initializer(self, name: str) -> TensorProto:
        found = [tensor for tensor in self._initializers if tensor.name == name]
        if len(found) != 1:
            raise ValueError(f"no initializer {name!r} in {self.graph_name}")
        return found[0]

    def add_node(
        self, op_type: str, name: str, inputs: Sequence[str], *, output: str | None = None, **attrs
    ) -> str:
        """Append a single-output node and return its output tensor name."""
        return self.add_multi_output_node(
            op_type, name, inputs, [output or f"{name}_output_0"], **attrs
        )[0]

    def add_multi_output_node(
        self, op_type: str, name: str, inputs: Sequence[str], outputs: Sequence[str], **attrs
    ) -> list[str]:
        """Append a node with the given output names and return them."""
        self._claim_node(name)
        for tensor_name in outputs:
            self._claim_tensor(tensor_name)
        self._nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs))
        return list(outputs)

    def build(self, doc_string: str = "") -> onnx.ModelProto:
        """Assemble the model; IR version is the lowest one the opset allows (ORT rejects newer)."""
        graph = helper.make_graph(
            self._nodes, self.graph_name, self._inputs, self._outputs, self._initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            producer_name=PRODUCER_NAME,
            doc_string=inspect.cleandoc(doc_string),
        )
        model.ir_version = helper.find_min_ir_version_for(model.opset_import)
        return model

    # -- deterministic initialisation ------------------------------------------------------------

    def he_normal(self, shape: Sequence[int], fan_in: int) -> np.ndarray:
        """Kaiming/He normal weights, for layers followed by ReLU-like activations."""
        std = math.sqrt(2.0 / fan_in)
        return (self.rng.standard_normal(tuple(shape)) * std).astype(np.float32)

    def xavier_normal(self, shape: Sequence[int], fan_in: int, fan_out: int) -> np.ndarray:
        """Glorot/Xavier normal weights, for linear layers in attention and classifiers."""
        std = math.sqrt(2.0 / (fan_in + fan_out))
        return (self.rng.standard_normal(tuple(shape)) * std).astype(np.float32)

    def small_bias(self, size: int) -> np.ndarray:
        """Biases of magnitude 0.01..0.1 with random sign: small, but never zero."""
        magnitude = self.rng.uniform(0.01, 0.1, size)
        sign = self.rng.choice(np.array([-1.0, 1.0]), size)
        return (magnitude * sign).astype(np.float32)

    # -- bookkeeping -----------------------------------------------------------------------------

    def _claim_node(self, name: str) -> None:
        if not name or name in self._node_names:
            raise ValueError(f"node name {name!r} is empty or already used in {self.graph_name}")
        self._node_names.add(name)

    def _claim_tensor(self, name: str) -> None:
        if not name or name in self._tensor_names:
            raise ValueError(f"tensor name {name!r} is empty or already used in {self.graph_name}")
        self._tensor_names.add(name)


def scalar(value: float) -> np.ndarray:
    """A float32 0-d array (Clip bounds, Div denominators, ...)."""
    return np.array(value, dtype=np.float32)


def int64s(values: Sequence[int]) -> np.ndarray:
    """A 1-d int64 array (shapes, axes, split sizes)."""
    return np.array(list(values), dtype=np.int64)


# -- layers: each appends nodes named under `name` and returns the output tensor name -------------


def _parameters(b: GraphBuilder, name: str, weight: np.ndarray, bias_size: int) -> list[str]:
    """Add ``{name}.weight`` and, if `bias_size` > 0, a small ``{name}.bias``; return their names."""
    names = [b.add_constant(f"{name}.weight", weight)]
    if bias_size:
        names.append(b.add_constant(f"{name}.bias", b.small_bias(bias_size)))
    return names


def conv(
    b: GraphBuilder,
    name: str,
    x: str,
    c_in: int,
    c_out: int,
    kernel: int,
    *,
    stride: int = 1,
    pad: int | None = None,
    group: int = 1,
    bias: bool = True,
    output: str | None = None,
) -> str:
    """Conv2d with square kernel; `pad` defaults to "same" for odd kernels at stride 1."""
    pad = kernel // 2 if pad is None else pad
    fan_in = c_in // group * kernel * kernel
    weight = b.he_normal((c_out, c_in // group, kernel, kernel), fan_in)
    inputs = [x, *_parameters(b, name, weight, c_out if bias else 0)]
    return b.add_node(
        "Conv", name, inputs, output=output,
        kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4, group=group,
    )


def conv_transpose(
    b: GraphBuilder,
    name: str,
    x: str,
    c_in: int,
    c_out: int,
    kernel: int,
    *,
    stride: int,
    pad: int = 0,
    group: int = 1,
    output: str | None = None,
) -> str:
    """ConvTranspose2d with bias; weight layout [C_in, C_out / group, kH, kW]."""
    fan_in = max(1, c_in // group * kernel * kernel // (stride * stride))
    weight = b.he_normal((c_in, c_out // group, kernel, kernel), fan_in)
    inputs = [x, *_parameters(b, name, weight, c_out)]
    return b.add_node(
        "ConvTranspose", name, inputs, output=output,
        kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4, group=group,
    )


def batch_norm(b: GraphBuilder, name: str, x: str, channels: int, *, output: str | None = None) -> str:
    """Inference-mode BatchNormalization with plausible trained statistics (var > 0)."""
    rng = b.rng
    params = {
        "scale": rng.uniform(0.5, 1.5, channels),
        "bias": rng.normal(0.0, 0.1, channels),
        "mean": rng.normal(0.0, 0.2, channels),
        "var": rng.uniform(0.5, 2.0, channels),
    }
    inputs = [x]
    for role, values in params.items():
        inputs.append(b.add_constant(f"{name}.{role}", values.astype(np.float32)))
    return b.add_node("BatchNormalization", name, inputs, output=output, epsilon=1e-5)


def relu(b: GraphBuilder, name: str, x: str, *, output: str | None = None) -> str:
    """A single Relu node."""
    return b.add_node("Relu", name, [x], output=output)


def clip(b: GraphBuilder, name: str, x: str, low: str, high: str) -> str:
    """Clip with bounds given as tensor inputs (opset >= 11 style)."""
    return b.add_node("Clip", name, [x, low, high])


def silu(b: GraphBuilder, scope: str, x: str) -> str:
    """SiLU as exported by YOLO: ``{scope}/sigmoid`` then ``{scope}/mul`` = x * sigmoid(x)."""
    gate = b.add_node("Sigmoid", f"{scope}/sigmoid", [x])
    return b.add_node("Mul", f"{scope}/mul", [x, gate])


def gemm(
    b: GraphBuilder,
    name: str,
    x: str,
    in_features: int,
    out_features: int,
    *,
    trans_b: int,
    he: bool = True,
    output: str | None = None,
) -> str:
    """Gemm with bias; weight is [out, in] for transB=1 and [in, out] for transB=0."""
    shape = (out_features, in_features) if trans_b else (in_features, out_features)
    if he:
        weight = b.he_normal(shape, in_features)
    else:
        weight = b.xavier_normal(shape, in_features, out_features)
    inputs = [x, *_parameters(b, name, weight, out_features)]
    return b.add_node("Gemm", name, inputs, output=output, transB=trans_b)


def matmul_add(
    b: GraphBuilder,
    scope: str,
    x: str,
    in_features: int,
    out_features: int,
    *,
    output: str | None = None,
) -> str:
    """Linear layer as transformers export it: ``{scope}/matmul`` by [in, out], ``{scope}/add`` bias."""
    weight = b.xavier_normal((in_features, out_features), in_features, out_features)
    product = b.add_node("MatMul", f"{scope}/matmul", [x, b.add_constant(f"{scope}.weight", weight)])
    bias = b.add_constant(f"{scope}.bias", b.small_bias(out_features))
    return b.add_node("Add", f"{scope}/add", [product, bias], output=output)


def flatten_gemm_head(
    b: GraphBuilder, x: str, features: int, classes: int, *, output: str = "logits"
) -> str:
    """``head/flatten`` then ``head/fc`` (Gemm transB=1) to `classes` logits."""
    flat = b.add_node("Flatten", "head/flatten", [x], axis=1)
    return gemm(b, "head/fc", flat, features, classes, trans_b=1, he=False, output=output)
