"""ModelSignature: each input's sample axis and the fixed batch, computed once from a model or its graph,
and cutting, selecting and joining samples along each input's own axis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxq import prepare
from onnxq.config import Target
from onnxq.data.feeds import FeedsSource
from onnxq.data.signature import InputSpec, ModelSignature, input_specs, signature_of
from onnxq.data.sources import open_source
from onnxq.errors import CalibrationError

from tests.support.paths import MODELS
F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)


def _model(inputs: list[tuple[str, int, list]]) -> onnx.ModelProto:
    """Identity of each input, as an output of its own."""
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs]
    graph = helper.make_graph(nodes, "inputs", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


SHIPPED = {
    "efficientnet_lite0": ((InputSpec("input", F32, (None, 3, 224, 224)),), {"input": 0}),
    "ppocr_mobile_v2_cls": ((InputSpec("x", F32, (None, 3, None, None)),), {"x": 0}),
    "silero_vad": ((InputSpec("input", F32, (None, None)), InputSpec("state", F32, (2, None, 128)),
                    InputSpec("sr", I64, ())), {"input": 0, "state": 1}),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_signature_of_each_shipped_model(name: str) -> None:
    model = onnx.load(MODELS / f"{name}.onnx")
    signature = signature_of(model)
    inputs, axes = SHIPPED[name]
    assert signature.inputs == inputs and dict(signature.sample_axes) == axes
    assert signature.fixed_batch is None and signature.batch_size(8) == 8
    assert input_specs(model) == signature.inputs


@pytest.mark.parametrize("target", [Target.TRT, Target.ORT_CPU])
@pytest.mark.parametrize("name", SHIPPED)
def test_the_prepared_graph_has_the_models_signature(name: str, target: Target) -> None:
    model = onnx.load(MODELS / f"{name}.onnx")
    assert signature_of(prepare(model, target)) == signature_of(model)


def test_a_fixed_batch_is_the_batch_of_every_batched_input() -> None:
    model = _model([("x", TensorProto.FLOAT, [4, 16]), ("mask", TensorProto.INT64, [4, 16]),
                    ("sr", TensorProto.INT64, [])])
    signature = signature_of(model)
    assert signature.fixed_batch == 4 and signature.batch_size(32) == 4
    assert dict(signature.sample_axes) == {"x": 0, "mask": 0}
    assert signature_of(prepare(model)) == signature


@pytest.mark.parametrize("shapes", [[[4, 16], ["N", 16]], [[4, 16], [2, 16]], [[]]])
def test_no_fixed_batch_when_an_input_leaves_it_free_or_they_disagree(shapes: list[list]) -> None:
    signature = signature_of(_model([(f"x{i}", TensorProto.FLOAT, shape) for i, shape in enumerate(shapes)]))
    assert signature.fixed_batch is None and signature.batch_size(5) == 5


def test_hand_made_specs_get_the_models_sample_axes() -> None:
    state = InputSpec("state", F32, (2, None, 128))
    beside_free_batch = ModelSignature((state, InputSpec("x", F32, (None, 16))))
    assert dict(beside_free_batch.sample_axes) == {"state": 1, "x": 0}
    assert beside_free_batch.spec("state").sample_axis == 1
    assert dict(ModelSignature((state,)).sample_axes) == {"state": 0}  # nothing else is free: axis 0 is the batch
    assert ModelSignature.of([state]) == ModelSignature((state,))
    with pytest.raises(KeyError):
        beside_free_batch.spec("nowhere")
    with pytest.raises(TypeError):
        beside_free_batch.sample_axes["x"] = 1  # type: ignore[index]


def test_cut_select_and_join_follow_the_states_axis_1(silero_signature, vad_feed, vad_labels) -> None:
    feed = vad_feed(6)
    assert silero_signature.samples_in(feed) == 6
    middle = silero_signature.cut(feed, 1, 4)
    assert middle["state"].shape == (2, 3, 128) and middle["input"].shape == (3, 512)
    assert vad_labels([middle]) == [1, 2, 3]
    chosen = silero_signature.select(feed, np.array([True, False, False, True, True, False]))
    assert vad_labels([chosen]) == [0, 3, 4]
    joined = silero_signature.join([silero_signature.cut(feed, 0, 2), silero_signature.cut(feed, 2, 6)])
    assert all(np.array_equal(joined[name], feed[name]) for name in feed)
    assert vad_labels([silero_signature.join([chosen, middle])]) == [0, 3, 4, 1, 2, 3]
    with pytest.raises(CalibrationError, match="'input' holds 6 samples along axis 0"):
        silero_signature.select(feed, np.ones(5, bool))
    with pytest.raises(CalibrationError):
        silero_signature.join([])


def test_feeds_source_batches_by_the_signature(silero_signature, vad_feed, vad_labels) -> None:
    source = FeedsSource([vad_feed(5), vad_feed(7, first=5)], signature=silero_signature)
    assert source.signature is silero_signature and source.num_samples() == 12
    batches = list(source.batches(5))
    assert [b["state"].shape for b in batches] == [(2, 5, 128), (2, 5, 128), (2, 2, 128)]
    assert vad_labels(batches) == list(range(12))
    with pytest.raises(CalibrationError, match="feed 0: input 'state' has dtype float64"):
        FeedsSource([{**vad_feed(2), "state": vad_feed(2)["state"].astype(np.float64)}], signature=silero_signature)


def test_feeds_source_sample_axes_still_works_but_warns(silero_signature, vad_feed, vad_labels) -> None:
    with pytest.warns(DeprecationWarning, match="signature="):
        source = FeedsSource([vad_feed(5), vad_feed(7, first=5)], sample_axes={"state": 1})
    assert dict(source.signature.sample_axes) == {"input": 0, "state": 1}
    assert vad_labels(source.batches(5)) == list(range(12))
    assert dict(FeedsSource([vad_feed(3)]).signature.sample_axes) == {"input": 0, "state": 0}  # no model: axis 0


def test_open_source_takes_a_signature_or_specs(silero_signature, vad_feed, vad_labels, tmp_path: Path) -> None:
    np.savez(tmp_path / "vad.npz", **vad_feed(9))
    for given in (silero_signature, silero_signature.inputs):
        source = open_source(tmp_path / "vad.npz", given)
        assert source.signature == silero_signature and source.num_samples() == 9
        assert vad_labels(source.batches(4)) == list(range(9))
