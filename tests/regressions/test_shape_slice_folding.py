"""Issue 12, bug 6: Shape with `start`/`end` (opset >= 15) was folded as the whole shape (onnx-graphsurgeon's
shape folding ignores those attributes), which changed what the model computes: here Shape(start=1) ->
Concat -> Reshape reshaped [1, 3, 4] to [1, 1, 3, 4] instead of keeping it."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxq
from tests.regressions.graphs import TARGETS, feeds, model, quantize_and_run, weight
from tests.support.runtime import run_model


def _shape_slice_reshape(start: int, end: int | None, x_shape: list[int], head: list[int], tail: list[int]):
    """y = Reshape(x, Concat(head, Shape(x)[start:end], tail)) -> MatMul w: the slice of the shape decides y's
    shape (x's own, for every case below)."""
    attrs = {"start": start} if end is None else {"start": start, "end": end}
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape", **attrs),
             helper.make_node("Concat", ["head", "shape", "tail"], ["new_shape"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "new_shape"], ["reshaped"], name="reshape"),
             helper.make_node("MatMul", ["reshaped", "w"], ["y"], name="matmul")]
    ends = [numpy_helper.from_array(np.array(values, np.int64), name) for name, values in (("head", head), ("tail", tail))]
    return model(nodes, {"x": x_shape}, {"y": None}, [*ends, weight("w", (x_shape[-1], 4))], opset=17)


CASES = {
    "start=1": (1, None, [1, 3, 4], [1], []),
    "start=-2": (-2, None, [2, 3, 4], [2], []),
    "start=0,end=-1": (0, -1, [2, 3, 4], [], [4]),
    "start=1,end=2": (1, 2, [2, 3, 4], [2], [4]),
    "start=-9,end=9 (clamped)": (-9, 9, [2, 3, 4], [], []),
}


@pytest.mark.parametrize("case", CASES)
def test_prepare_keeps_what_the_model_computes(case: str) -> None:
    built = _shape_slice_reshape(*CASES[case])
    x = feeds(built, 1)[0]
    graph = onnxq.prepare(built)
    assert not any(node.op in ("Shape", "Slice", "Concat") for node in graph.nodes)  # the shape is folded
    prepared = onnxq.from_graph(graph, template=built)
    (want,) = run_model(built, x)
    (got,) = run_model(prepared, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
def test_the_quantized_model_has_the_float_models_shape(target: str) -> None:
    built = _shape_slice_reshape(*CASES["start=1"])
    _, (quantized,) = quantize_and_run(built, target)
    (reference,) = run_model(built, feeds(built, 1, seed=99)[0])
    assert quantized.shape == reference.shape == (1, 3, 4)
