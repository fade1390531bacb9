"""fold_bias_add: a per-channel constant Add after a Conv becomes the Conv's bias."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.runtime.session import open_session
from onnxq.passes import fold_bias_add
from tests.support.paths import MODELS



def _conv_add(constant_shape: tuple[int, ...], with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=constant_shape).astype(np.float32), "c")]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"))
        conv_inputs.append("b")
    graph = helper.make_graph(
        [helper.make_node("Conv", conv_inputs, ["t"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["t", "c"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    with open_session(model) as session:
        return next(iter(session.run({"x": x}).values()))


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (4, 1, 1), (1,)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_per_channel_add_becomes_the_bias(shape: tuple[int, ...], with_bias: bool) -> None:
    model = _conv_add(shape, with_bias)
    folded = onnxq.from_graph(fold_bias_add(onnxq.to_graph(model)), model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.output[0].name == "y"
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_spatially_varying_constant_is_left_alone() -> None:
    model = _conv_add((1, 4, 6, 6), with_bias=True)
    result = onnxq.from_graph(fold_bias_add(onnxq.to_graph(model)), model)
    assert [n.op_type for n in result.graph.node] == ["Conv", "Add"]


def test_ppocr_separate_bias_adds_fold() -> None:
    model = onnxq.load_model(MODELS / "ppocr_mobile_v2_cls.onnx")
    prepared = onnxq.prepare(model)
    # Of the 44 Adds, 18 are PaddlePaddle's separate Conv biases (SE blocks and the head), folded here;
    # 18 are the "+ 3" of hard-swish chains (fuse_hardswish); 8 remain (residual and SE-scale Adds).
    assert sum(n.op_type == "Add" for n in model.graph.node) == 44
    assert sum(n.op == "Add" for n in prepared.nodes) == 8
    assert sum(n.op == "Conv" and len(n.inputs) == 3 for n in prepared.nodes) == 53
    x = np.load(MODELS / "data" / "textlines" / "ppocr_cls_calib.npz")["x"][:4]
    with open_session(model) as a, open_session(onnxq.from_graph(prepared, model)) as b:
        (expected,), (actual,) = a.run({"x": x}).values(), b.run({"x": x}).values()
    np.testing.assert_allclose(actual, expected, atol=1e-5)
