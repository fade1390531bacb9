"""Gated Q/DQ and per-layer sensitivity: the gates reproduce the real models, the damaged layer ranks first."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import models
from onnxq.pipeline import prepare, quantize
from onnxq.calib.calibrate import calibrate
from onnxq.data.feeds import FeedsSource
from onnxq.calib.ranges import activation_params
from onnxq.runtime.session import open_session
from onnxq.config import AccuracyTarget, CalibConfig, Selection, Target
from onnxq.errors import ConfigError
from onnxq.io import from_graph
from onnxq.lower.gate_qdq import gate_qdq
from onnxq.lower.insert_qdq import insert_qdq
from onnxq.lower.gate_qdq import LayerMap
from onnxq.plan.core import QuantPlan, plan_quantization
from onnxq.steps.accuracy.sensitivity import held_back_sources
from tests.support.damaged_mlp import DAMAGED, damaged_mlp, mlp_feeds


def _setup(model: onnx.ModelProto, target: Target):
    graph = prepare(model)
    plan = plan_quantization(graph, Selection(), target)
    layers = LayerMap(graph, plan, Selection(), target)
    source = FeedsSource([models.random_feeds(model, batch=4, seed=s) for s in range(2)])
    stats = calibrate(graph, layers.calibrated_names, source, CalibConfig()).stats
    return graph, layers, stats


def _params(plan: QuantPlan, stats, target: Target):
    return activation_params(plan, stats, CalibConfig(), target)


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
    layers = LayerMap(graph, plan, Selection(), Target.TRT)
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
    result = quantize(damaged_mlp(), mlp_feeds(64, 1), accuracy=AccuracyTarget(), eval_source=mlp_feeds(16, 2))
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


def test_held_back_samples_are_every_fourth_and_never_calibrated() -> None:
    x = np.arange(22, dtype=np.float32).reshape(22, 1)
    calib, held = held_back_sources(FeedsSource([{"x": x}]), None, samples=4)
    held_values = np.concatenate([feed["x"] for feed in held.batches(3)]).ravel()
    calib_batches = list(calib.batches(3))
    calib_values = np.concatenate([feed["x"] for feed in calib_batches]).ravel()
    assert held_values.tolist() == [3, 7, 11, 15]  # capped at 4; 19 goes to calibration
    assert sorted(calib_values.tolist() + held_values.tolist()) == list(range(22))
    assert [len(feed["x"]) for feed in calib_batches] == [3, 3, 3, 3, 3, 3]
    assert held.num_samples() == 4 and calib.num_samples() == 18


def test_held_back_from_evaluation_data_takes_its_first_samples() -> None:
    evaluation = FeedsSource([{"x": np.arange(10, dtype=np.float32).reshape(10, 1)}])
    calib = FeedsSource([{"x": np.zeros((4, 1), np.float32)}])
    kept, held = held_back_sources(calib, evaluation, samples=6)
    assert kept is calib
    assert np.concatenate([f["x"] for f in held.batches(4)]).ravel().tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="--eval"):
        held_back_sources(None, None, samples=6)
