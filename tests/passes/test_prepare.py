"""The prepare stage (upgrade_opset + PREPARE) on real models and on small hand-built graphs."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq import io
from onnxq.errors import ModelError
from onnxq.passes import PREPARE, constants_to_initializers, fold_constants, fuse_bn, run, upgrade_opset
from onnxq.passes.upgrade_opset import default_opset
from tests.support.paths import MODELS
from tests.support.runtime import run_model

LIGHT_MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
               "shufflenet", "squeezenet", "vgg19", "zfnet512"]
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, gs.Graph]:
    upgraded = upgrade_opset(model)
    graph = run(io.to_graph(upgraded), PREPARE)
    return io.from_graph(graph, upgraded), graph


def _op_counts(graph: onnx.GraphProto) -> Counter[str]:
    """Op types in `graph` and, recursively, in all its subgraphs."""
    counts: Counter[str] = Counter()
    for node in graph.node:
        counts[node.op_type] += 1
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                counts.update(_op_counts(attribute.g))
    return counts


def _weights_are_constants(graph: gs.Graph, ops: tuple[str, ...] = WEIGHT_OPS) -> list[bool]:
    return [isinstance(node.inputs[1], gs.Constant) for node in graph.nodes if node.op in ops]


# --- real models -------------------------------------------------------------------------------

def test_ppocr_cls_opset11_with_constant_weights_prepares_exactly() -> None:
    original = io.load_model(MODELS / "ppocr_mobile_v2_cls.onnx")
    assert default_opset(original) == 11
    prepared, graph = _prepare(original)
    io.check_model(prepared)
    assert default_opset(prepared) >= 13
    ops = _op_counts(prepared.graph)
    assert ops["Constant"] == 0 and ops["BatchNormalization"] == 0
    assert all(_weights_are_constants(graph, ("Conv",))) and ops["Conv"] == 53
    samples = np.load(MODELS / "data" / "textlines" / "ppocr_cls_calib.npz")["x"][:8]
    expected = run_model(original, {"x": samples}, optimized=True)[0]
    actual = run_model(prepared, {"x": samples}, optimized=True)[0]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_efficientnet_lite0_pad_chains_fold_to_constants() -> None:
    original = io.load_model(MODELS / "efficientnet_lite0.onnx")
    prepared, graph = _prepare(original)
    # The 17 "same"-padding chains fold to constant pads, which fold_pad then merges into the Convs.
    assert _op_counts(original.graph)["Pad"] == 17 and _op_counts(prepared.graph)["Pad"] == 0
    assert _op_counts(prepared.graph)["ConstantOfShape"] == 0
    assert all(_weights_are_constants(graph))
    images = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    expected = run_model(original, {"input": images}, optimized=True)[0]
    np.testing.assert_allclose(run_model(prepared, {"input": images}, optimized=True)[0], expected,
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize(("rate", "samples"), [(16000, 512), (8000, 256)])
def test_silero_vad_if_subgraphs_survive_prepare(rate: int, samples: int) -> None:
    original = io.load_model(MODELS / "silero_vad.onnx")
    assert [i.name for i in original.graph.input] == ["input", "state", "sr"]
    prepared, _ = _prepare(original)
    before, after = _op_counts(original.graph), _op_counts(prepared.graph)
    assert before["Constant"] > 300 and after["Constant"] == 0  # lowered inside the If branches
    assert after["Slice"] < before["Slice"]  # and subgraph shape arithmetic folded
    chunk = np.random.default_rng(1).uniform(-0.5, 0.5, (1, samples)).astype(np.float32)
    feeds = {"input": chunk, "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(rate, np.int64)}
    for expected, actual in zip(run_model(original, feeds, optimized=True), run_model(prepared, feeds, optimized=True),
                                strict=True):
        np.testing.assert_array_equal(actual, expected)


def _perturbed_placeholder_weights(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """`model` with each small placeholder weight `ConstantOfShape(0.02)` multiplied by random noise.

    The shipped weights are all 0.02, so every channel computes the same thing and the softmax is
    uniform to 1e-10: matching outputs would prove nothing. Each weight becomes
    `ConstantOfShape(shape) * noise` (noise an initializer), which keeps a constant chain for
    fold_constants to fold and gives every channel, BN statistic and logit its own value.
    BN scales and variances get noise in [0.5, 1.5]; conv/Gemm weights He-scaled Gaussians.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers = {name: (node.op_type, i) for node in model.graph.node for i, name in enumerate(node.input)}
    rng, nodes = np.random.default_rng(seed), []
    for node in model.graph.node:
        nodes.append(node)
        shape = tuple(int(d) for d in shapes.get(node.input[0], [])) if node.input else ()
        if node.op_type != "ConstantOfShape" or not shape or np.prod(shape) > 2**22:
            continue
        reader = readers[node.output[0]]
        if reader[0] in ("Conv", "Gemm") and reader[1] == 1:
            noise = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif reader[1] in (2, 3) and reader[0] in ("Conv", "Gemm", "BatchNormalization"):
            noise = rng.normal(0.0, 0.1, shape)
        else:
            noise = rng.uniform(0.5, 1.5, shape)
        weight = node.output[0]
        placeholder, noise_name = weight + "__placeholder", weight + "__noise"
        node.output[0] = placeholder
        tensor = numpy_helper.from_array((noise / 0.02).astype(np.float32), noise_name)
        model.graph.initializer.append(tensor)
        model.graph.input.append(helper.make_tensor_value_info(noise_name, TensorProto.FLOAT, shape))
        nodes.append(helper.make_node("Mul", [placeholder, noise_name], [weight]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("name", LIGHT_NAMES)
def test_onnx_light_architecture_upgrades_and_prepares(name: str) -> None:
    shipped = onnx.load(str(LIGHT_MODELS / f"light_{name}.onnx"))
    assert shipped.ir_version == 3 and default_opset(shipped) == 9
    original = _perturbed_placeholder_weights(shipped, seed=len(name))
    prepared, graph = _prepare(original)
    assert default_opset(prepared) >= 13 and prepared.ir_version <= 8
    assert all(_weights_are_constants(graph, ("Conv",)))
    assert not [n for n in graph.nodes if n.op == "BatchNormalization" and n.inputs[0].inputs
                and n.inputs[0].inputs[0].op == "Conv"]
    # Compare the logits too when the model ends in a Softmax: its output alone is less sensitive.
    for softmax in (node for node in original.graph.node if node.op_type == "Softmax"):
        logits = helper.make_tensor_value_info(softmax.input[0], TensorProto.FLOAT, None)
        for model in (original, prepared):
            model.graph.output.append(logits)
    feed_name = next(i.name for i in original.graph.input if "data_0" in i.name)
    feeds = {feed_name: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    # Folding BN into the weights reorders float32 arithmetic: each fused layer differs by a few
    # ulps (1e-7 relative), compounded over at most ~120 layers; 1e-4 of the output's range leaves
    # room for that and still catches any wrong scale, shift or channel axis (errors of order 1).
    for expected, actual in zip(run_model(original, feeds, optimized=True), run_model(prepared, feeds, optimized=True),
                                strict=True):
        assert np.ptp(expected) > 1e-3  # the comparison is not between two constant vectors
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


# --- fuse_bn on small graphs -------------------------------------------------------------------

def _conv_bn_model(op: str, weight_shape: tuple[int, ...], *, bias: bool, group: int = 1,
                   extra_reader: bool = False) -> onnx.ModelProto:
    """x[1,4,5,5] -> op(W[, b]) -> BatchNormalization -> y, with random constants (seeded)."""
    rng = np.random.default_rng(7)
    channels = weight_shape[1] * group if op == "ConvTranspose" else weight_shape[0]
    arrays = {"W": rng.standard_normal(weight_shape), "gamma": rng.uniform(0.5, 2.0, channels),
              "beta": rng.normal(0, 1, channels), "mean": rng.normal(0, 1, channels),
              "var": rng.uniform(0.1, 3.0, channels)}
    if bias:
        arrays["b"] = rng.normal(0, 1, channels)
    conv_inputs = ["x", "W", "b"] if bias else ["x", "W"]
    nodes = [helper.make_node(op, conv_inputs, ["conv_out"], group=group, name="conv"),
             helper.make_node("BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"],
                              ["y"], epsilon=1e-3, name="bn")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["conv_out"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])], outputs,
        initializer=[numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("op", "weight_shape", "bias", "group"), [
    ("Conv", (6, 4, 3, 3), True, 1),
    ("Conv", (6, 4, 3, 3), False, 1),
    ("Conv", (8, 2, 3, 3), True, 2),
    ("ConvTranspose", (4, 3, 3, 3), True, 2),  # [C_in, C_out/group, k, k]: 6 output channels
    ("ConvTranspose", (4, 5, 2, 2), False, 1),
])
def test_fuse_bn_folds_into_conv_exactly(op: str, weight_shape: tuple[int, ...], bias: bool,
                                         group: int) -> None:
    original = _conv_bn_model(op, weight_shape, bias=bias, group=group)
    graph = fuse_bn(io.to_graph(original))
    assert [node.op for node in graph.nodes] == [op]
    conv = graph.nodes[0]
    assert conv.outputs[0].name == "y" and len(conv.inputs) == 3
    assert all(isinstance(t, gs.Constant) and t.dtype == np.float32 for t in conv.inputs[1:])
    fused = io.from_graph(graph, original)
    io.check_model(fused)
    x = {"x": np.random.default_rng(3).standard_normal((1, 4, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run_model(fused, x, optimized=True)[0], run_model(original, x, optimized=True)[0],
                               rtol=1e-5, atol=1e-5)


def test_fuse_bn_skips_conv_output_with_a_second_reader() -> None:
    graph = fuse_bn(io.to_graph(_conv_bn_model("Conv", (6, 4, 3, 3), bias=True, extra_reader=True)))
    assert sorted(node.op for node in graph.nodes) == ["BatchNormalization", "Conv", "Relu"]
    assert graph.nodes[0].inputs[1].name == "W"


def test_fuse_bn_leaves_the_callers_graph_and_weights_alone() -> None:
    graph = io.to_graph(_conv_bn_model("Conv", (6, 4, 3, 3), bias=True))
    before = {name: t.values.copy() for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    fused = fuse_bn(graph)
    assert [node.op for node in graph.nodes] == ["Conv", "BatchNormalization"]
    assert graph.nodes[0].inputs[1].name == "W" and graph.nodes[0].outputs[0].name == "conv_out"
    after = {name: t.values for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    assert after.keys() == before.keys()
    for name, values in before.items():
        np.testing.assert_array_equal(after[name], values)
    assert not np.array_equal(fused.nodes[0].inputs[1].values, before["W"])


# --- upgrade_opset -----------------------------------------------------------------------------

def _single_node_model(node: onnx.NodeProto, opset: int, inputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=3)


def test_upgrade_opset_keeps_metadata_and_writes_a_runnable_ir_version() -> None:
    model = _single_node_model(helper.make_node("Relu", ["x"], ["y"]), 9, ["x"])
    model.producer_name, model.doc_string = "exporter", "a model"
    helper.set_model_props(model, {"author": "someone"})
    upgraded = upgrade_opset(model)
    assert default_opset(upgraded) == 13 and upgraded.ir_version == 7
    assert (upgraded.producer_name, upgraded.doc_string) == ("exporter", "a model")
    assert [(p.key, p.value) for p in upgraded.metadata_props] == [("author", "someone")]
    assert default_opset(model) == 9  # the input is not modified
    newer = _single_node_model(helper.make_node("Relu", ["x"], ["y"]), 17, ["x"])
    assert upgrade_opset(newer) is newer


# Real converter failures. Opset < 7 broadcast attributes need static shapes to be converted, which
# legacy exports with unknown input shapes lack (the converter does not say which op failed); an op
# with no ONNX schema (a custom op written into the default domain) and an op newer than the model's
# opset (Range is opset 11) are named.
@pytest.mark.parametrize(("node", "opset", "inputs", "detail"), [
    (helper.make_node("Add", ["a", "b"], ["y"], broadcast=1, axis=1), 6, ["a", "b"], None),
    (helper.make_node("MyCustomOp", ["a"], ["y"]), 11, ["a"],
     "at op 'MyCustomOp': 'MyCustomOp' is not an ONNX op"),
    (helper.make_node("Range", ["a", "b", "c"], ["y"]), 9, ["a", "b", "c"],
     "at op 'Range': 'Range' is not part of opset 9"),
], ids=["opset6-broadcast-unknown-shapes", "custom-op-in-default-domain", "op-newer-than-opset"])
def test_upgrade_opset_failure_is_a_one_line_model_error(node: onnx.NodeProto, opset: int,
                                                         inputs: list[str], detail: str | None) -> None:
    with pytest.raises(ModelError) as caught:
        upgrade_opset(_single_node_model(node, opset, inputs))
    message = str(caught.value)
    assert "\n" not in message and f"from opset {opset} to opset 13" in message and "Hint:" in message
    assert "/project/" not in message and "Assertion" not in message and ".. Hint" not in message
    if detail is not None:
        assert detail in message


# --- constants_to_initializers and fold_constants ----------------------------------------------

def test_constant_nodes_become_initializers_with_onnx_dtypes() -> None:
    nodes = [helper.make_node("Constant", [], ["f"], value_float=2.0),
             helper.make_node("Constant", [], ["fs"], value_floats=[1.0, 3.0]),
             helper.make_node("Constant", [], ["i"], value_ints=[2, 1]),
             helper.make_node("Constant", [], ["kept"], value_float=5.0),
             helper.make_node("Add", ["x", "f"], ["x1"]), helper.make_node("Mul", ["x1", "fs"], ["x2"]),
             helper.make_node("Reshape", ["x2", "i"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("kept", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    lowered = constants_to_initializers(io.to_graph(model))
    tensors = lowered.tensors()
    assert [n.op for n in lowered.nodes] == ["Constant", "Add", "Mul", "Reshape"]  # graph output stays
    assert (tensors["f"].dtype, tensors["fs"].dtype, tensors["i"].dtype) == (np.float32, np.float32, np.int64)
    x = {"x": np.array([1.0, 2.0], np.float32)}
    np.testing.assert_array_equal(run_model(io.from_graph(lowered), x, optimized=True)[0], [[3.0], [12.0]])


def _shape_arithmetic_model() -> onnx.ModelProto:
    """half = int(float(x.shape[0]) * 0.5), with a dynamic batch dimension."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
             helper.make_node("Cast", ["n"], ["n_float"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["n_float", "one_half"], ["half_float"]),
             helper.make_node("Cast", ["half_float"], ["half"], to=TensorProto.INT64),
             helper.make_node("RandomUniform", [], ["noise"], shape=[2], seed=1.0),
             helper.make_node("Add", ["x", "noise"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("half", TensorProto.INT64, []),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(0, np.int64), "zero"),
                     numpy_helper.from_array(np.array(0.5, np.float32), "one_half")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_fold_constants_keeps_float_shape_arithmetic_and_random_ops() -> None:
    # gs's own fold_constants() (fold_shapes=True) rewrites the Mul to int64 and returns 0 here.
    folded = io.from_graph(fold_constants(io.to_graph(_shape_arithmetic_model())))
    assert "RandomUniform" in {node.op_type for node in folded.graph.node}
    half = run_model(folded, {"x": np.zeros((6, 2), np.float32)}, optimized=True)[0]
    assert half == 3


def test_fold_constants_returns_the_graph_unfolded_when_gs_fails(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken_fold(self: gs.Graph, **_: object) -> gs.Graph:
        raise RuntimeError("simulated onnx-graphsurgeon failure")

    monkeypatch.setattr(gs.Graph, "fold_constants", broken_fold)
    original = io.to_graph(io.load_model(MODELS / "efficientnet_lite0.onnx"))
    with caplog.at_level(logging.WARNING, logger="onnxq.passes.fold_constants"):
        unfolded = fold_constants(original)
    assert "simulated onnx-graphsurgeon failure" in caplog.text
    assert Counter(n.op for n in unfolded.nodes) == Counter(n.op for n in original.nodes)
