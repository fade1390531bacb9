"""`max` calibration reading channel maxima out of ORT: which tensors qualify, and identical statistics."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.calib.calibrate import calibrate
from onnxq.data.sources import input_specs, open_source
from onnxq.data.images import ImagePreprocess
from onnxq.calib.in_graph_max import plan_in_graph_max
from onnxq.calib.stats import MaxStats
from tests.support.paths import MODELS



def _conv(name: str, source: str, out: str, channels: int) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    weight = np.random.default_rng(len(name)).standard_normal((channels, channels, 1, 1)).astype(np.float32)
    return helper.make_node("Conv", [source, f"{name}_w"], [out], name=name), numpy_helper.from_array(weight, f"{name}_w")


def _small_cnn() -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Clip(-1, 1) -> Conv -> Clip(0, 6) -> Add(x) -> Conv -> y."""
    convs = {name: _conv(name, source, out, 16) for name, source, out in
             (("c1", "x", "c1_out"), ("c2", "relu", "c2_out"), ("c3", "clip_signed", "c3_out"), ("c4", "sum", "y"))}
    nodes = [
        convs["c1"][0], helper.make_node("Relu", ["c1_out"], ["relu"], name="relu"),
        convs["c2"][0], helper.make_node("Clip", ["c2_out", "minus_one", "one"], ["clip_signed"], name="clip_signed"),
        convs["c3"][0], helper.make_node("Clip", ["c3_out", "zero", "six"], ["clip_relu6"], name="clip_relu6"),
        helper.make_node("Add", ["clip_relu6", "x"], ["sum"], name="add"), convs["c4"][0],
    ]
    weights = [weight for _, weight in convs.values()]
    weights += [numpy_helper.from_array(np.array(v, np.float32), n)
                for n, v in (("minus_one", -1.0), ("one", 1.0), ("zero", 0.0), ("six", 6.0))]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 8, 8])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def test_only_nonnegative_feature_maps_are_reduced_in_graph() -> None:
    graph = onnxq.prepare(_small_cnn())
    decisions = {d.tensor_name: d for d in plan_in_graph_max(graph, ["x", "relu", "clip_signed", "clip_relu6", "sum", "y"])}
    assert {n for n, d in decisions.items() if d.in_graph} == {"relu", "clip_relu6"}
    assert "graph input" in decisions["x"].reason
    assert "negative" in decisions["clip_signed"].reason and "negative" in decisions["sum"].reason
    assert "graph output" in decisions["y"].reason
    assert all(d.reason for d in decisions.values())


def test_rank_and_spatial_size_keep_a_tensor_whole() -> None:
    x = gs.Variable("x", np.float32, ["n", 8])
    flat, pooled, pooled_relu, y = (gs.Variable("flat", np.float32, ["n", 8]), gs.Variable("pooled", np.float32, ["n", 8, 1, 1]),
                                    gs.Variable("pooled_relu", np.float32, ["n", 8, 1, 1]), gs.Variable("y", np.float32, None))
    graph = gs.Graph(nodes=[gs.Node("Relu", inputs=[x], outputs=[flat]),
                            gs.Node("Reshape", inputs=[flat, gs.Constant("shape", np.array([-1, 8, 1, 1]))], outputs=[pooled]),
                            gs.Node("Relu", inputs=[pooled], outputs=[pooled_relu]),
                            gs.Node("Identity", inputs=[pooled_relu], outputs=[y])], inputs=[x], outputs=[y])
    decisions = {d.tensor_name: d for d in plan_in_graph_max(graph, ["flat", "pooled_relu"])}
    assert not decisions["flat"].in_graph and "rank 2" in decisions["flat"].reason
    assert not decisions["pooled_relu"].in_graph and "1x1 spatial" in decisions["pooled_relu"].reason


def _max_stats(graph: gs.Graph, names: list[str], source: onnxq.CalibSource, in_graph: bool,
               batch_size: int = 8) -> dict[str, MaxStats]:
    result = calibrate(graph, names, source, onnxq.CalibConfig(batch_size=batch_size), in_graph_max=in_graph)
    return dict(result.stats)  # type: ignore[arg-type]


def test_efficientnet_lite0_statistics_equal_the_full_read() -> None:
    model = onnx.load(MODELS / "efficientnet_lite0.onnx")
    graph = onnxq.prepare(model)
    names = list(onnxq.plan_quantization(graph).activation_names)
    assert sum(d.in_graph for d in plan_in_graph_max(graph, names)) == 33  # the ReLU6 outputs
    preprocess = ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)
    source = open_source(MODELS / "data" / "photos" / "calib", input_specs(model), preprocess)
    arrays = [feed for _, feed in zip(range(2), source.batches(10))]  # 20 photos: uneven slices too
    full = _max_stats(graph, names, onnxq.FeedsSource(arrays), in_graph=False, batch_size=10)
    reduced = _max_stats(graph, names, onnxq.FeedsSource(arrays), in_graph=True, batch_size=10)
    assert full.keys() == reduced.keys()
    for name in names:
        assert asdict(reduced[name]) == asdict(full[name]), name
    assert all(full[n].low == 0.0 and full[n].amax == full[n].high > 0 for n in names
               if "Clip" in n), "ReLU6 outputs: low 0, amax = high"


@pytest.mark.parametrize("bad", [np.inf, np.nan, -3.0e38])
def test_a_nonfinite_channel_maximum_rereads_the_tensor_whole(bad: float) -> None:
    graph = onnxq.prepare(_small_cnn())
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((3, 16, 8, 8)).astype(np.float32)} for _ in range(4)]
    feeds[2]["x"][1, :, 4, 4] = bad  # reaches every channel of every tensor after the 1x1 convs
    names = ["relu", "clip_signed", "clip_relu6", "sum"]
    full = _max_stats(graph, names, onnxq.FeedsSource(feeds), in_graph=False, batch_size=3)
    reduced = _max_stats(graph, names, onnxq.FeedsSource(feeds), in_graph=True, batch_size=3)
    for name in names:
        assert asdict(reduced[name]) == asdict(full[name]), name
    ignored = full["relu"].nan_count + full["relu"].inf_count + full["relu"].sentinel_count
    if bad == np.inf:
        assert ignored > 0  # Relu(Inf) = Inf: counted, which only the whole read can do
    assert reduced["relu"].num_values + ignored == 4 * 3 * 16 * 64
