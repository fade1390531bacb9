"""The Python API as the README shows it: stages as plain functions, user passes chained in."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

import models
import onnxq
from onnxq import passes
from tests.support.qdq_checks import check_trt_qdq


# The README's example pass, verbatim.
@passes.graph_pass
def drop_identity(graph: gs.Graph) -> gs.Graph:
    """Bypass Identity nodes (graph_pass then removes the dead ones)."""
    for node in graph.nodes:
        if node.op != "Identity" or node.outputs[0] in graph.outputs:
            continue
        source, result = node.inputs[0], node.outputs[0]
        for consumer in list(result.outputs):
            consumer.inputs[consumer.inputs.index(result)] = source
    return graph


def _with_identity_before_first_conv() -> onnx.ModelProto:
    model = models.BUILDERS["residual_cnn"]()
    first = model.graph.node[0]
    original_input = first.input[0]
    first.input[0] = "input_identity"
    model.graph.node.insert(0, helper.make_node("Identity", [original_input], ["input_identity"], name="identity"))
    return model


def test_quantize_with_a_user_pass() -> None:
    model = _with_identity_before_first_conv()
    calib = onnxq.FeedsSource([models.random_feeds(model, batch=4, seed=s) for s in range(2)])
    result = onnxq.quantize(model, calib, user_passes=[drop_identity])
    assert "Identity" not in {n.op_type for n in result.model.graph.node}
    assert check_trt_qdq(result.model)["weighted_int8"] == 7  # 6 Conv + the Gemm
    assert isinstance(result.plan, onnxq.QuantPlan)


def test_stages_chain_by_hand_like_quantize() -> None:
    model = models.BUILDERS["gemm_mlp"]()
    feeds = [models.random_feeds(model, batch=4, seed=s) for s in range(2)]
    graph = passes.run(onnxq.prepare(model), [drop_identity])
    plan = onnxq.plan_quantization(graph, onnxq.Selection(exclude_node_patterns=("^fc2$",)))
    calibration = onnxq.calibrate(graph, plan.activation_names, onnxq.FeedsSource(feeds), onnxq.CalibConfig())
    by_hand = onnxq.from_graph(onnxq.insert_qdq(graph, plan, onnxq.group_amax(plan, calibration.stats, onnxq.CalibConfig())), model)
    config = onnxq.QuantConfig(selection=onnxq.Selection(exclude_node_patterns=("^fc2$",)))
    whole = onnxq.quantize(model, onnxq.FeedsSource(feeds), config).model
    assert [n.op_type for n in by_hand.graph.node] == [n.op_type for n in whole.graph.node]
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in by_hand.graph.initializer if t.name.endswith("_scale")}
    whole_scales = {t.name: onnx.numpy_helper.to_array(t) for t in whole.graph.initializer if t.name.endswith("_scale")}
    assert scales.keys() == whole_scales.keys() and all(np.array_equal(scales[k], whole_scales[k]) for k in scales)
    assert not plan.decision("fc2").quantized


def test_calibrated_scale_is_max_over_all_batches_divided_by_127() -> None:
    model = models.BUILDERS["gemm_mlp"]()
    feeds = [models.random_feeds(model, batch=3, seed=s) for s in range(3)]
    result = onnxq.quantize(model, onnxq.FeedsSource(feeds))
    expected = np.float32(max(np.abs(f["input"]).max() for f in feeds)) / np.float32(127)
    scale = next(onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "input_scale")
    assert scale == expected


def test_public_api_is_listed() -> None:
    for name in onnxq.__all__:
        assert hasattr(onnxq, name), name
