"""Issue 12, bug 8: `max` calibration reduced a rank-6 ReLU output with GlobalMaxPool inside ONNX Runtime,
which runs GlobalMaxPool on ranks 3 to 5 only ("Unsupported pooling size"), so calibration failed."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxq
from onnxq.calib.in_graph_max import plan_in_graph_max
from tests.regressions.graphs import TARGETS, cosine, feeds, model, quantize_and_run, weight
from tests.support.runtime import run_model


def _relu_then_matmul(rank: int):
    shape = [1, 2, 2, 2, 2, 2, 3][:rank - 1] + [8]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="matmul")]
    return model(nodes, {"x": shape}, {"y": None}, [weight("w", (8, 4))])


@pytest.mark.parametrize("rank", [3, 4, 5, 6, 7])
def test_only_ranks_ort_pools_are_reduced_in_graph(rank: int) -> None:
    (decision,) = plan_in_graph_max(onnxq.prepare(_relu_then_matmul(rank)), ["r"])
    assert decision.in_graph == (rank <= 5), decision.reason
    if rank > 5:
        assert f"rank {rank}" in decision.reason


@pytest.mark.parametrize("target", TARGETS)
def test_a_rank_6_relu_output_calibrates_with_max(target: str) -> None:
    built = _relu_then_matmul(6)
    _, (quantized,) = quantize_and_run(built, target)
    (reference,) = run_model(built, feeds(built, 1, seed=99)[0])
    assert cosine(quantized, reference) > 0.99
