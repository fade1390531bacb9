"""fuse_hardswish: element-wise hard-sigmoid / hard-swish chains become HardSigmoid / HardSwish."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.runtime.session import open_session
from onnxq.passes import fuse_hardswish
from tests.support.paths import MODELS

X = np.linspace(-8, 8, 2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # covers both clip knees


def _model(nodes: list[onnx.NodeProto], opset: int, outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    constants = [numpy_helper.from_array(np.array(v, np.float32), name)
                 for name, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0), ("sixth", 1.0 / 6.0))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X.shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _gate(out: str, divide: bool = True) -> list[onnx.NodeProto]:
    """Clip(x + 3, 0, 6) / 6 (or * 1/6) into `out`."""
    last = (helper.make_node("Div", ["c", "six"], [out], name="div") if divide
            else helper.make_node("Mul", ["sixth", "c"], [out], name="mul_sixth"))
    return [helper.make_node("Add", ["x", "three"], ["a"], name="add"),
            helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"), last]


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    with open_session(model) as session:
        return list(session.run({"x": X}).values())


def _fused(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnxq.from_graph(fuse_hardswish(onnxq.to_graph(model)), model)


def _check(model: onnx.ModelProto, expected_ops: list[str], opset: int | None = None) -> onnx.ModelProto:
    fused = _fused(model)
    assert sorted(n.op_type for n in fused.graph.node) == sorted(expected_ops)
    if opset is not None:
        assert fused.opset_import[0].version == opset
    for got, want in zip(_run(fused), _run(model)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    return fused


@pytest.mark.parametrize("divide", [True, False])
def test_hard_sigmoid_chain_becomes_one_op_at_any_opset(divide: bool) -> None:
    fused = _check(_model(_gate("y", divide), 11), ["HardSigmoid"], opset=11)
    attrs = {a.name: a.f for a in fused.graph.node[0].attribute}
    assert attrs == pytest.approx({"alpha": 1 / 6, "beta": 0.5})


@pytest.mark.parametrize("order", ["x_first", "gate_first"])
def test_x_times_gate_becomes_hardswish(order: str) -> None:
    inputs = ["x", "g"] if order == "x_first" else ["g", "x"]
    _check(_model([*_gate("g"), helper.make_node("Mul", inputs, ["y"], name="mul")], 14), ["HardSwish"])


def test_mul_then_div_spelling_becomes_hardswish() -> None:
    """PaddlePaddle's export: x * Clip(x + 3, 0, 6), then / 6."""
    nodes = [helper.make_node("Add", ["x", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
             helper.make_node("Mul", ["x", "c"], ["m"], name="mul"),
             helper.make_node("Div", ["m", "six"], ["y"], name="div")]
    _check(_model(nodes, 14), ["HardSwish"])


def test_graph_below_opset_14_is_upgraded_for_hardswish() -> None:
    nodes = [*_gate("g"), helper.make_node("Mul", ["x", "g"], ["y"], name="mul")]
    _check(_model(nodes, 11), ["HardSwish"], opset=14)


def test_onnx_hardsigmoid_times_x_becomes_hardswish() -> None:
    nodes = [helper.make_node("HardSigmoid", ["x"], ["g"], name="hs", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["g", "x"], ["y"], name="mul")]
    _check(_model(nodes, 14), ["HardSwish"])


def test_hardsigmoid_with_other_constants_is_left_alone() -> None:
    nodes = [helper.make_node("HardSigmoid", ["x"], ["g"], name="hs", alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["g", "x"], ["y"], name="mul")]
    _check(_model(nodes, 14), ["HardSigmoid", "Mul"])


def test_chains_whose_intermediates_are_shared_or_outputs_stay() -> None:
    shared = [*_gate("g"), helper.make_node("Mul", ["x", "g"], ["y"], name="mul"),
              helper.make_node("Relu", ["c"], ["z"], name="also_reads_clip")]
    fused = _fused(_model(shared, 14, ("y", "z")))
    assert "Clip" in [n.op_type for n in fused.graph.node]  # the Clip output is read twice: no fusion
    exposed = [*_gate("g"), helper.make_node("Mul", ["x", "g"], ["y"], name="mul")]
    _check(_model(exposed, 14, ("y", "g")), ["HardSigmoid", "Mul"])  # the gate is a graph output


def test_wrong_constants_are_not_fused() -> None:
    nodes = [helper.make_node("Add", ["x", "six"], ["a"], name="add"),  # x + 6, not x + 3
             helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
             helper.make_node("Div", ["c", "six"], ["y"], name="div")]
    _check(_model(nodes, 14), ["Add", "Clip", "Div"])


def test_ppocr_classifier_hardswish_chains_fuse_and_outputs_match() -> None:
    model = onnxq.load_model(MODELS / "ppocr_mobile_v2_cls.onnx")
    graph = onnxq.prepare(model)  # fuse_hardswish is part of the prepare stage
    ops = [n.op for n in graph.nodes]
    assert ops.count("HardSwish") == 18 and ops.count("HardSigmoid") == 9 and "Clip" not in ops and "Div" not in ops
    assert graph.opset == 14
    x = np.load(MODELS / "data" / "textlines" / "ppocr_cls_eval.npz")["x"][:16]
    with open_session(model) as original, open_session(onnxq.from_graph(graph, model)) as prepared:
        want, got = original.run({"x": x}), prepared.run({"x": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
