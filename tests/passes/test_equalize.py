"""Cross-layer equalization: float outputs unchanged, ranges balanced, non-homogeneous pairs left alone.

Float checks run the prepared graph and the equalized graph in ONNX Runtime on the same inputs and require
max |difference| <= 1e-5 * max |output|.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from onnxq.io import check_model, from_graph, load_model
from onnxq.passes.equalize import (EqualizationPair, channel_ranges, equalization_plan, equalization_scales,
                                   equalize)
from onnxq.pipeline import prepare
from tests.support.paths import MODELS
from tests.support.runtime import run_model

RELATIVE_TOLERANCE = 1e-5
LITE0 = MODELS / "efficientnet_lite0.onnx"
PPOCR = MODELS / "ppocr_mobile_v2_cls.onnx"


def _text_lines() -> dict[str, np.ndarray]:
    """Eight real PP-OCR inputs (its batch axis is -1, which random_feeds cannot size)."""
    return {"x": np.load(MODELS / "data" / "textlines" / "ppocr_cls_eval.npz")["x"][:8]}


def _assert_same_float_outputs(model: onnx.ModelProto, before: gs.Graph, after: gs.Graph,
                               feed: dict[str, np.ndarray] | None = None) -> None:
    feed = feed if feed is not None else models.random_feeds(model, batch=2, seed=5)
    for ref, new in zip(run_model(from_graph(before, model), feed), run_model(from_graph(after, model), feed),
                        strict=True):
        assert ref.shape == new.shape
        np.testing.assert_allclose(new, ref, rtol=0, atol=RELATIVE_TOLERANCE * float(np.abs(ref).max()))


def _node(graph: gs.Graph, name: str) -> gs.Node:
    (node,) = [n for n in graph.nodes if n.name == name]
    return node


def _ranges(graph: gs.Graph, pair: EqualizationPair) -> tuple[np.ndarray, np.ndarray]:
    """(r1 of the producer's output channels, r2 of the readers' input channels) in `graph`."""
    def weight(name: str) -> tuple[np.ndarray, int]:
        node = _node(graph, name)
        return np.asarray(node.inputs[1].values), int(node.attrs.get("group", 1))
    r1 = channel_ranges(*weight(pair.producer))[0]
    return r1, np.max([channel_ranges(*weight(name))[1] for name in pair.consumers], axis=0)


def _constants(graph: gs.Graph) -> dict[str, np.ndarray]:
    return {n: np.array(t.values) for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}


# -- the shipped models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> tuple[onnx.ModelProto, gs.Graph]:
    model = load_model(LITE0)
    return model, prepare(model)


@pytest.fixture(scope="module")
def ppocr() -> tuple[onnx.ModelProto, gs.Graph]:
    model = load_model(PPOCR)
    return model, prepare(model)


def test_lite0_has_34_pairs_all_across_relu6_or_linear(lite0) -> None:
    """EfficientNet-Lite0 uses ReLU6 (Clip(0, 6)) everywhere: 32 pairs across it, 2 linear pairs (a project
    conv read by the next expand conv alone); by default none is equalized and the graph is unchanged."""
    model, graph = lite0
    plan = equalization_plan(graph)
    pairs = [p for p in plan.pairs if p.is_pair]
    assert len(pairs) == 34 and not plan.equalized
    across = [p for p in pairs if p.kind == "not homogeneous"]
    assert len(across) == 32
    assert all(len(p.between) == 1 and p.between[0].startswith("Clip ") and "[0, 6]" in p.reason for p in across)
    linear = [p for p in pairs if p.kind == "linear"]
    assert [p.producer for p in linear] == ["/_blocks.0/_project_conv/Conv", "/_blocks.15/_project_conv/Conv"]
    others = [p for p in plan.pairs if not p.is_pair]
    assert len(others) == 15 and all(p.kind == "not a pair" for p in others)
    assert any("Add" in p.reason for p in others)  # residual Adds
    assert _constants(equalize(graph)).keys() == _constants(graph).keys()


def test_lite0_linear_pairs_equalized_exactly_with_the_product_condition(lite0) -> None:
    """The two linear pairs share no Conv, so one step reaches the paper's optimum: r1' = r2' =
    sqrt(r1 * r2) per channel, the product unchanged; the float outputs are unchanged."""
    model, graph = lite0
    plan = equalization_plan(graph, linear_pairs=True)
    assert [p.producer for p in plan.equalized] == ["/_blocks.0/_project_conv/Conv", "/_blocks.15/_project_conv/Conv"]
    after = equalize(graph, linear_pairs=True)
    _assert_same_float_outputs(model, graph, after)
    for pair in plan.equalized:
        r1, r2 = _ranges(graph, pair)
        new_r1, new_r2 = _ranges(after, pair)
        np.testing.assert_allclose(new_r1, new_r2, rtol=1e-6)
        np.testing.assert_allclose(new_r1 * new_r2, r1 * r2, rtol=1e-6)
        np.testing.assert_allclose(new_r1, np.sqrt(r1 * r2), rtol=1e-6)
        assert pair.scale_max > 1.5  # it did move something


def test_ppocr_relu_pairs_equalized_and_hardswish_pairs_left_alone(ppocr) -> None:
    """The PP-OCR classifier (MobileNetV3): 24 Conv -> Conv pairs: 14 across Relu (equalized), 9 across
    HardSwish (not homogeneous), 1 linear; the squeeze-and-excitation gates make the rest no pairs."""
    model, graph = ppocr
    plan = equalization_plan(graph)
    pairs = [p for p in plan.pairs if p.is_pair]
    assert len(pairs) == 24 and plan.converged and 1 < plan.sweeps < 50
    assert len(plan.equalized) == 14
    assert all(p.between and all(b.startswith("Relu ") for b in p.between) for p in plan.equalized)
    hardswish = [p for p in pairs if p.kind == "not homogeneous"]
    assert len(hardswish) == 9
    assert all("HardSwish" in p.reason and "not positively homogeneous" in p.reason for p in hardswish)
    assert [p.kind for p in pairs].count("linear") == 1
    assert any("Mul" in p.reason for p in plan.pairs if not p.is_pair)  # squeeze-and-excitation gates
    after = equalize(graph)
    _assert_same_float_outputs(model, graph, after, _text_lines())
    left = {p.producer for p in plan.pairs if not p.equalized}
    consumers = {c for p in plan.equalized for c in p.consumers}
    for name in left - consumers:  # Convs no equalized pair touches keep their weights
        assert _node(after, name).inputs[1].name == _node(graph, name).inputs[1].name


def test_ppocr_ranges_balanced_after_convergence(ppocr) -> None:
    """At convergence every equalized pair meets the paper's condition r1_i = r2_i (the geometric mean of
    the two ranges), to within the tolerance of the last sweep."""
    _, graph = ppocr
    after = equalize(graph)
    for pair in equalization_plan(graph).equalized:
        r1, r2 = _ranges(after, pair)
        np.testing.assert_allclose(r1, r2, rtol=1e-3)


def test_caller_graph_untouched(ppocr) -> None:
    _, graph = ppocr
    before = _constants(graph)
    equalize(graph)
    after = _constants(graph)
    assert before.keys() == after.keys()
    for name, values in before.items():
        np.testing.assert_array_equal(after[name], values)


# -- the synthetic models ---------------------------------------------------------------------------------


def test_separable_relu_cnn_unbalanced_by_100x_is_balanced() -> None:
    """Depthwise channels unbalanced by 100x: after equalization every pair's ranges agree channel by
    channel and the spread across channels falls from ~100x to ~2x; the float outputs are unchanged."""
    model = models.BUILDERS["separable_relu_cnn"]()
    graph = prepare(model)
    plan = equalization_plan(graph)
    assert [p.producer for p in plan.equalized] == ["stem/conv", "block1/depthwise_conv", "block1/pointwise_conv",
                                                    "block2/depthwise_conv"]
    after = equalize(graph)
    _assert_same_float_outputs(model, graph, after)
    depthwise = next(p for p in plan.equalized if p.producer == "block1/depthwise_conv")
    r1, r2 = _ranges(graph, depthwise)
    assert r1.max() / r1.min() > 50 and r2.max() / r2.min() > 50
    for pair in plan.equalized:
        new_r1, new_r2 = _ranges(after, pair)
        np.testing.assert_allclose(new_r1, new_r2, rtol=1e-3)
        assert new_r1.max() / new_r1.min() < 3


def test_depthwise_cnn_relu6_pairs_left_alone_unless_bounded() -> None:
    """MobileNetV2-style ReLU6 block: expand -> depthwise -> project, two pairs across ReLU6 (the stem's
    output also feeds the residual Add). By default nothing moves; `bound_clips` equalizes across the Clips
    by turning each into Relu then Min by a per-channel bound, exactly."""
    model = models.BUILDERS["depthwise_cnn"]()
    graph = prepare(model)
    plan = equalization_plan(graph)
    assert not plan.equalized and [p.kind for p in plan.pairs if p.is_pair] == ["not homogeneous"] * 2
    bounded = equalize(graph, bound_clips=True)
    _assert_same_float_outputs(model, graph, bounded)
    ops = [n.op for n in bounded.nodes]
    assert ops.count("Clip") == 1 and ops.count("Min") == 2 and ops.count("Relu") == 2
    bound = _node(bounded, "block/depthwise_relu6/bound").inputs[1]
    assert np.asarray(bound.values).shape == (64, 1, 1)
    check_model(from_graph(bounded, model), "the equalized model")


def test_lite0_with_bounded_clips_keeps_float_outputs(lite0) -> None:
    model, graph = lite0
    plan = equalization_plan(graph, bound_clips=True)
    assert len(plan.equalized) == 32  # every ReLU6 pair (the linear ones stay off)
    after = equalize(graph, bound_clips=True)
    _assert_same_float_outputs(model, graph, after)
    check_model(from_graph(after, model), "the equalized model")


# -- small graphs: what passes, what stops it -------------------------------------------------------------


def _two_convs(between: list[onnx.NodeProto], *, consumer_group: int = 1, extra_output: str | None = None,
               constants: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """x [N,4,8,8] -> conv1 (8 out, unbalanced) -> `between` (from "h" to "a") -> conv2 (group) -> y."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 4, 3, 3)) * np.geomspace(0.05, 5.0, 8)[:, None, None, None]
    w2 = rng.normal(size=(8, 8 // consumer_group, 1, 1))
    weights = {"w1": w1, "b1": rng.normal(size=8), "w2": w2, **(constants or {})}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1] * 4), *between,
             helper.make_node("Conv", ["a" if between else "h", "w2"], ["y"], name="conv2", group=consumer_group)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    outputs += [helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None)] if extra_output else []
    graph = helper.make_graph(nodes, "cle_case", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              outputs, [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _chain(*ops: tuple[str, dict]) -> list[onnx.NodeProto]:
    names = ["h", *[f"t{i}" for i in range(len(ops) - 1)], "a"]
    return [helper.make_node(op, [names[i], *attrs.pop("inputs", [])], [names[i + 1]], name=f"act{i}", **attrs)
            for i, (op, attrs) in enumerate(ops)]


@pytest.mark.parametrize(("between", "group"), [
    (_chain(("Relu", {})), 1),
    (_chain(("LeakyRelu", {"alpha": 0.1})), 1),
    (_chain(("Relu", {}), ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]})), 2),
    (_chain(("AveragePool", {"kernel_shape": [3, 3], "pads": [1] * 4}), ("Relu", {})), 8),
    (_chain(("PRelu", {"inputs": ["slope"]})), 4),
    (_chain(("Clip", {"inputs": ["zero"]})), 1),  # Clip(x, 0) without an upper bound is a Relu
])
def test_homogeneous_chains_and_grouped_readers_are_equalized(between, group) -> None:
    constants = {"slope": np.full((8, 1, 1), 0.25), "zero": np.zeros(())}
    model = _two_convs(between, consumer_group=group, constants=constants)
    graph = prepare(model)
    (pair,) = [p for p in equalization_plan(graph).pairs if p.producer == "conv1"]
    assert pair.equalized and pair.consumers == ("conv2",), pair.reason
    after = equalize(graph)
    _assert_same_float_outputs(model, graph, after)
    r1, r2 = _ranges(after, pair)
    np.testing.assert_allclose(r1, r2, rtol=1e-6)


@pytest.mark.parametrize(("between", "constants", "kind", "words"), [
    (_chain(("HardSwish", {})), {}, "not homogeneous", "HardSwish 'act0' is not positively homogeneous"),
    (_chain(("Relu", {}), ("Sigmoid", {})), {}, "not homogeneous", "Sigmoid 'act1'"),
    (_chain(("Clip", {"inputs": ["low", "high"]})), {"low": np.float32(0), "high": np.float32(6)},
     "not homogeneous", "Clip cannot express"),
    (_chain(("Clip", {"inputs": ["low"]})), {"low": np.float32(-1)}, "not homogeneous", "lower bound of -1"),
    ([], {}, "linear", "linear pair"),
])
def test_non_homogeneous_or_linear_pairs_are_left_alone_with_a_reason(between, constants, kind, words) -> None:
    model = _two_convs(between, constants=constants)
    graph = prepare(model)
    (pair,) = [p for p in equalization_plan(graph).pairs if p.producer == "conv1"]
    assert not pair.equalized and pair.kind == kind and pair.consumers == ("conv2",)
    assert words in pair.reason
    after = equalize(graph)
    assert _node(after, "conv1").inputs[1].name == "w1" and _node(after, "conv2").inputs[1].name == "w2"


def test_outputs_read_by_more_than_convs_are_no_pairs() -> None:
    relu = _chain(("Relu", {}))
    as_output = equalization_plan(prepare(_two_convs(relu, extra_output="a"))).pairs[0]
    assert as_output.kind == "not a pair" and "graph output" in as_output.reason
    residual = [*relu, helper.make_node("Add", ["a", "a"], ["sum"], name="residual")]
    read = equalization_plan(prepare(_two_convs(residual, extra_output="sum"))).pairs[0]
    assert read.kind == "not a pair" and "Add 'residual'" in read.reason and not read.consumers


def test_weights_shared_with_another_conv_stay_as_they_are() -> None:
    """conv1's weight is also read by a third Conv: the pass writes new constants, the shared one is kept."""
    model = _two_convs(_chain(("Relu", {})))
    model.graph.node.append(helper.make_node("Conv", ["x", "w1", "b1"], ["z"], name="twin", pads=[1] * 4))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = prepare(model)
    after = equalize(graph)
    _assert_same_float_outputs(model, graph, after)
    assert _node(after, "twin").inputs[1].name == "w1" and _node(after, "conv1").inputs[1].name == "w1_equalized"
    np.testing.assert_array_equal(np.asarray(_node(after, "twin").inputs[1].values),
                                  np.asarray(graph.tensors()["w1"].values))


def test_equalization_scales_formula_and_degenerate_channels() -> None:
    r1, r2 = np.array([4.0, 1.0, 0.0, 2.0, np.inf]), np.array([1.0, 4.0, 3.0, 0.0, 1.0])
    scales = equalization_scales(r1, r2)
    np.testing.assert_allclose(scales, [2.0, 0.5, 1.0, 1.0, 1.0])
    np.testing.assert_allclose((r1 / scales)[:2], (r2 * scales)[:2])


def test_sweeps_limit_and_bad_options() -> None:
    graph = prepare(models.BUILDERS["separable_relu_cnn"]())
    one = equalization_plan(graph, sweeps=1)
    assert one.sweeps == 1 and not one.converged
    with pytest.raises(ValueError, match="sweeps"):
        equalization_plan(graph, sweeps=0)
    with pytest.raises(ValueError, match="tolerance"):
        equalize(graph, tolerance=0.0)
