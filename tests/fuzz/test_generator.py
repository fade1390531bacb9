"""The fuzz generator's promise: for every seed CI runs, a model the full checker accepts and ONNX Runtime
runs as given, at its calibration dims and at other values of its dynamic dims, with optimizations on and off;
the same model for the same seed; together covering the op list and opsets of issue 12."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from tests.fuzz.generator import random_feeds, random_model
from tests.fuzz.oracle import session
from tests.fuzz.test_fuzz_slice import SLICE

CHECKED = range(0, 400)  # the slice's seeds and more: generating and running them takes about 2 s

ISSUE_OPS = {
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Sub", "Div", "Concat", "Split", "Slice", "Reshape",
    "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Relu",
    "Clip", "Sigmoid", "HardSwish", "LeakyRelu", "Softmax", "LayerNormalization", "BatchNormalization", "Constant",
    "Shape",  # with start (opset 15 on): issue 12 bug 6
}
ISSUE_VARIANTS = {
    "conv_depthwise", "conv_grouped", "gemm_transB0", "gemm_transB1", "shared_weight", "tied_weight",
    "constant_node", "mid_graph_output", "dynamic_batch", "dynamic_spatial", "shape_start",
}


def test_every_model_is_valid_and_runs_as_given():
    broken = []
    for seed in CHECKED:
        model, description = random_model(seed)
        try:
            onnx.checker.check_model(model, full_check=True)
            for world in (0, 1):
                feed = random_feeds(description, world, seed)
                runs = [session(model, optimized=optimized).run(None, feed) for optimized in (False, True)]
                assert len(runs[0]) == len(description.outputs)
                for plain, optimized in zip(*runs):
                    assert np.isfinite(plain).all()
                    np.testing.assert_allclose(optimized, plain, rtol=1e-3, atol=1e-4)
        except Exception as err:  # collect them all: one report names every broken seed
            broken.append(f"{description.summary()}: {str(err).splitlines()[0][:200]}")
    assert not broken, "\n".join(broken)


def test_a_seed_always_gives_the_same_model():
    for seed in (0, 7, 123):
        first, second = random_model(seed)[0], random_model(seed)[0]
        assert first.SerializeToString() == second.SerializeToString()
    assert random_model(1)[0].SerializeToString() != random_model(2)[0].SerializeToString()


def test_the_slice_covers_the_issue_op_list_opsets_and_variants():
    ops, opsets, variants = Counter(), set(), set()
    for seed in SLICE:
        _, description = random_model(seed)
        ops.update(description.ops)
        opsets.add(description.opset)
        variants |= description.features
    assert ISSUE_OPS <= set(ops), f"missing ops: {sorted(ISSUE_OPS - set(ops))}"
    assert opsets == set(range(11, 22))
    assert ISSUE_VARIANTS <= variants, f"missing variants: {sorted(ISSUE_VARIANTS - variants)}"


@pytest.mark.parametrize("opset_range, op, how", [
    ((11, 12), "Split", "attribute"), ((13, 17), "Split", "input"),
    ((11, 12), "Unsqueeze", "attribute"), ((13, 21), "Unsqueeze", "input"),
])
def test_axes_and_split_follow_the_opset_signature(opset_range, op, how):
    seen = 0
    for seed in CHECKED:
        model, description = random_model(seed)
        if not opset_range[0] <= description.opset <= opset_range[1]:
            continue
        for node in model.graph.node:
            if node.op_type != op:
                continue
            attributes = {a.name for a in node.attribute}
            if how == "attribute":
                assert len(node.input) == 1 and ("split" in attributes or "axes" in attributes or op == "Split")
            elif op == "Unsqueeze":
                assert len(node.input) == 2 and "axes" not in attributes
            else:
                assert "split" not in attributes
            seen += 1
    assert seen, f"no {op} at opsets {opset_range} among the checked seeds"
