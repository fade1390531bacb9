"""Gated Q/DQ (`gate_qdq`): the gates reproduce the quantized, the float and every fallen-back model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import models
from onnxq.calib.calibrate import calibrate
from onnxq.calib.ranges import activation_params
from onnxq.config import Target
from onnxq.data.feeds import FeedsSource
from onnxq.io import from_graph
from onnxq.lower.gate_qdq import gate_qdq
from onnxq.lower.insert_qdq import insert_qdq
from onnxq.options import CalibConfig, Selection
from onnxq.pipeline import prepare
from onnxq.plan.core import QuantPlan
from onnxq.plan.replan import Replanner
from onnxq.runtime.session import open_session
from onnxq.steps.accuracy.layers import LayerMap
from onnxq.targets import get_target, plan_quantization


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
