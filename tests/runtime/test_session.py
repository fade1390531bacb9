"""Tests for onnxq.runtime.session: provider names, CPU fallback, session options, copies, errors."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime
import pytest
from onnx import TensorProto, helper

from onnxq import external_data
from onnxq.runtime import session as session_module
from onnxq.runtime.session import PROVIDER_ALIASES, Session, open_session, resolve_providers
from onnxq.errors import ConfigError, ModelError
from tests.support.paths import MODELS

EFFICIENTNET = MODELS / "efficientnet_lite0.onnx"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def passthrough_model() -> onnx.ModelProto:
    """x[2,3] is a graph output itself and also goes through Identity and Add (+ a constant) to y."""
    bias = onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["x_copy"], name="identity"),
            helper.make_node("Add", ["x_copy", "bias"], ["y"], name="add_bias"),
        ],
        "passthrough",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
        ],
        [bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def reshape_model(target_shape: list[int]) -> onnx.ModelProto:
    """x[N] -> Reshape(target_shape) -> y, so the node fails at run time for most N."""
    shape = onnx.numpy_helper.from_array(np.array(target_shape, np.int64), "target_shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "target_shape"], ["y"], name="bad_reshape")],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


# --- provider names ---------------------------------------------------------------------------


def test_aliases_resolve_to_full_names_in_order_without_duplicates() -> None:
    resolved = resolve_providers(["CUDA", "trt", "tensorrt", "cpu", "CUDAExecutionProvider", "dml"])
    assert resolved == (CUDA, "TensorrtExecutionProvider", CPU, "DmlExecutionProvider")


def test_every_alias_names_a_provider_onnxruntime_knows() -> None:
    assert set(PROVIDER_ALIASES.values()) <= set(onnxruntime.get_all_providers())
    assert resolve_providers(["openvino", "coreml"]) == ("OpenVINOExecutionProvider", "CoreMLExecutionProvider")


def test_full_names_pass_through() -> None:
    assert resolve_providers([CPU]) == (CPU,)


def test_unknown_provider_is_a_config_error_with_a_hint() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_providers(["cpu", "cdua"])
    message = str(caught.value)
    assert "'cdua'" in message
    assert "did you mean 'cuda'" in message
    assert CPU in message  # the available list
    assert "\n" not in message


def test_provider_not_in_this_build_is_a_config_error() -> None:
    missing = [p for p in onnxruntime.get_all_providers() if p not in onnxruntime.get_available_providers()]
    if not missing:
        pytest.skip("every execution provider is available in this onnxruntime build")
    with pytest.raises(ConfigError, match=missing[0]):
        open_session(passthrough_model(), [missing[0]])


# --- CPU fallback -----------------------------------------------------------------------------


def test_cuda_that_cannot_load_falls_back_to_cpu_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    if CUDA not in onnxruntime.get_available_providers():
        pytest.skip("CUDAExecutionProvider is not even listed as available by this onnxruntime build")
    with caplog.at_level(logging.WARNING, logger="onnxq.runtime.session"):
        session = open_session(passthrough_model(), (CUDA, CPU))
    if CUDA in session.providers:
        pytest.skip("CUDA loaded: this machine has a usable GPU")
    assert session.providers == (CPU,)
    assert session.requested == (CUDA, CPU)
    assert session.unloaded_providers == (CUDA,)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{CUDA} was requested but could not be loaded; running on {CPU}"]


def test_cpu_is_appended_as_the_last_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    passed: list[Any] = []
    real_session_class = onnxruntime.InferenceSession

    def recording_session(*args: Any, **kwargs: Any) -> onnxruntime.InferenceSession:
        passed.append(kwargs["providers"])
        return real_session_class(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    open_session(passthrough_model(), ["cpu"])
    session = open_session(passthrough_model(), ["cuda"])
    assert passed == [[CPU], [CUDA, CPU]]
    assert session.requested == (CUDA,)  # what the caller asked for, without the automatic fallback


def test_cpu_only_session_reports_no_unloaded_providers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxq.runtime.session"):
        session = open_session(passthrough_model())
    assert session.providers == (CPU,)
    assert session.unloaded_providers == ()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- options, names, outputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimize", "level"),
    [
        (False, onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL),
        (True, onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL),
    ],
)
def test_optimize_flag_sets_the_graph_optimization_level(
    optimize: bool, level: onnxruntime.GraphOptimizationLevel
) -> None:
    session = open_session(passthrough_model(), optimize=optimize, intra_op_threads=1)
    options = session.ort_session.get_session_options()
    assert options.graph_optimization_level == level
    assert options.intra_op_num_threads == 1


@pytest.mark.parametrize(
    ("kwargs", "allow_spinning", "force_stop", "arena"),
    [
        ({}, "", "", True),
        ({"spin": False}, "0", "", True),
        ({"spin_after_run": False, "arena": False}, "", "1", False),
    ],
)
def test_spinning_and_arena_options_reach_onnxruntime(kwargs: dict, allow_spinning: str, force_stop: str,
                                                      arena: bool) -> None:
    options = open_session(passthrough_model(), **kwargs).ort_session.get_session_options()

    def entry(key: str) -> str:
        try:
            return options.get_session_config_entry(key)
        except Exception:  # onnxruntime raises for a key that was never set
            return ""
    assert entry("session.intra_op.allow_spinning") == allow_spinning
    assert entry("session.force_spinning_stop") == force_stop
    assert options.enable_cpu_mem_arena is arena


def test_names_and_outputs() -> None:
    session = open_session(passthrough_model())
    assert session.input_names == ("x",)
    assert session.output_names == ("x", "y")
    x = np.ones((2, 3), np.float32)
    outputs = session.run({"x": x})
    assert list(outputs) == ["x", "y"]
    np.testing.assert_array_equal(outputs["y"], 1 + np.arange(6, dtype=np.float32).reshape(2, 3))
    assert list(session.run({"x": x}, ["y"])) == ["y"]


def test_output_that_is_a_graph_input_is_a_copy() -> None:
    session = open_session(passthrough_model())
    x = np.ones((2, 3), np.float32)
    outputs = session.run({"x": x})
    x[0, 0] = 42.0
    assert outputs["x"][0, 0] == 1.0
    assert outputs["y"][0, 0] == 1.0
    assert not any(np.shares_memory(array, x) for array in outputs.values())


def test_output_aliasing_an_input_is_copied_even_if_onnxruntime_returns_it() -> None:
    class AliasingSession:
        """Stands in for an ORT session that hands back the caller's input buffer."""

        def get_outputs(self) -> list[Any]:
            return [SimpleNamespace(name="x")]

        def run(self, names: list[str], feed: dict[str, np.ndarray], options: Any) -> list[np.ndarray]:
            return [feed["x"]]

    x = np.arange(3, dtype=np.float32)
    outputs = Session(ort_session=AliasingSession(), requested=(CPU,)).run({"x": x})  # type: ignore[arg-type]
    np.testing.assert_array_equal(outputs["x"], x)
    assert not np.shares_memory(outputs["x"], x)


# --- errors -----------------------------------------------------------------------------------


def test_wrong_input_shape_is_a_model_error_with_the_shapes() -> None:
    session = open_session(EFFICIENTNET)
    with pytest.raises(ModelError) as caught:
        session.run({"input": np.zeros((1, 3, 100, 224), np.float32)})
    message = str(caught.value)
    assert "input float32(1, 3, 100, 224)" in message
    assert "Expected: 224" in message
    assert "\n" not in message and "[ONNXRuntimeError]" not in message


def test_failing_node_is_named_in_the_model_error() -> None:
    session = open_session(reshape_model([5]))
    with pytest.raises(ModelError) as caught:
        session.run({"x": np.zeros(2, np.float32)})
    message = str(caught.value)
    assert message.startswith("node 'bad_reshape' (Reshape): ")
    assert "cannot be reshaped" in message
    assert ".cc:" not in message and ".h:" not in message and "onnxruntime::" not in message
    assert "\n" not in message


def test_invalid_model_is_a_one_line_model_error() -> None:
    model = reshape_model([2])
    model.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(ModelError, match="no_such_tensor") as caught:
        open_session(model)
    assert "\n" not in str(caught.value)


def test_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing.onnx"):
        open_session(tmp_path / "missing.onnx")


# --- models too large for protobuf ------------------------------------------------------------


def test_large_model_goes_through_external_data_and_is_cleaned_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(external_data, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(external_data, "MIN_EXTERNAL_TENSOR_BYTES", 1)
    model = passthrough_model()
    with open_session(model) as session:
        assert session._temp_dir is not None
        temp_dir = Path(session._temp_dir.name)
        assert sorted(os.listdir(temp_dir)) == ["model.onnx", "model.onnx.data"]
        outputs = session.run({"x": np.zeros((2, 3), np.float32)})
        np.testing.assert_array_equal(outputs["y"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not temp_dir.exists()
    # The caller's model keeps its weights inline.
    assert model.graph.initializer[0].data_location == TensorProto.DEFAULT
    assert len(model.graph.initializer[0].raw_data) == 6 * 4


def test_large_model_temp_dir_is_removed_when_the_session_is_collected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(external_data, "LARGE_MODEL_BYTES", 0)
    session = open_session(passthrough_model())
    assert session._temp_dir is not None
    temp_dir = Path(session._temp_dir.name)
    assert temp_dir.exists()
    del session
    gc.collect()
    assert not temp_dir.exists()


def test_small_model_needs_no_temp_dir() -> None:
    with open_session(passthrough_model()) as session:
        assert session._temp_dir is None
