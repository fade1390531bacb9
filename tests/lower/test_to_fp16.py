"""`to_fp16` (float16 everywhere but Q/DQ and kept ops) and the opset 19 bump it needs.

End to end: every model is quantized with `--high-precision fp16` and the written model is checked
(full ONNX checker, float32 interface, kept ops in float32, INT8 per-channel weights, float16
elsewhere) and run in ONNX Runtime against the float model. ORT's CPU provider runs float16 graphs
by wrapping the ops it has no float16 kernel for in Casts; its `WeightBiasQuantization` transformer
must be disabled, because it computes int32 biases from the product of two float16 scales, which
underflows (see `_run`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from onnxq.pipeline import prepare, quantize
from onnxq.data.feeds import FeedsSource
from onnxq.config import QuantConfig
from onnxq.options import HighPrecision
from onnxq.errors import ModelError
from onnxq.io import from_graph, to_graph
from onnxq.lower.to_fp16 import DEFAULT_KEEP_FP32, FP16_MIN_OPSET, to_fp16
from onnxq.passes.upgrade_opset import upgrade_graph_opset
from onnxq.passes.upgrade_opset import upgrade_opset
from tests.support.paths import MODELS
from tests.support.qdq_checks import WEIGHTED, ModelView, check_weight_dq
from tests.support.runtime import run_model

EFFICIENTNET = MODELS / "efficientnet_lite0.onnx"
SYNTHETIC = ["residual_cnn", "depthwise_cnn", "yolo_neck_head", "transformer_encoder", "gemm_mlp",
             "conv_transpose"]
MODEL_NAMES = [*SYNTHETIC, "efficientnet_lite0"]
MIN_COSINE = 0.98
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(str(EFFICIENTNET)) if name == "efficientnet_lite0" else models.BUILDERS[name]()


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_model(model, feeds, optimized=True, disabled_optimizers=["WeightBiasQuantization"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def quantized() -> dict[str, tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto]]:
    """name -> (float model, fp16 Q/DQ model, fp32 Q/DQ model), calibrated on the same feeds."""
    out = {}
    for name in MODEL_NAMES:
        model = _load(name)
        calib = [models.random_feeds(model, batch=2, seed=seed) for seed in range(2)]
        fp16 = quantize(model, FeedsSource(calib), QuantConfig(high_precision=HighPrecision.FP16)).model
        fp32 = quantize(model, FeedsSource(calib), QuantConfig()).model
        out[name] = (model, fp16, fp32)
    return out


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in infos}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fp16_model_structure(name: str, quantized) -> None:
    original, model, fp32_model = quantized[name]
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= FP16_MIN_OPSET
    io_types = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in (*m.graph.input, *m.graph.output)]
    assert io_types(model) == io_types(original)
    types, view = _value_types(model), ModelView(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in view.nodes:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    for init in model.graph.initializer:
        if init.data_type == F32:  # only kept ops, and Q nodes reading a float32 tensor, keep float32
            for node in consumers.get(init.name, []):
                assert node.op_type in DEFAULT_KEEP_FP32 or (
                    node.op_type == "QuantizeLinear" and types[node.input[0]] == F32), (init.name, node.name)
    for node in view.nodes:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert types[node.input[0]] == F32 and types[node.output[0]] == F32, node.name
    weighted = 0
    for node in view.nodes:
        dq = view.dq_feeding(node, 1) if node.op_type in WEIGHTED else None
        if dq is not None and dq.input[0] in view.inits:
            check_weight_dq(view, node, dq)
            assert view.inits[dq.input[1]].dtype == np.float16, dq.name
            assert types[node.output[0]] == F16, f"{node.name} does not run in float16"
            weighted += 1
    fp32_view = ModelView(fp32_model)
    assert weighted == sum(1 for n in fp32_view.nodes if n.op_type in WEIGHTED
                           and (dq := fp32_view.dq_feeding(n, 1)) is not None and dq.input[0] in fp32_view.inits)
    assert weighted > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fp16_model_numerics(name: str, quantized) -> None:
    original, model, _ = quantized[name]
    feeds = models.random_feeds(original, batch=2, seed=100)
    expected, actual = _run(original, feeds), _run(model, feeds)
    for want, got in zip(expected, actual):
        assert got.dtype == want.dtype and np.all(np.isfinite(got))
        assert _cosine(want, got) >= MIN_COSINE


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_opset_19_conversion_keeps_outputs(name: str) -> None:
    """The version converter's 17 -> 19 step leaves every op's semantics (ORT outputs) unchanged."""
    prepared = from_graph(prepare(_load(name)))
    upgraded = from_graph(upgrade_graph_opset(to_graph(prepared), FP16_MIN_OPSET))
    assert prepared.opset_import[0].version < FP16_MIN_OPSET <= upgraded.opset_import[0].version
    onnx.checker.check_model(upgraded, full_check=True)
    feeds = models.random_feeds(prepared, batch=1, seed=3)
    for want, got in zip(_run(prepared, feeds), _run(upgraded, feeds)):
        np.testing.assert_array_equal(want, got)


@pytest.mark.parametrize("path", [p for p in models.light_model_paths()
                                  if p.stem in ("light_squeezenet", "light_shufflenet", "light_inception_v1")],
                         ids=lambda p: p.stem)
def test_opset_19_conversion_of_light_models(path: Path) -> None:
    model = onnx.load(str(path))
    converted = upgrade_opset(model, FP16_MIN_OPSET)
    onnx.checker.check_model(converted, full_check=True)
    feeds = models.random_feeds(model, batch=1, seed=0)
    for want, got in zip(_run(model, feeds), _run(converted, feeds)):
        np.testing.assert_allclose(want, got, rtol=1e-5, atol=1e-6)


# --- small hand-built graphs ---------------------------------------------------------------------

def _graph(nodes, inputs, outputs, initializers=(), opset: int = FP16_MIN_OPSET) -> gs.Graph:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers])
    return to_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _export(graph: gs.Graph) -> tuple[onnx.ModelProto, dict[str, int], dict[str, np.ndarray]]:
    model = from_graph(graph)
    onnx.checker.check_model(model, full_check=True)
    return model, _value_types(model), {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _x(name: str = "x", shape=(1, 3, 4, 4), elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def test_overflowing_constants_are_clamped_with_a_warning(caplog) -> None:
    graph = _graph([helper.make_node("Mul", ["x", "big"], ["y"])], [_x()], [_x("y")],
                   [("big", np.array([1e6, -np.inf, 2.0], np.float32).reshape(1, 3, 1, 1))])
    with caplog.at_level(logging.WARNING, logger="onnxq.lower.to_fp16"):
        model, types, inits = _export(to_fp16(graph))
    assert inits["big"].dtype == np.float16
    assert inits["big"].ravel().tolist() == [65504.0, -65504.0, 2.0]
    assert "'big'" in caplog.text and "2 value(s)" in caplog.text
    assert types["x"] == F32 and types["y"] == F32  # interface unchanged, Casts inside
    assert [n.op_type for n in model.graph.node] == ["Cast", "Mul", "Cast"]


def test_schema_types_for_mixed_inputs() -> None:
    """Resize scales stay float (fixed type), Clip bounds and Pad's value follow the data to float16."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Clip", ["r", "lo", "hi"], ["c"]),
             helper.make_node("Pad", ["c", "pads", "value"], ["p"]),
             helper.make_node("Resize", ["p", "", "scales"], ["y"], mode="nearest")]
    graph = _graph(nodes, [_x()], [_x("y", (1, 3, 12, 12))],
                   [("lo", np.array(0, np.float32)), ("hi", np.array(6, np.float32)),
                    ("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), ("value", np.array(0.5, np.float32)),
                    ("scales", np.array([1, 1, 2, 2], np.float32))])
    model, types, inits = _export(to_fp16(graph, keep_fp32_ops=frozenset()))
    assert {n: inits[n].dtype for n in ("lo", "hi", "value", "scales", "pads")} == {
        "lo": np.float16, "hi": np.float16, "value": np.float16, "scales": np.float32, "pads": np.int64}
    assert types["p"] == F16 and types["y"] == F32
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)}
    want = _run(from_graph(graph), feeds)[0]
    np.testing.assert_allclose(_run(model, feeds)[0], want, atol=5e-3)


def test_kept_op_gets_float32_and_shape_math_stays_float32() -> None:
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=F32),
             helper.make_node("Mul", ["sf", "half"], ["sh"]),  # shape arithmetic: no activations
             helper.make_node("Cast", ["x"], ["xc"], to=F32),  # a no-op Cast on activations
             helper.make_node("Softmax", ["xc"], ["sm"], axis=-1),
             helper.make_node("Add", ["sm", "one"], ["y"])]
    graph = _graph(nodes, [_x(shape=(2, 8))], [_x("y", (2, 8)), _x("sh", (2,))],
                   [("half", np.array(0.5, np.float32)), ("one", np.array(1.0, np.float32))])
    model, types, inits = _export(to_fp16(graph))
    assert types["sf"] == F32 and types["sh"] == F32 and inits["half"].dtype == np.float32
    assert types["xc"] == F16, "a Cast(to=FLOAT) on activations becomes Cast(to=FLOAT16)"
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert types[softmax.input[0]] == F32 and types[softmax.output[0]] == F32
    assert inits["one"].dtype == np.float16 and types["y"] == F32


def test_output_also_read_inside_and_input_passed_through() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["n"])]
    graph = _graph(nodes, [_x()], [_x("r"), _x("n"), _x("x")])
    model, types, _ = _export(to_fp16(graph))
    assert [o.name for o in model.graph.output] == ["r", "n", "x"]
    assert all(types[name] == F32 for name in ("r", "n", "x"))
    neg = next(n for n in model.graph.node if n.op_type == "Neg")
    assert types[neg.input[0]] == F16, "inside the graph Neg reads the float16 tensor, not a Cast back"


def _qdq_softmax_matmul() -> gs.Graph:
    """Softmax -> Q -> DQ -> MatMul with a per-channel INT8 weight whose scale is tiny."""
    nodes = [helper.make_node("Softmax", ["x"], ["sm"], axis=-1),
             helper.make_node("QuantizeLinear", ["sm", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wdq"], axis=1),
             helper.make_node("MatMul", ["dq", "wdq"], ["y"])]
    weights = np.array([[100, -50], [20, 127]], np.int8)
    return _graph(nodes, [_x(shape=(2, 2))], [_x("y", (2, 2))],
                  [("s", np.array(1 / 127, np.float32)), ("z", np.array(0, np.int8)), ("w", weights),
                   ("ws", np.array([3.1e-7, 0.01], np.float32)), ("wz", np.zeros(2, np.int8))])


def test_qdq_scales_and_weight_requantization() -> None:
    graph = _qdq_softmax_matmul()
    model, types, inits = _export(to_fp16(graph))
    view = ModelView(model)
    q = next(n for n in view.nodes if n.op_type == "QuantizeLinear")
    dqs = [n for n in view.nodes if n.op_type == "DequantizeLinear"]
    assert types[q.input[0]] == F32 and inits[q.input[1]].dtype == np.float32, "Q follows its float32 input"
    activation_dq = next(n for n in dqs if n.input[0] == "q")
    assert inits[activation_dq.input[1]].dtype == np.float16
    assert inits[q.input[1]] == inits[activation_dq.input[1]].astype(np.float32), "Q and DQ scales agree"
    weight_dq = next(n for n in dqs if n.input[0] != "q")
    scale, int8 = inits[weight_dq.input[1]], inits[weight_dq.input[0]]
    assert scale.dtype == np.float16 and int8.dtype == np.int8 and np.all(scale > 0)
    original = np.array([[100, -50], [20, 127]]) * np.array([3.1e-7, 0.01])
    error = np.abs(int8 * scale.astype(np.float64) - original)
    assert np.all(error <= scale.astype(np.float64) / 2 * 1.001), "within half a step of the new grid"
    assert int8[0, 0] != 100, "the tiny channel was re-quantized to its rounded float16 scale"
    assert types["y"] == F32 and types[next(n for n in view.nodes if n.op_type == "MatMul").output[0]] == F16


def test_caller_graph_is_unchanged() -> None:
    graph = _qdq_softmax_matmul()
    before = from_graph(graph).SerializeToString()
    to_fp16(graph)
    assert from_graph(graph).SerializeToString() == before


def test_rejects_old_opset_and_control_flow() -> None:
    with pytest.raises(ModelError, match="opset 19"):
        to_fp16(_graph([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_x("y")], opset=17))
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "b", [], [_x("b")])
    cond = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = _graph([cond], [_x(), helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [_x("y")])
    with pytest.raises(ModelError, match="control flow"):
        to_fp16(graph)


def test_scales_round_up_and_never_reach_zero(caplog) -> None:
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wdq"], axis=0),
             helper.make_node("Conv", ["x", "wdq"], ["y"])]
    graph = _graph(nodes, [_x(shape=(1, 1, 4, 4))], [_x("y", (1, 3, 4, 4))],
                   [("w", np.array([0, 0, 1], np.int8).reshape(3, 1, 1, 1)),
                    ("ws", np.array([1e-9, 2.0**-24, 0.1], np.float32)), ("wz", np.zeros(3, np.int8))])
    with caplog.at_level(logging.WARNING, logger="onnxq.lower.to_fp16"):
        _, _, inits = _export(to_fp16(graph))
    scale = inits["ws"]
    assert scale.dtype == np.float16 and np.all(scale > 0)
    assert scale[1] == np.float16(2.0**-24) and scale[2].astype(np.float32) >= np.float32(0.1)
    assert "subnormal" not in caplog.text, "dead channels (scale 2^-24) are not reported"


def test_scale_beyond_float16_is_clamped_not_inf(caplog) -> None:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = _graph(nodes, [_x()], [_x("y")], [("s", np.array(1e6, np.float32)), ("z", np.array(0, np.int8))])
    with caplog.at_level(logging.WARNING, logger="onnxq.lower.to_fp16"):
        _, types, inits = _export(to_fp16(graph))
    assert types["x"] == F32 and types["y"] == F32
    assert all(np.isfinite(a).all() for a in inits.values())
    assert "'s'" in caplog.text and "overflow to inf" in caplog.text
