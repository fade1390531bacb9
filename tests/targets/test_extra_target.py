"""A new target is one module and one `register_target` line: this file alone defines one and quantizes with it.

`conv-only` is a made-up runtime that runs only convolutions in INT8 (symmetric), everything else in float.
Its planner is built from the shared public helpers of `onnxq.plan.core`, as the built-in targets' are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner

import onnxq
from onnxq.graph.query import GraphIndex
from onnxq.lower.scales import INT8_SYMMETRIC, ActivationScheme
from onnxq.plan.core import PlanDraft, QuantPlan, float_reason, plan_rule_ops, plan_weighted
from onnxq.plan.rules import default_float_reason, float_reasons
from onnxq.plan.scale_groups import scale_groups
from onnxq.runtime.session import open_session
from onnxq_cli.main import cli
from tests.support.paths import MODELS


@dataclass(frozen=True)
class ConvOnly(onnxq.QuantTarget):
    """Quantize the inputs and weights of Conv nodes, nothing else."""

    name: str = "conv-only"
    runtime: str = "ConvOnly"
    scheme: ActivationScheme = INT8_SYMMETRIC

    def plan(self, graph: gs.Graph, selection: onnxq.Selection) -> QuantPlan:
        draft = PlanDraft(GraphIndex.build(graph), self.runtime)
        reasons, default = float_reasons(self.runtime), default_float_reason(self.runtime)
        nodes = list(graph.nodes)
        plan_rule_ops(nodes, draft, selection, {"Conv"}, plan_weighted, "{op}: the only INT8 kernel of ConvOnly")
        for node in nodes:
            if node.name not in draft.decisions:
                draft.decide(node, False, float_reason(node, draft, reasons, default))
        return draft.finish(nodes, scale_groups(nodes, draft.edges, draft.index).find)


CONV_ONLY = onnxq.register_target(ConvOnly())


@pytest.fixture(scope="module")
def lite0() -> onnx.ModelProto:
    return onnxq.load_model(MODELS / "efficientnet_lite0.onnx")


def _calib(model: onnx.ModelProto) -> onnxq.FeedsSource:
    rng = np.random.default_rng(0)
    name = model.graph.input[0].name
    return onnxq.FeedsSource([{name: rng.standard_normal((4, 3, 224, 224)).astype(np.float32)} for _ in range(2)])


def test_a_target_defined_here_is_found_by_name_and_quantizes_only_convs(lite0: onnx.ModelProto) -> None:
    assert onnxq.get_target("conv-only") is CONV_ONLY and "conv-only" in onnxq.targets.targets()
    result = onnxq.quantize(lite0, _calib(lite0), onnxq.QuantConfig(target="conv-only"))
    quantized = {d.op_type for d in result.plan.quantized_nodes}
    assert quantized == {"Conv"}
    assert all(d.reason == "Conv: the only INT8 kernel of ConvOnly" for d in result.plan.quantized_nodes)
    assert any("ConvOnly" in d.reason for d in result.plan.float_nodes if d.op_type == "Add")
    ops = {n.op_type for n in result.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    onnx.checker.check_model(result.model, full_check=True)
    feed = {lite0.graph.input[0].name: np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)}
    with open_session(lite0) as reference, open_session(result.model) as candidate:
        want, got = reference.run(feed), candidate.run(feed)
    for name, values in want.items():
        cosine = float((values * got[name]).sum() / np.linalg.norm(values) / np.linalg.norm(got[name]))
        assert cosine > 0.9, (name, cosine)


def test_the_cli_takes_the_registered_target(lite0: onnx.ModelProto, tmp_path: Path) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, **{lite0.graph.input[0].name: np.random.default_rng(2).standard_normal((4, 3, 224, 224))
                      .astype(np.float32)})
    out = tmp_path / "q.onnx"
    outcome = CliRunner().invoke(cli, ["quantize", str(MODELS / "efficientnet_lite0.onnx"), "--calib", str(data),
                                       "-o", str(out), "--target", "conv-only"])
    assert outcome.exit_code == 0, outcome.output
    assert "nodes quantized (49 Conv)" in outcome.output
    model = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
    refused = CliRunner().invoke(cli, ["inspect", str(MODELS / "efficientnet_lite0.onnx"), "--target", "nope"])
    assert refused.exit_code == 2 and "'nope' is not one of trt, ort-cpu, conv-only" in refused.output


def test_a_second_target_with_a_taken_name_is_refused() -> None:
    with pytest.raises(onnxq.ConfigError, match="already registered"):
        onnxq.register_target(ConvOnly(runtime="another"))
