"""fold_pad: zero Pads merge into the Conv pads they feed, and nothing else changes."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.runtime.session import open_session
from onnxq.passes import fold_pad
from tests.support.paths import MODELS



def _pad_conv(pads: list[int], value: float = 0.0, consumer: str = "Conv") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.asarray(pads, np.int64), "pads"),
             numpy_helper.from_array(np.asarray(value, np.float32), "value"),
             numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    second = (helper.make_node("Conv", ["padded", "w"], ["y"], name="conv", pads=[1, 0, 1, 0])
              if consumer == "Conv" else helper.make_node("Relu", ["padded"], ["y"], name="relu"))
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads", "value"], ["padded"], name="pad"), second], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    with open_session(model) as session:
        return next(iter(session.run({"x": x}).values()))


def test_spatial_zero_pad_is_folded_with_identical_outputs() -> None:
    model = _pad_conv([0, 0, 1, 2, 0, 0, 3, 0])
    folded = onnxq.from_graph(fold_pad(onnxq.to_graph(model)), model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    pads = next(a for a in folded.graph.node[0].attribute if a.name == "pads").ints
    assert list(pads) == [2, 2, 4, 0]  # conv's [1, 0, 1, 0] + pad's spatial [1, 2, 3, 0]
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_outputs(folded, x), _outputs(model, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("pads", "value", "consumer"), [
    ([0, 0, 1, 1, 0, 0, 1, 1], 1.5, "Conv"),   # non-zero fill
    ([0, 1, 1, 1, 0, 0, 1, 1], 0.0, "Conv"),   # pads the channel axis
    ([0, 0, 1, 1, 0, 0, 1, 1], 0.0, "Relu"),   # not read by a Conv
])
def test_other_pads_are_left_alone(pads: list[int], value: float, consumer: str) -> None:
    model = _pad_conv(pads, value, consumer)
    result = onnxq.from_graph(fold_pad(onnxq.to_graph(model)), model)
    assert "Pad" in [n.op_type for n in result.graph.node]


def test_efficientnet_same_padding_disappears() -> None:
    model = onnxq.load_model(MODELS / "efficientnet_lite0.onnx")
    prepared = onnxq.prepare(model)
    assert not [n for n in prepared.nodes if n.op == "Pad"]
    x = np.random.default_rng(2).normal(size=(1, 3, 224, 224)).astype(np.float32)
    with open_session(model) as a, open_session(onnxq.from_graph(prepared, model)) as b:
        np.testing.assert_allclose(b.run({"input": x})["logits"], a.run({"input": x})["logits"], atol=1e-4)
