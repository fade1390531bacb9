"""The Python API as the README shows it: stages as plain functions, user passes chained in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import onnx_graphsurgeon as gs
from onnx import helper

import models
import onnxq
from onnxq import passes
from onnxq.passes.equalize import equalize
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


@pytest.mark.parametrize("target", [onnxq.TRT, onnxq.ORT_CPU], ids=str)
@pytest.mark.parametrize("method", [onnxq.CalibMethod.MAX, onnxq.CalibMethod.MSE], ids=lambda m: m.value)
def test_stages_chain_by_hand_like_quantize(target: onnxq.QuantTarget, method: onnxq.CalibMethod) -> None:
    """The README's stage-by-stage example gives the very bytes `quantize` writes without bias correction and
    SmoothQuant (the steps that measure)."""
    model = models.BUILDERS["residual_cnn"]()
    feeds = onnxq.FeedsSource([models.random_feeds(model, batch=4, seed=s) for s in range(2)])
    selection = onnxq.Selection(exclude_node_patterns=("^block1/conv2$",))
    calib = onnxq.CalibConfig(method=method)
    graph = equalize(passes.run(onnxq.prepare(model, target), [drop_identity]))
    plan = target.plan(graph, selection)
    calibration = onnxq.calibrate(graph, plan.activation_names, feeds, calib)
    params = onnxq.activation_params(plan, calibration.stats, calib, target.scheme)
    by_hand = onnxq.from_graph(target.lower(onnxq.insert_qdq(graph, plan, params), onnxq.HighPrecision.FP32), model)
    onnxq.check_model(by_hand)
    config = onnxq.QuantConfig(selection=selection, calib=calib, target=target, bias_correction=False,
                               smoothquant=False)
    whole = onnxq.quantize(model, feeds, config, user_passes=[drop_identity]).model
    assert by_hand.SerializeToString() == whole.SerializeToString()
    assert not plan.decision("block1/conv2").quantized


@dataclass(frozen=True)
class KeepStemFloat(onnxq.Step):
    """The README's example step: keep the first quantized Conv in float."""

    name = "keep the stem float"

    def refine(self, job, plan):  # type: ignore[no-untyped-def]
        stem = next(d.node_name for d in plan.quantized_nodes if d.op_type == "Conv")
        job.keep_float({stem: "stem kept float by KeepStemFloat"})
        return job.replan(), None


def test_a_user_step_gives_the_model_of_the_same_exclusion() -> None:
    model = models.BUILDERS["residual_cnn"]()
    feeds = onnxq.FeedsSource([models.random_feeds(model, batch=4, seed=s) for s in range(2)])
    stepped = onnxq.quantize(model, feeds, steps=[KeepStemFloat()])
    stem = next(d for d in stepped.plan.decisions if d.reason == "stem kept float by KeepStemFloat")
    assert not stem.quantized and stem.op_type == "Conv"
    excluded = onnxq.quantize(model, feeds, onnxq.QuantConfig(
        selection=onnxq.Selection(exclude_node_patterns=(f"^{stem.node_name}$",))))
    assert stepped.model.SerializeToString() == excluded.model.SerializeToString()


def test_calibrated_scale_is_max_over_all_batches_divided_by_127() -> None:
    model = models.BUILDERS["gemm_mlp"]()
    feeds = [models.random_feeds(model, batch=3, seed=s) for s in range(3)]
    # SmoothQuant off: it would divide the input by a per-channel Mul before the first Gemm.
    result = onnxq.quantize(model, onnxq.FeedsSource(feeds), onnxq.QuantConfig(smoothquant=False))
    expected = np.float32(max(np.abs(f["input"]).max() for f in feeds)) / np.float32(127)
    scale = next(onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "input_scale")
    assert scale == expected


def test_public_api_is_listed() -> None:
    for name in onnxq.__all__:
        assert hasattr(onnxq, name), name
