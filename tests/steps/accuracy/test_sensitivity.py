"""Per-layer sensitivity: the layer map a fallback works on, and the damaged layer ranks first.

The gated Q/DQ graph the sensitivity runs on is tested in tests/lower/test_gate_qdq.py, the held-back split
in tests/data/test_held_back.py.
"""

from __future__ import annotations

import models
from onnxq.pipeline import prepare, quantize
from onnxq.config import AccuracyGoal, Target
from onnxq.options import Selection
from onnxq.plan.replan import Replanner
from onnxq.steps.accuracy.layers import LayerMap
from onnxq.targets import get_target, plan_quantization
from tests.support.damaged_mlp import DAMAGED, damaged_mlp, mlp_feeds


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
