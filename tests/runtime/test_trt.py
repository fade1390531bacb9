"""TensorRT builds and runs: what runs everywhere, and a GPU class that needs TensorRT and a CUDA device.

Without TensorRT (the CI machine), stand-in `tensorrt` and CUDA-bindings modules are injected into
`sys.modules`. They only record which calls onnxq makes and route bytes through host memory, so these
tests check onnxq's own logic (version branching, flags, profiles, buffer bookkeeping, CLI behaviour),
never TensorRT's numerics; `TestOnGpu` does that against the real library.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest

import onnxq
from models import BUILDERS, random_feeds
from onnxq.errors import ConfigError, MissingDependencyError, ModelError
from onnxq.runtime.trt.build import BuildConfig, build_engine, layer_precisions, parse_shapes, profiles_for, save_plan
from onnxq.runtime.trt.engine import TrtEngine
from onnxq.runtime.trt.runtime import require_gpu, require_tensorrt, summarize_log
from tests.support.cli import assert_one_line_error, invoke
from tests.support.paths import REPO
from tests.support.runtime import session

OK = SimpleNamespace(value=0, name="cudaSuccess")
JSON_10X = json.dumps({"Layers": [
    {"Name": "quantize", "LayerType": "Reformat", "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
     "Outputs": [{"Format/Datatype": "Row major Int8 format"}]},
    {"Name": "conv1 + relu", "Inputs": [{"Format/Datatype": "Channel major Int8 format where channel % 32 == 0"}],
     "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
    {"Name": "head", "Inputs": [{"Format/Datatype": "Row major linear FP16 format"}]}], "Bindings": ["input"]})
JSON_11X = json.dumps({"Layers": [
    {"Name": "conv", "Inputs": [{"DataType": "Int8", "Format": "Row major linear Int8 format (kLINEAR)"}]},
    {"Name": "softmax", "Inputs": [{"DataType": "Float", "Format": "Row major linear FP32 format (kLINEAR)"}]},
    {"Name": "weights", "Inputs": [], "Outputs": [{"DataType": "Half"}]}], "I/O Tensors": []})


def fake_tensorrt(version: str = "10.13.3.9") -> Any:
    """A stand-in `tensorrt` module recording onnxq's calls in `.calls`; tweak `.parse_ok`, `.plan`, `.inspector`."""
    trt: Any = types.ModuleType("tensorrt")
    trt.__version__, trt.calls, trt.parse_ok, trt.plan, trt.inspector = version, [], True, b"PLAN", JSON_10X
    trt.ILogger = type("ILogger", (), {"__init__": lambda self: None})
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=3)  # not 10.x's real bit: we must look it up
    trt.MemoryPoolType, trt.ProfilingVerbosity = SimpleNamespace(WORKSPACE="WS"), SimpleNamespace(DETAILED="DET")
    trt.LayerInformationFormat = SimpleNamespace(JSON="JSON")

    class Config:
        def __setattr__(self, key: str, value: Any) -> None:
            trt.calls.append(("config", key, value))

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            trt.calls.append(("pool", pool, size))

        def set_flag(self, flag: Any) -> None:
            trt.calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile: Any) -> None:
            trt.calls.append(("profile", profile.shapes))

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> str:
            trt.calls.append(("create_network", flags))
            return "network"

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(lambda: SimpleNamespace(
            shapes={}, set_shape=lambda *a: trt.calls.append(("set_shape", *map(tuple, a[1:]), a[0]))))

        def build_serialized_network(self, network: str, config: Config) -> bytes | None:
            self.logger.log(SimpleNamespace(name="WARNING"), "tactic skipped")
            if trt.plan is None:
                self.logger.log(SimpleNamespace(name="ERROR"), "[network.cpp] Error Code 4: no profile\nmore")
            return trt.plan

    class OnnxParser:
        num_errors = 2

        def __init__(self, network: str, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            trt.calls.append(("parse_from_file", path))
            return trt.parse_ok

        def get_error(self, index: int) -> Any:
            return SimpleNamespace(desc=lambda: "unsupported op", node_name=lambda: "weird_1",
                                   node_operator=lambda: "Weird", node=lambda: 4)

    inspector = SimpleNamespace(get_engine_information=lambda fmt: trt.inspector)
    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda plan: SimpleNamespace(
        create_engine_inspector=lambda: inspector))
    return trt


def fake_cudart(devices: int = 1, status: Any = OK) -> Any:
    """Stand-in CUDA runtime bindings: 'device' memory is host memory, calls are recorded in `.calls`."""
    cudart: Any = SimpleNamespace(calls=[], buffers={})
    cudart.cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H")
    cudart.cudaGetDeviceCount = lambda: (status, devices)

    def malloc(size: int) -> tuple[Any, int]:
        buffer = ctypes.create_string_buffer(size)
        cudart.buffers[ctypes.addressof(buffer)] = buffer
        return OK, ctypes.addressof(buffer)

    def memcpy(dst: int, src: int, count: int, kind: str, stream: int) -> tuple[Any]:
        ctypes.memmove(dst, src, count)
        cudart.calls.append(kind)
        return (OK,)

    cudart.cudaMalloc, cudart.cudaMemcpyAsync = malloc, memcpy
    cudart.cudaFree = lambda address: (cudart.buffers.pop(address), (OK,))[1]
    cudart.cudaStreamCreate, cudart.cudaEventCreate = lambda: (OK, 7), lambda: (OK, object())
    cudart.cudaStreamSynchronize = lambda stream: (cudart.calls.append("sync"), (OK,))[1]
    cudart.cudaStreamDestroy = lambda stream: (cudart.calls.append("destroy"), (OK,))[1]
    cudart.cudaEventRecord = lambda event, stream: (cudart.calls.append("record"), (OK,))[1]
    cudart.cudaEventSynchronize, cudart.cudaEventDestroy = lambda event: (OK,), lambda event: (OK,)
    cudart.cudaEventElapsedTime = lambda start, end: (OK, 1.25)
    return cudart


@pytest.fixture()
def installed(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install the stand-ins; returns a namespace with `.trt` and `.cudart` for the test to inspect."""
    trt, cudart = fake_tensorrt(), fake_cudart()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return SimpleNamespace(trt=trt, cudart=cudart)


@pytest.fixture()
def residual(tmp_path: Path) -> Path:
    path = tmp_path / "residual.onnx"
    onnx.save(BUILDERS["residual_cnn"](), str(path))
    return path


def test_importing_the_package_loads_neither_tensorrt_nor_cuda(tmp_path: Path) -> None:
    for module in ("tensorrt.py", "cuda/__init__.py"):
        (tmp_path / module).parent.mkdir(exist_ok=True)
        (tmp_path / module).write_text("raise SystemExit('imported ' + __name__)\n")
    code = ("import sys, onnxq.runtime.trt, onnxq.runtime.trt.build, onnxq.runtime.trt.engine, onnxq.runtime.trt.runtime, onnxq_cli.build\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda')]\nprint('light')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "light", done.stderr


def test_build_without_tensorrt_fails_with_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, residual: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    before = sorted(residual.parent.iterdir())
    assert_one_line_error(invoke("build", residual), 2, "TensorRT is not installed", "pip install 'onnxq[trt]'")
    # the missing library is reported before the model's own problems (PP-OCR needs --shapes)
    assert_one_line_error(invoke("build", REPO / "models" / "ppocr_mobile_v2_cls.onnx", "-o",
                                 residual.with_suffix(".plan")), 2, "TensorRT is not installed")
    assert sorted(residual.parent.iterdir()) == before


def test_build_without_gpu_or_bindings_names_what_is_missing(monkeypatch: pytest.MonkeyPatch, residual: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    assert_one_line_error(invoke("build", residual), 2, "CUDA Python bindings are not installed", "cuda-python")
    no_device = SimpleNamespace(value=100, name="cudaErrorNoDevice")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_cudart(devices=0, status=no_device))
    assert_one_line_error(invoke("build", residual), 2, "no CUDA GPU visible", "cudaErrorNoDevice")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_cudart(devices=0))
    assert_one_line_error(invoke("build", residual), 2, "no CUDA GPU visible", "finds 0 devices")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("8.6.1"))
    with pytest.raises(MissingDependencyError, match="TensorRT 8.6 is too old"):
        require_tensorrt()


def test_quantize_engine_without_tensorrt_fails_before_calibrating(monkeypatch: pytest.MonkeyPatch,
                                                                   residual: Path) -> None:
    calib = residual.with_name("calib.npz")
    np.savez(calib, **random_feeds(BUILDERS["residual_cnn"](), batch=4, seed=1))
    calibrations: list[object] = []
    # onnxq_cli.quantize imports it from the pipeline when the command runs
    monkeypatch.setattr("onnxq.pipeline.quantize", lambda *a, **k: calibrations.append(a))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    before = sorted(residual.parent.iterdir())
    assert_one_line_error(invoke("quantize", residual, "--calib", calib, "--engine", residual.with_suffix(".plan")),
                          2, "TensorRT is not installed")
    assert calibrations == [] and sorted(residual.parent.iterdir()) == before


@pytest.mark.parametrize(("text", "expected"), [
    ("input:1x3x224x224,mask:1x128", {"input": (1, 3, 224, 224), "mask": (1, 128)}),
    (" x : 2X3 , ", {"x": (2, 3)}), ("input:0:4x5", {"input:0": (4, 5)})])
def test_parse_shapes_reads_names_and_dimensions(text: str, expected: dict[str, tuple[int, ...]]) -> None:
    assert parse_shapes(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "got nothing"), ("input", "is not NAME:DxD"), (":1x3", "is not NAME:DxD"), ("x:", "is not NAME:DxD"),
    ("x:1xax3", "whole numbers"), ("x:1x0", "at least 1"), ("x:1,x:2", "given twice")])
def test_parse_shapes_refuses_bad_text(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_shapes(text)


def test_profiles_cover_only_dynamic_inputs_batch_1_by_default() -> None:
    static = BUILDERS["residual_cnn"]()
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    assert profiles_for(static, {}) == () and profiles_for(static, {"input": (2, 3, 32, 32)}) == ()
    lite = onnx.load(str(REPO / "models" / "efficientnet_lite0.onnx"), load_external_data=False)
    (entry,) = profiles_for(lite, {})
    assert (entry.name, entry.min, entry.opt, entry.max) == ("input", *[(1, 3, 224, 224)] * 3)
    assert profiles_for(lite, {"input": (8, 3, 224, 224)})[0].opt == (8, 3, 224, 224)
    for shapes, message in [({"input": (8, 3, 225, 224)}, "axis 2 is 225, the model fixes it at 224"),
                            ({"input": (8, 3, 224)}, "3 dimensions given"), ({"image": (1,)}, "image is not an input")]:
        with pytest.raises(ConfigError, match=message):
            profiles_for(lite, shapes)


def test_profiles_need_shapes_for_dynamic_height_and_width() -> None:
    ppocr = onnx.load(str(REPO / "models" / "ppocr_mobile_v2_cls.onnx"), load_external_data=False)
    with pytest.raises(ConfigError, match=r"input 'x' has dynamic dimensions besides the batch.*--shapes x:1x3x"):
        profiles_for(ppocr, {})
    (entry,) = profiles_for(ppocr, parse_shapes("x:4x3x48x192"))
    assert entry.min == entry.opt == entry.max == (4, 3, 48, 192)


def test_summarize_log_counts_and_quotes_the_last_error() -> None:
    assert summarize_log([]) == summarize_log([("INFO", "building")]) == "no errors or warnings"
    assert summarize_log([("WARNING", "w")]) == "0 errors, 1 warning"
    entries = [("ERROR", "first"), ("WARNING", "w1"), ("WARNING", "w2"), ("INTERNAL_ERROR", "Assertion x failed\nat y")]
    assert summarize_log(entries) == "2 errors, 2 warnings; last error: Assertion x failed"


def test_layer_precisions_read_both_inspector_schemas() -> None:
    assert layer_precisions(JSON_10X) == {"INT8": 1, "FP16": 1, "FP32": 1}  # the Reformat counts by its input
    assert layer_precisions(JSON_11X) == {"INT8": 1, "FP16": 1, "FP32": 1}
    assert layer_precisions(json.dumps({"Layers": ["conv1", "relu1"]})) == {} == layer_precisions("not json")


@pytest.mark.parametrize(("version", "flags"), [("10.0.1", 1 << 3), ("11.4.0.106", 0)])
def test_build_engine_configures_a_strongly_typed_build(installed: Any, residual: Path, version: str,
                                                        flags: int) -> None:
    installed.trt.__version__ = version
    if version.startswith("11."):
        del installed.trt.NetworkDefinitionCreationFlag  # 11.x must not even look the deprecated flag up
    result = build_engine(residual, BuildConfig(shapes={"input": (4, 3, 32, 32)}, workspace_bytes=1 << 20))
    calls = installed.trt.calls
    assert ("create_network", flags) in calls and ("parse_from_file", str(residual)) in calls
    assert not [call for call in calls if call[0] == "set_flag"]  # no INT8/FP16 builder flags, ever
    assert ("pool", "WS", 1 << 20) in calls and ("config", "profiling_verbosity", "DET") in calls
    assert ("set_shape", *[(4, 3, 32, 32)] * 3, "input") in calls
    assert (result.plan, result.log_summary) == (b"PLAN", "0 errors, 1 warning")
    assert dict(result.layer_precisions) == {"INT8": 1, "FP16": 1, "FP32": 1}


def test_build_engine_failures_name_the_node_or_the_log(installed: Any, residual: Path) -> None:
    installed.trt.parse_ok = False
    with pytest.raises(ModelError, match=r"cannot parse node 'weird_1' \(Weird\): unsupported op \(\+1 more\)"):
        build_engine(residual)
    installed.trt.parse_ok, installed.trt.plan = True, None
    with pytest.raises(ModelError, match=r"could not build an engine \(1 error, 1 warning; last error: .*Code 4: no "
                                         r"profile\)"):
        build_engine(residual)


def test_build_command_writes_the_plan_beside_the_model(installed: Any, residual: Path) -> None:
    code, stdout, stderr = invoke("build", residual, "--workspace-mib", "64")
    plan = residual.with_suffix(".plan")
    assert (code, stderr) == (0, "") and plan.read_bytes() == b"PLAN"
    assert stdout.splitlines()[0] == f"wrote {plan}" and "  layers       INT8 1, FP16 1, FP32 1" in stdout
    assert "  log          0 errors, 1 warning" in stdout and ("pool", "WS", 64 << 20) in installed.trt.calls
    assert sorted(p.name for p in residual.parent.iterdir()) == ["residual.onnx", "residual.plan"]


def test_save_plan_replaces_atomically_and_refuses_a_missing_folder(tmp_path: Path) -> None:
    target = tmp_path / "model.plan"
    target.write_bytes(b"old")
    assert save_plan(b"new plan", target) == target and target.read_bytes() == b"new plan"
    assert [p.name for p in tmp_path.iterdir()] == ["model.plan"]
    with pytest.raises(ModelError, match="does not exist"):
        save_plan(b"x", tmp_path / "missing" / "model.plan")


def fake_engine_module(trt: Any, cudart: Any) -> None:
    """Give the stand-in TensorRT an engine y = x for x of shape (1..8, 4), reading and writing 'device' memory."""
    shapes: dict[str, tuple[int, ...]] = {}
    addresses: dict[str, int] = {}
    trt.TensorIOMode, trt.DataType = SimpleNamespace(INPUT="in", OUTPUT="out"), SimpleNamespace(FLOAT="f32")

    def set_input_shape(name: str, shape: tuple[int, ...]) -> bool:
        trt.calls.append(("set_input_shape", name, tuple(shape)))
        shapes[name] = tuple(shape)
        return len(shape) == 2 and 1 <= shape[0] <= 8 and shape[1] == 4

    def execute(stream: int) -> bool:
        cudart.calls.append("execute")
        ctypes.memmove(addresses["y"], addresses["x"], int(np.prod(shapes["x"])) * 4)
        return True

    context = SimpleNamespace(set_input_shape=set_input_shape, execute_async_v3=execute,
                              set_tensor_address=lambda name, address: addresses.__setitem__(name, address),
                              get_tensor_shape=lambda name: shapes["x"])
    engine = SimpleNamespace(num_io_tensors=2, get_tensor_name=("x", "y").__getitem__,
                             get_tensor_mode=lambda name: "in" if name == "x" else "out",
                             get_tensor_dtype=lambda name: "f32", get_tensor_shape=lambda name: (-1, 4),
                             create_execution_context=lambda: context)
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)


def test_trt_engine_routes_buffers_by_name_and_times_without_copies(installed: Any) -> None:
    fake_engine_module(installed.trt, installed.cudart)
    batch = np.arange(12, dtype=np.float32).reshape(3, 4)
    with TrtEngine(b"PLAN") as engine:
        assert (engine.input_names, engine.output_names) == (("x",), ("y",))
        np.testing.assert_array_equal(engine.run({"x": batch})["y"], batch)
        assert ("set_input_shape", "x", (3, 4)) in installed.trt.calls
        for feed, message in [({"z": batch}, "missing"), ({"x": np.ones((9, 4), np.float32)}, "outside")]:
            with pytest.raises(ConfigError, match=message):
                engine.run(feed)
        installed.cudart.calls.clear()
        milliseconds = engine.time({"x": batch}, warmup=2, iterations=5)
    assert milliseconds.tolist() == [1.25] * 5
    calls = installed.cudart.calls
    timed = calls[calls.index("record"):len(calls) - calls[::-1].index("record")]
    assert timed == ["record", "execute", "record"] * 5  # no host<->device copy inside the timed region
    assert installed.cudart.buffers == {} and calls[-1] == "destroy"


@pytest.fixture(scope="module")
def gpu_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The quantized residual CNN saved to disk and built by the real TensorRT (skips without one)."""
    pytest.importorskip("tensorrt")
    try:
        require_gpu()
    except MissingDependencyError as err:
        pytest.skip(str(err))
    model = BUILDERS["residual_cnn"]()
    source = onnxq.FeedsSource([random_feeds(model, batch=8, seed=seed) for seed in range(4)])
    path = tmp_path_factory.mktemp("trt") / "residual.int8.onnx"
    onnxq.save_model(onnxq.quantize(model, source).model, path)
    return path, build_engine(path, BuildConfig(shapes={"input": (4, 3, 32, 32)}))


@pytest.mark.trt
class TestOnGpu:
    """The real thing: skipped unless TensorRT imports and the CUDA runtime sees a GPU."""

    def test_inspector_reports_int8_layers(self, gpu_build: tuple[Path, Any]) -> None:
        assert gpu_build[1].layer_precisions.get("INT8", 0) > 0, gpu_build[1].layer_precisions

    def test_engine_matches_onnx_runtime_on_the_same_qdq_model(self, gpu_build: tuple[Path, Any]) -> None:
        path, result = gpu_build
        feed = random_feeds(onnx.load(str(path)), batch=4, seed=9)
        reference_session = session(path, optimized=True)
        reference = dict(zip((output.name for output in reference_session.get_outputs()),
                             reference_session.run(None, feed)))
        with TrtEngine(result.plan) as engine:
            outputs = engine.run(feed)
            assert engine.time(feed, warmup=3, iterations=10).min() > 0
        assert sorted(outputs) == sorted(reference) and reference
        for name, expected in reference.items():
            actual = outputs[name]
            a, b = expected.ravel().astype(np.float64), actual.ravel().astype(np.float64)
            assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.99
