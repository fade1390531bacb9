"""Gated Q/DQ and per-layer sensitivity: the gates reproduce the real models, the damaged layer ranks first."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from onnxq.pipeline import prepare, quantize
from onnxq.calib.calibrate import calibrate
from onnxq.data.feeds import FeedsSource
from onnxq.calib.ranges import activation_params
from onnxq.runtime.session import open_session
from onnxq.config import AccuracyGoal, Target
from onnxq.options import CalibConfig, Selection
from onnxq.io import from_graph
from onnxq.lower.gate_qdq import gate_qdq
from onnxq.lower.insert_qdq import insert_qdq
from onnxq.plan.replan import Replanner
from onnxq.steps.accuracy.layers import LayerMap
from onnxq.targets import get_target
from onnxq.plan.core import QuantPlan
from onnxq.targets import plan_quantization

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


def _setup(model: onnx.ModelProto, target: Target):
    graph = prepare(model)
    plan = plan_quantization(graph, Selection(), target)
    layers = LayerMap(Replanner(graph, get_target(target).plan, Selection()))
    source = FeedsSource([models.random_feeds(model, batch=4, seed=s) for s in range(2)])
    stats = calibrate(graph, layers.calibrated_names, source, CalibConfig()).stats
    return graph, layers, stats


def _params(plan: QuantPlan, stats, target: Target):
    return activation_params(plan, stats, CalibConfig(), get_target(target).scheme)


@pytest.mark.parametrize(("name", "target"), [("residual_cnn", Target.TRT), ("transformer_encoder", Target.TRT),
                                              ("residual_cnn", Target.ORT_CPU), ("yolo_neck_head", Target.TRT)])
def test_gates_reproduce_the_quantized_the_float_and_every_fallen_back_model(name: str, target: Target) -> None:
    model = models.BUILDERS[name]()
    graph, layers, stats = _setup(model, target)
    gated = gate_qdq(graph, layers.gated_plan, _params(layers.gated_plan, stats, target))
    assert [slot.key for slot in gated.slots] == [slot.key for slot in layers.slots]
    feed = models.random_feeds(model, batch=3, seed=7)

    def real(plan: QuantPlan) -> dict[str, np.ndarray]:
        with open_session(from_graph(insert_qdq(graph, plan, _params(plan, stats, target)), model)) as session:
            return session.run(feed)

    with open_session(from_graph(gated.graph, model)) as session:
        def run(gates: np.ndarray) -> dict[str, np.ndarray]:
            return session.run({**feed, gated.gates_input: gates})

        for output, values in real(layers.plan).items():  # every gate of the full plan on: bit for bit
            assert np.array_equal(run(layers.gates(()))[output], values), output
        with open_session(from_graph(graph, model)) as floating:
            for output, values in floating.run(feed).items():
                np.testing.assert_allclose(run(np.zeros(len(layers.slots), np.bool_))[output], values,
                                           rtol=1e-5, atol=1e-5)
        names = [layer.node_name for layer in layers.layers]
        gated_scales = _params(layers.gated_plan, stats, target)
        for fallen in [*([n] for n in names), names[::3]]:  # each layer alone in float, and a few together
            plan = layers.final_plan(fallen)
            mixed = run(layers.gates(fallen))
            for output, values in real(plan).items():
                if _same_scales(plan, layers.gated_plan, gated_scales, stats, target):
                    assert np.array_equal(mixed[output], values), (fallen, output)
                else:  # a Concat group lost a member: the built model recalibrates the shared scale
                    assert name == "yolo_neck_head" and np.allclose(mixed[output], values, atol=0.2), fallen


def _same_scales(plan: QuantPlan, gated_plan: QuantPlan, gated_scales, stats, target: Target) -> bool:
    groups = {a.tensor_name: a.group for a in gated_plan.activations}
    scales = _params(plan, stats, target)
    return all(scales[a.group] == gated_scales[groups[a.tensor_name]] for a in plan.activations)


def test_falling_back_a_conv_moves_the_residual_quantization_to_the_other_branch() -> None:
    graph = prepare(models.BUILDERS["residual_cnn"]())
    plan = plan_quantization(graph)
    layers = LayerMap(Replanner(graph, get_target(Target.TRT).plan, Selection()))
    extra = set(layers.calibrated_names) - set(plan.activation_names)
    assert extra, "excluding a Conv of a two-Conv residual block should quantize the Add's other input"
    owners = {layers.slots[i].consumer: layer.node_name for layer in layers.layers for i in layer.slots
              if layers.slots[i].consumer != layer.node_name}
    assert owners, "a Conv should take the skip input of the Add fused into it along when it falls back"
    restricted = layers.restricted(set(plan.activation_names))
    assert restricted.calibrated_names == plan.activation_names
    fallen = [layer.node_name for layer in layers.layers]
    assert not restricted.final_plan(fallen).activations


def test_sensitivity_ranks_the_damaged_layer_first() -> None:
    result = quantize(damaged_mlp(), mlp_feeds(64, 1), accuracy=AccuracyGoal(), eval_source=mlp_feeds(16, 2))
    sensitivity = result.sensitivity
    assert sensitivity is not None and result.fallback is None
    assert [layer.node_name for layer in sensitivity.layers][0] == DAMAGED
    assert sensitivity.runs == 1 + 2 * len(sensitivity.layers) and sensitivity.samples == 16
    damaged = sensitivity.layer(DAMAGED)
    assert damaged.alone_cosine == min(layer.alone_cosine for layer in sensitivity.layers)
    assert damaged.alone_cosine < 0.9 < damaged.recovered_cosine
    assert sensitivity.float_vs_int8[0].cosine < 0.9
    assert all(layer.alone_cosine > 0.999 for layer in sensitivity.layers if layer is not damaged)
    assert "fc2.weight" in damaged.tensors
