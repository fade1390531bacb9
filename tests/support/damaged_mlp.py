"""A small MLP with one layer that INT8 ruins, for the sensitivity and fallback tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.data.feeds import FeedsSource

__all__ = ["DAMAGED", "WIDTH", "damaged_mlp", "mlp_feeds"]

DAMAGED = "fc2/matmul"
WIDTH = 32


def damaged_mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N,16] -> 4 x (MatMul + Add, Relu between) -> y[N,8]; fc2's weight has a huge-outlier row.

    Hidden unit 0 after fc1 is always 0 (zero weights, bias -1, Relu), so fc2's weight row 0 never
    changes the float output; set to 1000, it makes every per-channel scale of fc2 1000/127 and
    rounds all its other weights to zero in INT8.
    """
    rng = np.random.default_rng(seed)
    sizes = [16, WIDTH, WIDTH, WIDTH, 8]
    nodes, inits, x = [], [], "x"
    for i in range(4):
        name = f"fc{i + 1}"
        weight = (rng.standard_normal((sizes[i], sizes[i + 1])) / np.sqrt(sizes[i])).astype(np.float32)
        bias = (0.1 * rng.standard_normal(sizes[i + 1])).astype(np.float32)
        if i == 0:
            weight[:, 0], bias[0] = 0.0, -1.0
        if i == 1:
            weight[0, :] = 1000.0
        inits += [numpy_helper.from_array(weight, f"{name}.weight"), numpy_helper.from_array(bias, f"{name}.bias")]
        out = "y" if i == 3 else f"{name}_out"
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}_mm"], name=f"{name}/matmul"))
        nodes.append(helper.make_node("Add", [f"{name}_mm", f"{name}.bias"], [out if i == 3 else f"{name}_add"],
                                      name=f"{name}/add"))
        if i < 3:
            nodes.append(helper.make_node("Relu", [f"{name}_add"], [out], name=f"{name}/relu"))
        x = out
    graph = helper.make_graph(nodes, "damaged_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def mlp_feeds(samples: int, seed: int) -> FeedsSource:
    x = np.random.default_rng(seed).standard_normal((samples, 16)).astype(np.float32)
    return FeedsSource([{"x": x}])
