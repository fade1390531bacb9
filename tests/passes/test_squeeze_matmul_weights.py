"""`squeeze_matmul_weights`: a MatMul weight [1, .., 1, K, N] becomes [K, N] where that computes the same."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxq
from onnxq.passes import squeeze_matmul_weights
from tests.regressions.graphs import feeds, model, weight
from tests.support.runtime import run_model


def _shared_weight(x_shape: list[int], w_shape: tuple[int, ...]):
    """y = x @ w and z = w + 1: the weight has a second reader that must keep its shape."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
             helper.make_node("Relu", ["w"], ["z"], name="relu")]
    return model(nodes, {"x": x_shape}, {"y": None, "z": None}, [weight("w", w_shape)])


@pytest.mark.parametrize(("x_shape", "w_shape", "squeezed"), [
    ([1, 1, 8, 16], (1, 1, 16, 4), True),
    ([2, 3, 8, 16], (1, 16, 4), True),      # x has more batch axes than w
    ([8, 16], (1, 1, 16, 4), False),        # w's 1s would add output axes
    ([2, 8, 16], (2, 16, 4), False),        # a batch of weights
    ([8, 16], (16, 4), False),              # already 2-D
])
def test_squeezes_only_where_the_result_is_the_same(x_shape: list[int], w_shape: tuple[int, ...], squeezed: bool) -> None:
    built = _shared_weight(x_shape, w_shape)
    graph = squeeze_matmul_weights(onnxq.to_graph(built))
    matmul = next(node for node in graph.nodes if node.op == "MatMul")
    relu = next(node for node in graph.nodes if node.op == "Relu")
    assert tuple(matmul.inputs[1].shape) == ((16, 4) if squeezed else w_shape)
    assert tuple(relu.inputs[0].shape) == w_shape  # the other reader keeps the original
    x = feeds(built, 1)[0]
    for want, got in zip(run_model(built, x), run_model(onnxq.from_graph(graph, template=built), x)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6)
