"""The synthetic test models: valid, runnable, deterministic, shaped the way the quantizer expects."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import BUILDERS, DEFAULT_SYMBOLIC_DIM, light_model_paths, random_feeds
from tests.support.runtime import session

FLOAT32_MIN = np.finfo(np.float32).min


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values, by tensor name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op_type]


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    (node,) = [node for node in model.graph.node if node.name == name]
    return node


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _declared_shape(value: onnx.ValueInfoProto, batch: int) -> tuple[int, ...]:
    symbols = {"N": batch, "S": DEFAULT_SYMBOLIC_DIM}
    return tuple(d.dim_value or symbols[d.dim_param] for d in value.type.tensor_type.shape.dim)


@pytest.fixture(scope="module")
def built() -> dict[str, onnx.ModelProto]:
    return {name: build() for name, build in BUILDERS.items()}


# -- every builder ------------------------------------------------------------------------------


def test_registry_lists_every_model():
    assert sorted(BUILDERS) == sorted([
        "residual_cnn", "depthwise_cnn", "conv_transpose", "gemm_mlp", "yolo_neck_head",
        "transformer_encoder", "conv_bn_constant_weights", "concat_branches", "outlier_encoder",
        "separable_relu_cnn",
    ])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_passes_full_checker_with_lowest_ir_version(built, name):
    model = built[name]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == helper.find_min_ir_version_for(model.opset_import)
    assert model.graph.name == name


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_runs_in_ort_with_declared_shapes_and_finite_outputs(built, name):
    model = built[name]
    runner = session(model, optimized=True)
    for batch in (1, 3):
        outputs = runner.run(None, random_feeds(model, batch=batch, seed=batch))
        for value, result in zip(model.graph.output, outputs, strict=True):
            assert result.shape == _declared_shape(value, batch), value.name
            assert np.isfinite(result).all(), value.name
            assert np.abs(result).max() > 0, f"{value.name} is all zeros"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_inputs_and_outputs_have_dynamic_batch(built, name):
    for value in [*built[name].graph.input, *built[name].graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "N", value.name


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_same_seed_gives_identical_bytes(name):
    assert BUILDERS[name](seed=3).SerializeToString() == BUILDERS[name](seed=3).SerializeToString()
    assert BUILDERS[name]().SerializeToString() == BUILDERS[name](seed=0).SerializeToString()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_different_seed_changes_every_weight(name):
    first, second = _constants(BUILDERS[name](seed=0)), _constants(BUILDERS[name](seed=1))
    assert first.keys() == second.keys()
    weights = [key for key in first if key.endswith(".weight")]
    assert weights
    for key in weights:
        assert not np.array_equal(first[key], second[key]), key


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_node_names_are_unique_and_outputs_follow_them(built, name):
    model = built[name]
    names = [node.name for node in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    graph_outputs = {value.name for value in model.graph.output}
    for node in model.graph.node:
        for index, output in enumerate(node.output):
            if node.op_type != "Constant" and output not in graph_outputs:
                assert output == f"{node.name}_output_{index}"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_parameter_is_used_and_biases_are_nonzero(built, name):
    model = built[name]
    consumed = {tensor for node in model.graph.node for tensor in node.input}
    for tensor_name, value in _constants(model).items():
        assert tensor_name in consumed, f"{tensor_name} is never used"
        if tensor_name.endswith(".bias"):
            assert np.all(value != 0), tensor_name


# -- structure the quantizer's tests rely on --------------------------------------------------


def test_residual_cnn_has_two_residual_adds_and_unfolded_bn(built):
    model = built["residual_cnn"]
    constants = _constants(model)
    adds = _nodes(model, "Add")
    assert [node.name for node in adds] == ["block1/add", "block2/add"]
    for node in adds:
        assert len(node.input) == 2 and not set(node.input) & constants.keys()
    assert len(_nodes(model, "BatchNormalization")) == 6
    assert len(_node(model, "stem/conv").input) == 3  # with bias
    assert len(_node(model, "block1/conv1").input) == 2  # bias-free before BN
    shortcut = _node(model, "block2/shortcut_conv")
    assert _attr(shortcut, "kernel_shape") == [1, 1] and _attr(shortcut, "strides") == [2, 2]
    assert _attr(_node(model, "head/fc"), "transB") == 1


def test_depthwise_cnn_has_depthwise_conv_and_clip_bounds_as_inputs(built):
    model = built["depthwise_cnn"]
    constants = _constants(model)
    depthwise = _node(model, "block/depthwise_conv")
    assert _attr(depthwise, "group") == 64
    assert constants[depthwise.input[1]].shape == (64, 1, 3, 3)
    clips = _nodes(model, "Clip")
    assert len(clips) == 3
    for node in clips:
        assert float(constants[node.input[1]]) == 0.0 and float(constants[node.input[2]]) == 6.0
    add = _node(model, "block/add")
    assert _producers(model)[add.input[1]].name == "stem/relu6"


def test_conv_transpose_has_plain_and_grouped_deconvolutions(built):
    model = built["conv_transpose"]
    constants = _constants(model)
    plain, grouped = _nodes(model, "ConvTranspose")
    assert _attr(plain, "group", 1) == 1 and constants[plain.input[1]].shape == (16, 8, 2, 2)
    assert _attr(grouped, "group") == 2 and constants[grouped.input[1]].shape == (8, 2, 3, 3)
    assert grouped.output[0] == "output"


def test_gemm_mlp_has_both_gemm_layouts_and_matmul_add(built):
    model = built["gemm_mlp"]
    constants = _constants(model)
    gemms = _nodes(model, "Gemm")
    assert [_attr(node, "transB", 0) for node in gemms] == [1, 0]
    assert [constants[node.input[1]].shape for node in gemms] == [(128, 64), (128, 32)]
    (matmul,) = _nodes(model, "MatMul")
    assert constants[matmul.input[1]].shape == (32, 10)
    (add,) = _nodes(model, "Add")
    assert add.input[0] == matmul.output[0] and constants[add.input[1]].shape == (10,)


def test_yolo_has_silu_c2f_sppf_resize_and_two_heads(built):
    model = built["yolo_neck_head"]
    constants, producers = _constants(model), _producers(model)
    assert len(model.graph.node) <= 40 and not _nodes(model, "BatchNormalization")
    silu_muls = [
        node for node in _nodes(model, "Mul")
        if producers[node.input[1]].op_type == "Sigmoid"
        and producers[node.input[1]].input[0] == node.input[0]
    ]
    assert len(silu_muls) == len(_nodes(model, "Conv")) - 2  # all but the two head convs
    assert len(_nodes(model, "Split")) == 1
    bottleneck_add = _node(model, "c2f/bottleneck/add")
    assert not set(bottleneck_add.input) & constants.keys()
    pools = _nodes(model, "MaxPool")
    assert len(pools) == 3 and pools[1].input[0] == pools[0].output[0]
    for node in pools:
        assert (_attr(node, "kernel_shape"), _attr(node, "strides"), _attr(node, "pads")) == (
            [5, 5], [1, 1], [2, 2, 2, 2]
        )
    assert len(_node(model, "sppf/concat").input) == 4
    (resize,) = _nodes(model, "Resize")
    assert _attr(resize, "mode") == b"nearest"
    np.testing.assert_array_equal(constants[resize.input[2]], [1, 1, 2, 2])
    assert _node(model, "detect/concat").input == [
        "detect/p3/sigmoid_output_0", "detect/p4/sigmoid_output_0"
    ]


def test_conv_bn_constant_weights_has_only_constant_nodes_at_opset_11(built):
    model = built["conv_bn_constant_weights"]
    assert len(model.graph.initializer) == 0
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 11)]
    assert model.ir_version == 6
    producers = _producers(model)
    for node in [*_nodes(model, "Conv"), *_nodes(model, "BatchNormalization")]:
        assert all(producers[name].op_type == "Constant" for name in node.input[1:]), node.name
    add = _node(model, "block/add")
    assert producers[add.input[1]].name == "block/relu1"


def test_concat_branches_joins_three_relu_branches(built):
    model = built["concat_branches"]
    producers = _producers(model)
    concat = _node(model, "merge/concat")
    assert [producers[name].name for name in concat.input] == [
        "branch1x1/relu", "branch3x3/relu", "branch_pool/relu"
    ]
    pool = _node(model, "branch_pool/maxpool")
    assert (_attr(pool, "kernel_shape"), _attr(pool, "pads")) == ([3, 3], [1, 1, 1, 1])
    assert _attr(_node(model, "head/fc"), "transB") == 1


# -- transformer mask path ----------------------------------------------------------------------


def test_transformer_mask_constant_is_float32_min(built):
    model = built["transformer_encoder"]
    scale = _node(model, "mask/scale")
    assert _constants(model)[scale.input[1]] == FLOAT32_MIN
    assert len(_nodes(model, "LayerNormalization")) == 4
    assert len(_nodes(model, "Softmax")) == 2 and len(_nodes(model, "Erf")) == 2


def test_transformer_mask_tensor_carries_float32_min_at_padding(built):
    model = onnx.ModelProto()
    model.CopyFrom(built["transformer_encoder"])
    model.graph.output.append(
        helper.make_tensor_value_info("mask/scale_output_0", TensorProto.FLOAT, ["N", "S"])
    )
    feeds = random_feeds(model, batch=3)
    hidden, additive_mask = session(model, optimized=True).run(None, feeds)
    padded = feeds["mask"] == 0
    assert padded.any() and np.isfinite(hidden).all()
    assert np.all(additive_mask[padded] == FLOAT32_MIN)
    assert np.all(additive_mask[~padded] == 0)


def test_transformer_padded_tokens_do_not_change_kept_outputs(built):
    model = built["transformer_encoder"]
    runner = session(model, optimized=True)
    feeds = random_feeds(model, batch=2, seed=5)
    kept = feeds["mask"] == 1
    altered = dict(feeds, tokens=np.where(kept[..., None], feeds["tokens"], 100.0).astype(np.float32))
    (original,) = runner.run(None, feeds)
    (changed,) = runner.run(None, altered)
    np.testing.assert_allclose(changed[kept], original[kept], atol=1e-5)
    assert not np.allclose(changed[~kept], original[~kept])


# -- random_feeds and light_model_paths ---------------------------------------------------------


def test_random_feeds_mask_pads_every_row_but_keeps_a_prefix(built):
    feeds = random_feeds(built["transformer_encoder"], batch=4, dims={"S": 7})
    assert feeds["tokens"].shape == (4, 7, 32) and feeds["tokens"].dtype == np.float32
    mask = feeds["mask"]
    assert mask.shape == (4, 7) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    for row in mask:
        kept = int(row.sum())
        assert 1 <= kept < 7 and np.all(row[:kept] == 1)


def test_random_feeds_is_seeded(built):
    model = built["residual_cnn"]
    same = random_feeds(model, seed=4)["input"], random_feeds(model, seed=4)["input"]
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(same[0], random_feeds(model, seed=5)["input"])
    assert same[0].shape == (2, 3, 32, 32)


def test_random_feeds_fills_integer_and_bool_inputs_and_skips_initializers():
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["ids"], ["ids_out"], name="ids_identity"),
            helper.make_node("Identity", ["flags"], ["flags_out"], name="flags_identity"),
        ],
        "typed_inputs",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"]),
            helper.make_tensor_value_info("flags", TensorProto.BOOL, [5]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["N", "T"])],
        [numpy_helper.from_array(np.ones(3, np.float32), "bias")],
    )
    feeds = random_feeds(helper.make_model(graph), batch=3, seed=1)
    assert sorted(feeds) == ["flags", "ids"]
    ids = feeds["ids"]
    assert ids.shape == (3, DEFAULT_SYMBOLIC_DIM) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 16 and len(np.unique(ids)) > 1
    assert feeds["flags"].dtype == np.bool_ and feeds["flags"].shape == (5,)


def test_light_model_paths_lists_existing_onnx_files():
    paths = light_model_paths()
    assert paths == sorted(paths)
    assert all(path.suffix == ".onnx" and path.is_file() for path in paths)
    if paths:
        assert len(paths) == 9
        assert "light_resnet50.onnx" in {path.name for path in paths}
