"""shuffle_to_gather (channel shuffle -> Gather, for --target ort-cpu) and sum_to_add."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq import io
from onnxq.passes import PREPARE, run, upgrade_opset
from onnxq.passes.shuffle_to_gather import shuffle_indices, shuffle_to_gather
from tests.support.runtime import optimized_session, run_model

SHUFFLENET = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_shufflenet.onnx"
X = np.random.default_rng(0).standard_normal((2, 12, 5, 7)).astype(np.float32)


def _shuffle_model(split: list[int], perm: list[int], merge: list[int], extra_reader: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "split_shape"], ["s"], name="split"),
             helper.make_node("Transpose", ["s"], ["t"], name="transpose", perm=perm),
             helper.make_node("Reshape", ["t", "merge_shape"], ["y"], name="merge")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["s"], ["s_copy"], name="copy"))
        outputs.append(helper.make_tensor_value_info("s_copy", TensorProto.FLOAT, None))
    shapes = [numpy_helper.from_array(np.array(split, np.int64), "split_shape"),
              numpy_helper.from_array(np.array(merge, np.int64), "merge_shape")]
    graph = helper.make_graph(nodes, "shuffle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X.shape))],
                              outputs, shapes)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
    return io.from_graph(shuffle_to_gather(run(io.to_graph(model), PREPARE)), model)


@pytest.mark.parametrize(("split", "merge"), [([2, 3, 4, 5, 7], [2, 12, 5, 7]), ([-1, 3, 4, 5, 7], [0, -1, 5, 7]),
                                              ([0, 4, 3, 5, 7], [2, 12, 5, -1]), ([0, 4, 3, 5, -1], [0, 12, 5, 7])])
def test_a_channel_shuffle_becomes_one_gather_with_the_same_output(split: list[int], merge: list[int]) -> None:
    model = _shuffle_model(split, [0, 2, 1, 3, 4], merge)
    rewritten = _rewrite(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Relu", "Gather"]
    np.testing.assert_array_equal(run_model(rewritten, {"x": X}, optimized=True)[0],
                                  run_model(model, {"x": X}, optimized=True)[0])


def test_indices_interleave_the_groups() -> None:
    # 2 groups of 3: channels (a0 a1 a2 | b0 b1 b2) come out as a0 b0 a1 b1 a2 b2
    assert shuffle_indices(2, 3).tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize(("split", "perm", "merge", "extra_reader"), [
    ([2, 3, 4, 5, 7], [0, 1, 2, 4, 3], [2, 12, 5, 7], False),   # not the group/channel swap
    ([2, 3, 4, 35, 1], [0, 2, 1, 3, 4], [2, 12, 5, 7], False),  # the spatial axes are reshaped too
    ([2, 3, 4, 5, 7], [0, 2, 1, 3, 4], [2, 12, 35, 1], False),
    ([2, 3, 4, 5, 7], [0, 2, 1, 3, 4], [2, 0, 5, 7], False),    # 0 would copy C/G, not C (ONNX runs it as 4)
    ([2, 3, 4, 5, 7], [0, 2, 1, 3, 4], [2, 12, 5, 7], True),    # the split tensor has another reader
])
def test_other_reshape_transpose_chains_are_left_alone(split: list[int], perm: list[int], merge: list[int],
                                                      extra_reader: bool) -> None:
    rewritten = _rewrite(_shuffle_model(split, perm, merge, extra_reader))
    assert "Gather" not in {n.op_type for n in rewritten.graph.node}


def _shufflenet_feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {model.graph.input[0].name: np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}


def test_shufflenet_prepared_for_ort_cpu_has_gathers_and_adds_and_the_same_output() -> None:
    model = onnx.load(SHUFFLENET)
    prepared = io.from_graph(onnxq.prepare(model, onnxq.Target.ORT_CPU), upgrade_opset(model))
    ops = Counter(n.op_type for n in prepared.graph.node)
    assert ops["Gather"] == 16 and ops["Transpose"] == 0 and ops["Reshape"] == 1, ops  # the classifier's flatten
    assert ops["Add"] == 13 and ops["Sum"] == 0, ops  # the residual Sums
    assert Counter(n.op_type for n in io.from_graph(onnxq.prepare(model)).graph.node)["Gather"] == 0  # trt: as is
    feed = _shufflenet_feed(model)
    np.testing.assert_allclose(run_model(prepared, feed, optimized=True)[0], run_model(model, feed, optimized=True)[0],
                               rtol=1e-5, atol=1e-6)


def test_shufflenet_ort_cpu_runs_integer_kernels_without_5d_transposes(tmp_path: Path) -> None:
    model = onnx.load(SHUFFLENET)
    feed = _shufflenet_feed(model)
    result = onnxq.quantize(model, onnxq.FeedsSource([feed]), onnxq.QuantConfig(target=onnxq.Target.ORT_CPU))
    session, ops = optimized_session(result.model, tmp_path)
    assert ops["QLinearConv"] == 49 and ops["QLinearAdd"] == 13 and ops["Gather"] == 16, ops
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert all(len(n.attribute[0].ints) == 4 for n in optimized.graph.node if n.op_type == "Transpose")
    reference = run_model(model, feed, optimized=True)[0]
    quantized = session.run(None, feed)[0]
    assert float((reference * quantized).sum() / np.linalg.norm(reference) / np.linalg.norm(quantized)) > 0.99


def _dynamic_batch_shuffle(batch_index: int = 0) -> onnx.ModelProto:
    """A shuffle as PyTorch exports `x.view(x.size(0), 3, 4, h, w)` for a model with a free batch."""
    def ints(name: str, values: object) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "index"], ["n"], name="gather_n", axis=0),
             helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"], name="unsqueeze_n"),
             helper.make_node("Concat", ["n1", "split_rest"], ["split_shape"], name="concat_split", axis=0),
             helper.make_node("Reshape", ["r", "split_shape"], ["s"], name="split"),
             helper.make_node("Transpose", ["s"], ["t"], name="transpose", perm=[0, 2, 1, 3, 4]),
             helper.make_node("Concat", ["n1", "merge_rest"], ["merge_shape"], name="concat_merge", axis=0),
             helper.make_node("Reshape", ["t", "merge_shape"], ["y"], name="merge")]
    constants = [ints("index", batch_index), ints("axis0", [0]), ints("split_rest", [3, 4, 5, 7]),
                 ints("merge_rest", [-1, 5, 7])]
    graph = helper.make_graph(nodes, "dynamic_shuffle",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_dynamic_batch_shuffle_computed_from_the_shape_becomes_a_gather() -> None:
    model = _dynamic_batch_shuffle()
    rewritten = _rewrite(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Relu", "Gather"]
    x = np.random.default_rng(2).standard_normal((3, 12, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(run_model(rewritten, {"x": x}, optimized=True)[0],
                                  run_model(model, {"x": x}, optimized=True)[0])


def test_a_computed_shape_that_is_not_the_batch_is_left_alone() -> None:
    # x.size(1) where the batch belongs: not a channel shuffle of the batch (ONNX would fail at run time)
    assert "Gather" not in {n.op_type for n in _rewrite(_dynamic_batch_shuffle(batch_index=1)).graph.node
                            if n.name.endswith("_shuffle")}
