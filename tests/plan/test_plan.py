"""Placement decisions on models whose correct TensorRT placement is known by construction."""

from __future__ import annotations


import pytest

import models
from onnxq.pipeline import inspect
from onnxq.options import Selection
from onnxq.plan.core import QuantPlan
from tests.support.paths import MODELS



def _plan(name: str, selection: Selection = Selection()) -> QuantPlan:
    return inspect(models.BUILDERS[name](), selection)


def _readers(plan: QuantPlan) -> dict[tuple[str, int], str]:
    """(consumer node, input index) -> quantized tensor name."""
    return {use: target.tensor_name for target in plan.activations for use in target.consumers}


def _weight_axes(plan: QuantPlan) -> dict[str, int]:
    return {w.consumer: w.axis for w in plan.weights}


def test_residual_add_quantizes_only_the_skip_input() -> None:
    """stem ─┬─ conv1 ─ conv2(+BN) ─ Add        block2: conv1 ─ conv2 ─ Add ◀─ shortcut_conv(+BN)
             └──────────────────────┘                                   (the shortcut is the skip input)"""
    plan = _plan("residual_cnn")
    readers = _readers(plan)
    assert readers.get(("block1/add", 1)) == "stem/relu_output_0"
    assert ("block1/add", 0) not in readers, "the Conv branch of a residual Add must stay unquantized"
    assert readers.get(("block2/add", 1)) == "block2/shortcut_bn_output_0"
    assert ("block2/add", 0) not in readers
    assert "block1/conv2" in plan.decision("block1/add").reason


def test_pooling_follows_its_quantized_consumers() -> None:
    plan = _plan("residual_cnn")
    readers = _readers(plan)
    assert ("head/maxpool", 0) in readers and ("head/gap", 0) in readers
    assert plan.decision("head/gap").quantized


def test_weight_axes_follow_the_weight_layout() -> None:
    assert _weight_axes(_plan("gemm_mlp")) == {"fc1": 0, "fc2": 1, "fc3/matmul": 1}
    assert _weight_axes(_plan("conv_transpose")) == {"encoder/conv": 0, "decoder/deconv1": 1, "decoder/deconv2": 1}
    depthwise = _weight_axes(_plan("depthwise_cnn"))
    assert depthwise["block/depthwise_conv"] == 0 and depthwise["head/fc"] == 0


def test_bias_and_graph_outputs_are_never_quantized() -> None:
    plan = _plan("gemm_mlp")
    readers = _readers(plan)
    assert not any(node == "fc3/add" for node, _ in readers)
    assert "constant" in plan.decision("fc3/add").reason
    for target in plan.activations:
        assert target.tensor_name != "logits"


def test_yolo_neck_and_head() -> None:
    plan = _plan("yolo_neck_head")
    readers = _readers(plan)
    silu = plan.decision("stem/silu/mul")
    assert not silu.quantized and "SiLU" in silu.reason
    # Bottleneck residual: the skip input only.
    assert readers.get(("c2f/bottleneck/add", 0)) == "c2f/split_output_1"
    assert ("c2f/bottleneck/add", 1) not in readers
    # SPPF: the three MaxPools run in INT8 and share one scale with the Concat that joins them.
    groups = {t.tensor_name: t.group for t in plan.activations}
    sppf = {groups["sppf/concat_output_0"], groups["sppf/maxpool1_output_0"],
            groups["sppf/maxpool2_output_0"], groups["sppf/in/silu/mul_output_0"]}
    assert len(sppf) == 1
    assert all(plan.decision(f"sppf/maxpool{i}").quantized for i in (1, 2, 3))
    # Resize and the detection head's data movement and Sigmoid stay float.
    for name in ("neck/upsample", "detect/concat"):
        assert not plan.decision(name).quantized


def test_concat_inputs_share_one_scale() -> None:
    """Every quantized Concat input sits in the Concat output's scale group; unquantized inputs get the
    output's Q moved onto them by TensorRT, which is the same scale by construction."""
    for name in ("concat_branches", "yolo_neck_head"):
        build = models.BUILDERS[name]()
        plan = inspect(build)
        groups = {t.tensor_name: t.group for t in plan.activations}
        for node in build.graph.node:
            if node.op_type != "Concat" or node.output[0] not in groups:
                continue
            for tensor_name in node.input:
                if tensor_name in groups:
                    assert groups[tensor_name] == groups[node.output[0]], (name, node.name, tensor_name)


def test_transformer_mask_path_stays_float() -> None:
    plan = _plan("transformer_encoder")
    quantized = set(plan.activation_names)
    assert not any(name.startswith("mask/") for name in quantized), quantized
    for layer in ("layer1", "layer2"):
        mask_add = plan.decision(f"{layer}/attn/add_mask")
        assert not mask_add.quantized and "mask" in mask_add.reason
        assert not plan.decision(f"{layer}/attn/softmax").quantized
        readers = _readers(plan)
        # Transformer-aware default: the attention BMMs next to the Softmax stay float too ...
        for bmm in ("scores", "context"):
            decision = plan.decision(f"{layer}/attn/{bmm}")
            assert not decision.quantized and "Softmax" in decision.reason
            assert (f"{layer}/attn/{bmm}", 0) not in readers
        assert _weight_axes(plan)[f"{layer}/attn/q_proj/matmul"] == 1
    # ... unless asked: then both inputs of each are quantized per-tensor.
    asked = _readers(_plan("transformer_encoder", Selection(quantize_attention=True)))
    assert ("layer1/attn/scores", 0) in asked and ("layer1/attn/scores", 1) in asked
    assert ("layer1/attn/context", 0) in asked


def test_every_node_has_a_decision_with_a_reason() -> None:
    for name, build in models.BUILDERS.items():
        plan = inspect(build())
        names = [d.node_name for d in plan.decisions]
        assert len(names) == len(set(names)), name
        assert all(d.reason for d in plan.decisions), name


def test_user_exclusions_by_op_type_and_name() -> None:
    plan = _plan("residual_cnn", Selection(exclude_op_types=("Gemm",), exclude_node_patterns=(r"^block2/",)))
    assert not plan.decision("head/fc").quantized
    assert "op type Gemm" in plan.decision("head/fc").reason
    assert not plan.decision("block2/conv1").quantized
    assert "block2" in plan.decision("block2/conv1").reason
    assert plan.decision("block1/conv1").quantized
    assert "block2/conv1" not in _weight_axes(plan)


def test_control_flow_subgraphs_are_left_float() -> None:
    plan = inspect(MODELS / "silero_vad.onnx")
    if_nodes = [d for d in plan.decisions if d.op_type == "If"]
    assert if_nodes and all(not d.quantized and "control flow" in d.reason for d in if_nodes)


@pytest.mark.parametrize("model_file", ["efficientnet_lite0.onnx", "ppocr_mobile_v2_cls.onnx"])
def test_real_models_quantize_every_conv(model_file: str) -> None:
    plan = inspect(MODELS / model_file)
    convs = [d for d in plan.decisions if d.op_type == "Conv"]
    assert convs and all(d.quantized for d in convs)
    assert all(w.axis == 0 for w in plan.weights if w.consumer in {d.node_name for d in convs})
