"""--target ort-cpu: the written model, and what ONNX Runtime's CPU provider fuses it into.

Fusion is checked on the graph ONNX Runtime itself optimizes and saves (SessionOptions.
optimized_model_filepath): the QLinear kernels must be there and the float ops gone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

import models
import onnxq
from tests.support.paths import MODELS
from tests.support.runtime import optimized_session, run_model

ORT_CPU = onnxq.QuantConfig(target=onnxq.Target.ORT_CPU)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def test_efficientnet_fuses_into_integer_kernels_only(tmp_path: Path) -> None:
    model = onnxq.load_model(MODELS / "efficientnet_lite0.onnx")
    preprocess = onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)
    result = onnxq.quantize(model, MODELS / "data" / "photos" / "calib", ORT_CPU, preprocess=preprocess)
    session, ops = optimized_session(result.model, tmp_path)
    assert ops["QLinearConv"] == 49 and ops["QLinearAdd"] == 9 and ops["QGemm"] == 1, ops
    assert ops["QLinearGlobalAveragePool"] == 1
    assert ops["Conv"] == 0 and ops["Clip"] == 0 and ops["Pad"] == 0, ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] <= 1, ops  # the graph input and output only
    held_out = onnxq.open_source(MODELS / "data" / "photos" / "eval", onnxq.input_specs(model), preprocess)
    x = next(iter(held_out.batches(32)))
    reference = run_model(model, x, optimized=True)[0]
    quantized = session.run(None, x)[0]
    assert _cosine(reference, quantized) > 0.95
    assert np.mean(reference.argmax(1) == quantized.argmax(1)) >= 0.7


def test_written_parameters_follow_the_u8s8_scheme() -> None:
    model = models.BUILDERS["residual_cnn"]()
    feeds = [models.random_feeds(model, batch=4, seed=s) for s in range(3)]
    result = onnxq.quantize(model, onnxq.FeedsSource(feeds), ORT_CPU)
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    producers = {out: n for n in result.model.graph.node for out in n.output}
    for node in result.model.graph.node:
        if node.op_type == "QuantizeLinear":
            assert inits[node.input[2]].dtype == np.uint8 and inits[node.input[1]] > 0
        if node.op_type == "Conv":
            weight_dq, bias_dq = producers[node.input[1]], producers[node.input[2]]
            assert inits[weight_dq.input[0]].dtype == np.int8
            assert inits[bias_dq.input[0]].dtype == np.int32
            # bias scale = input scale x weight scale, per output channel
            input_scale = inits[producers[node.input[0]].input[1]]
            np.testing.assert_allclose(inits[bias_dq.input[1]], input_scale * inits[weight_dq.input[1]], rtol=1e-6)
    relu_inputs = Counter(n.input[0] for n in result.model.graph.node if n.op_type == "Relu")
    assert all(producers[name].op_type != "DequantizeLinear" for name in relu_inputs)  # Q after the Relu


@pytest.mark.parametrize(("name", "fused"), [
    ("residual_cnn", {"QLinearConv": 6, "QLinearAdd": 2, "QGemm": 1}),
    ("concat_branches", {"QLinearConv": 5, "QLinearConcat": 1, "QGemm": 1}),
    ("yolo_neck_head", {"QLinearConv": 9, "QLinearConcat": 3}),
    # projections: MatMulIntegerToFloat (their bias Add is float, so their outputs stay float); attention
    # measured by the attention step, kept float on this encoder
    ("transformer_encoder", {"MatMulIntegerToFloat": 12, "QLinearMatMul": 0, "Softmax": 2}),
])
def test_synthetic_models_fuse_and_stay_close_to_float(name: str, fused: dict[str, int], tmp_path: Path) -> None:
    model = models.BUILDERS[name]()
    feeds = [models.random_feeds(model, batch=4, seed=s) for s in range(3)]
    result = onnxq.quantize(model, onnxq.FeedsSource(feeds), ORT_CPU)
    session, ops = optimized_session(result.model, tmp_path)
    for op_type, count in fused.items():
        assert ops[op_type] == count, ops
    held_out = models.random_feeds(model, batch=4, seed=99)
    reference = run_model(model, held_out, optimized=True)
    assert _cosine(reference[0], session.run(None, held_out)[0]) > 0.99


def test_attention_mask_stays_float_on_ort() -> None:
    plan = onnxq.inspect(models.BUILDERS["transformer_encoder"](), target=onnxq.Target.ORT_CPU)
    assert not any(name.startswith("mask/") for name in plan.activation_names)
    assert "mask" in plan.decision("layer1/attn/add_mask").reason


def test_attention_stays_float_for_ort_cpu_when_asked(tmp_path: Path) -> None:
    model = models.BUILDERS["transformer_encoder"]()
    feeds = [models.random_feeds(model, batch=4, seed=s) for s in range(3)]
    config = onnxq.QuantConfig(target=onnxq.Target.ORT_CPU, selection=onnxq.Selection(quantize_attention=False))
    _, ops = optimized_session(onnxq.quantize(model, onnxq.FeedsSource(feeds), config).model, tmp_path)
    assert ops["QLinearMatMul"] == 0 and ops["MatMulIntegerToFloat"] == 12, ops  # the projections only
    asked = replace(config, selection=onnxq.Selection(quantize_attention=True))
    (tmp_path / "asked").mkdir()
    _, ops = optimized_session(onnxq.quantize(model, onnxq.FeedsSource(feeds), asked).model, tmp_path / "asked")
    # Q.K^T feeds the float Softmax (MatMulIntegerToFloat), P.V the integer output projection
    assert ops["QLinearMatMul"] == 2 and ops["MatMulIntegerToFloat"] == 14, ops
