"""Models over 2 GB, on a small model: the large-model threshold is lowered so a ~1 MB MLP whose weights
sit in external data takes the same path a > 2 GB model takes (benchmarks/large_model.py runs a real one).

Protobuf cannot serialize a ModelProto of 2 GiB, so on that path no model above the threshold may reach
shape inference, the checker, `onnx.save_model` or ONNX Runtime as a proto or as bytes: the guards below
fail the test if one does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.checker
import onnx.shape_inference
import onnx_graphsurgeon as gs
import onnxruntime
import pytest
from onnx import TensorProto, helper

import onnxq
import onnxq.external_data as external_data
import onnxq.io
import onnxq.mapped_weights as mapped_weights
import onnxq.runtime.session
from onnxq.calib.stats_file import model_digest
from onnxq.errors import ConfigError, ModelError
from onnxq.passes.smooth_sites import smoothquant_candidates
from onnxq.steps.base import StepSkipped
from onnxq.steps.bias_correction import BiasCorrected
from onnxq.steps.equalize import Equalized
from onnxq.steps.smoothquant import Smoothed
from tests.support.cli import invoke

_SAVE_MODEL = onnx.save_model  # the test's own writes are not under the guards below
THRESHOLD = 100_000  # bytes of tensors; the MLP below has ~800 kB
WIDTH, LAYERS = 128, 12


def write_mlp(folder: Path, name: str = "mlp.onnx") -> Path:
    """A MatMul/Add/Relu MLP saved with its weights in `<name>.data` beside it."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for i in range(LAYERS):
        weights += [onnx.numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH), np.float32) / WIDTH**0.5, f"w{i}"),
                    onnx.numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32) * 0.1, f"b{i}")]
        source, out = ("x" if i == 0 else f"h{i - 1}"), ("y" if i == LAYERS - 1 else f"a{i}")
        nodes += [helper.make_node("MatMul", [source, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [out], name=f"add{i}")]
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = folder / name
    _SAVE_MODEL(model, os.fspath(path), save_as_external_data=True, location=name + ".data")
    return path


def write_calib(folder: Path) -> Path:
    path = folder / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((8, WIDTH)).astype(np.float32))
    return path


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Lower the threshold and fail on any proto or bytes above it handed to protobuf-serializing calls.
    Returns the list of routes the guards saw taken (e.g. 'checker: path')."""
    monkeypatch.setattr(external_data, "LARGE_MODEL_BYTES", THRESHOLD)
    seen: list[str] = []

    def guard(what: str, model: object) -> None:
        if isinstance(model, onnx.ModelProto):
            assert model.ByteSize() <= THRESHOLD, f"{what} was given a {model.ByteSize()}-byte ModelProto"
            seen.append(f"{what}: small proto")
        elif isinstance(model, bytes):
            assert len(model) <= THRESHOLD, f"{what} was given {len(model)} serialized bytes"
            seen.append(f"{what}: small bytes")
        else:
            seen.append(f"{what}: path")

    def wrap(module: object, name: str) -> None:
        original = getattr(module, name)

        def guarded(model: object, *args: object, **kwargs: object) -> object:
            guard(name, model)
            return original(model, *args, **kwargs)

        monkeypatch.setattr(module, name, guarded)

    wrap(onnx.shape_inference, "infer_shapes")
    wrap(onnx.checker, "check_model")
    wrap(onnx, "save_model")
    wrap(onnxruntime, "InferenceSession")
    return seen


def run_from_path(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(os.fspath(path), options).run(None, feed)[0]


def test_cli_quantizes_a_large_model_through_files_only(tmp_path: Path, large: list[str]) -> None:
    model_path, calib = write_mlp(tmp_path), write_calib(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, stderr = invoke("quantize", model_path, "--calib", calib, "-o", out / "mlp.int8.onnx")
    assert code == 0, stderr
    assert "wrote" in stdout
    assert "no bias correction by default on a large model (tensors over" in stdout  # its ~8x peak is opt-in
    # Every route taken was a file or a proto below the threshold (the guards assert it), and the
    # file-based routes were taken: ORT sessions from a path, the checker on a path.
    assert "InferenceSession: path" in large and "check_model: path" in large
    # The weights sit beside the output, named after it, referred to by that bare name; nothing else is left.
    assert sorted(p.name for p in out.iterdir()) == ["mlp.int8.onnx", "mlp.int8.onnx.data"]
    light = onnx.load(os.fspath(out / "mlp.int8.onnx"), load_external_data=False)
    locations = {e.value for t in light.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"mlp.int8.onnx.data"}
    onnx.checker.check_model(os.fspath(out / "mlp.int8.onnx"), full_check=True)
    assert {n.op_type for n in light.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    # The input is untouched.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_large_path_gives_the_same_model_as_the_in_memory_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """The file-based path is a route, not a different result: both quantize to the same numbers."""
    model_path, calib = write_mlp(tmp_path), write_calib(tmp_path)
    config = onnxq.QuantConfig(smoothquant=False, bias_correction=False)
    onnxq.io.save_model(onnxq.quantize(model_path, calib, config).model, tmp_path / "small.onnx")
    monkeypatch.setattr(external_data, "LARGE_MODEL_BYTES", THRESHOLD)
    big = onnxq.quantize(model_path, calib, config).model
    assert external_data.is_large(big)
    onnxq.io.save_model(big, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists() and not (tmp_path / "small.onnx.data").exists()
    feed = {"x": np.random.default_rng(2).standard_normal((4, WIDTH)).astype(np.float32)}
    np.testing.assert_array_equal(run_from_path(tmp_path / "big.onnx", feed), run_from_path(tmp_path / "small.onnx", feed))
    reference = run_from_path(model_path, feed)
    quantized = run_from_path(tmp_path / "big.onnx", feed)
    cosine = np.sum(reference * quantized) / (np.linalg.norm(reference) * np.linalg.norm(quantized))
    assert cosine > 0.999


def test_shape_inference_runs_on_a_large_model_and_keeps_its_weights(tmp_path: Path, large: list[str]) -> None:
    model_path = write_mlp(tmp_path)
    graph = onnxq.io.to_graph(onnxq.load_model(model_path))
    assert "infer_shapes: small proto" in large
    assert graph.tensors()["m3"].dtype == np.float32 and graph.tensors()["m3"].shape == ["N", WIDTH]
    expected = onnx.numpy_helper.to_array(onnx.load(os.fspath(model_path)).graph.initializer[0])
    np.testing.assert_array_equal(graph.tensors()["w0"].values, expected)


def test_a_failed_save_leaves_the_previous_output_and_no_half_written_files(tmp_path: Path, large: list[str],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnxq.load_model(write_mlp(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_bytes(b"previous model")
    (out / "m.onnx.data").write_bytes(b"previous weights")

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", disk_full)  # the weights are written, the model file is not
    with pytest.raises(ModelError, match="m.onnx: cannot write the model .No space left on device."):
        onnxq.io.save_model(model, out / "m.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (out / "m.onnx").read_bytes() == b"previous model"
    assert (out / "m.onnx.data").read_bytes() == b"previous weights"


def test_save_never_replaces_the_weights_the_input_model_reads(tmp_path: Path, large: list[str]) -> None:
    """An input `a.onnx` whose weights are in `b.onnx.data`: writing `b.onnx` must not replace them."""
    source = write_mlp(tmp_path, "b.onnx")
    source.rename(tmp_path / "a.onnx")
    weights = (tmp_path / "b.onnx.data").read_bytes()
    model = onnxq.load_model(tmp_path / "a.onnx")
    with pytest.raises(ModelError, match="b.onnx.data, which the input model reads"):
        onnxq.io.save_model(model, tmp_path / "b.onnx", keep=onnxq.io.external_data_files(tmp_path / "a.onnx"))
    assert (tmp_path / "b.onnx.data").read_bytes() == weights
    assert not (tmp_path / "b.onnx").exists()


def test_saving_leaves_the_model_in_memory_as_it_was(tmp_path: Path, large: list[str]) -> None:
    model = onnxq.load_model(write_mlp(tmp_path))
    before = model.SerializeToString()
    onnxq.io.save_model(model, tmp_path / "copy.onnx")
    assert model.SerializeToString() == before


def test_threshold_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(external_data, "LARGE_MODEL_BYTES", None)
    monkeypatch.setenv("ONNXQ_LARGE_MODEL_BYTES", "12345")
    assert external_data.threshold() == 12345
    monkeypatch.delenv("ONNXQ_LARGE_MODEL_BYTES")
    assert external_data.threshold() == int(1.9 * 1024**3)
    monkeypatch.setenv("ONNXQ_LARGE_MODEL_BYTES", "2GB")
    with pytest.raises(ConfigError, match="ONNXQ_LARGE_MODEL_BYTES='2GB'"):
        external_data.threshold()


def test_a_session_on_a_large_graph_runs_on_the_graphs_own_arrays(tmp_path: Path, large: list[str]) -> None:
    """Calibration opens sessions on graphs: a large graph's weights reach ONNX Runtime without a copy."""
    model_path = write_mlp(tmp_path)
    graph = onnxq.io.to_graph(onnxq.load_model(model_path))
    loaded = graph.tensors()["w0"].values  # a weight the graph holds as an array (as after SmoothQuant)
    feed = {"x": np.random.default_rng(3).standard_normal((2, WIDTH)).astype(np.float32)}
    with onnxq.runtime.session.open_session(graph) as session:
        assert any(shared is loaded for shared in session._shared)
        np.testing.assert_allclose(session.run(feed)["y"], run_from_path(model_path, feed), rtol=1e-5, atol=1e-5)
    assert "InferenceSession: path" in large


def test_cli_refuses_an_output_whose_weights_file_the_input_reads(tmp_path: Path, large: list[str]) -> None:
    source = write_mlp(tmp_path, "b.onnx")
    source.rename(tmp_path / "a.onnx")
    weights = (tmp_path / "b.onnx.data").read_bytes()
    code, stdout, stderr = invoke("quantize", tmp_path / "a.onnx", "--calib", write_calib(tmp_path),
                                  "-o", tmp_path / "b.onnx")
    assert code == 1 and stdout == ""
    assert stderr.count("\n") == 1 and "b.onnx.data, which the input model reads" in stderr
    assert (tmp_path / "b.onnx.data").read_bytes() == weights and not (tmp_path / "b.onnx").exists()


def test_bias_correction_asked_for_still_runs_on_a_large_model(tmp_path: Path, large: list[str]) -> None:
    model_path, calib = write_mlp(tmp_path), write_calib(tmp_path)
    result = onnxq.quantize(model_path, calib, onnxq.QuantConfig(smoothquant=False, bias_correction=True))
    assert result.finding(BiasCorrected) is not None
    assert not any(isinstance(f, StepSkipped) and f.step == "bias correction" for f in result.findings)


def test_weights_in_typed_fields_are_written_out_and_read_back(tmp_path: Path, large: list[str]) -> None:
    """A tensor stored as float_data / int64_data (not raw_data) goes to the weights file too."""
    weights = np.random.default_rng(4).standard_normal((200, 200)).astype(np.float32)
    shape = np.array([1, 40000], np.int64)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])],
        "typed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [200, 200])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [40000, 1], weights.reshape(-1).tolist()),
         helper.make_tensor("shape", TensorProto.INT64, [2], shape.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert not model.graph.initializer[0].HasField("raw_data")
    onnxq.io.save_model(model, tmp_path / "typed.onnx")
    light = onnx.load(os.fspath(tmp_path / "typed.onnx"), load_external_data=False)
    assert light.graph.initializer[0].data_location == TensorProto.EXTERNAL
    reloaded = onnx.load(os.fspath(tmp_path / "typed.onnx"))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(reloaded.graph.initializer[0]).reshape(200, 200), weights)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(reloaded.graph.initializer[1]), shape)


def test_the_skeleton_check_still_finds_a_tensor_too_short_for_its_shape(large: list[str]) -> None:
    tensor = onnx.numpy_helper.from_array(np.ones((300, 300), np.float32), "w")
    tensor.raw_data = tensor.raw_data[:-4]
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "short", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300, 300])], [tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(ModelError, match="tensor 'w' holds a different number of bytes"):
        onnxq.io.check_model(model)


def test_smoothquant_analysis_leaves_a_large_graphs_weights_in_the_model(tmp_path: Path, large: list[str]) -> None:
    """Finding SmoothQuant's sites needs the weights' shapes only: loading them would copy every weight of a
    large model into the graph beside the model's own (+1x its size for the whole run)."""
    graph = onnxq.io.to_graph(onnxq.load_model(write_mlp(tmp_path)))
    candidates = smoothquant_candidates(graph)
    assert len(candidates) == LAYERS  # every MatMul's activation input was analysed
    weights = [graph.tensors()[f"w{i}"] for i in range(LAYERS)]
    assert all(isinstance(w._values, gs.ir.tensor.LazyValues) for w in weights)


@pytest.mark.parametrize("target", [onnxq.TRT, onnxq.ORT_CPU], ids=str)
def test_planning_leaves_a_large_graphs_weights_in_the_model(tmp_path: Path, large: list[str],
                                                             target: onnxq.QuantTarget) -> None:
    """The plan needs each weight's type and rank only: loading the values would copy every weight of a large
    model into the graph beside the model's own (+1x its size for the rest of the run)."""
    graph = onnxq.prepare(onnxq.load_model(write_mlp(tmp_path)), target)
    plan = target.plan(graph, onnxq.Selection())
    assert sorted(w.tensor_name for w in plan.weights) == sorted(f"w{i}" for i in range(LAYERS))
    weights = [graph.tensors()[f"w{i}"] for i in range(LAYERS)]
    assert all(isinstance(w._values, gs.ir.tensor.LazyValues) for w in weights)


# --- Weights left in the input's data file (onnxq.mapped_weights): same output, input untouched -------------

def write_convnet(folder: Path, name: str = "conv.onnx") -> Path:
    """Conv -> Relu -> Conv -> Relu -> Conv (pairs cross-layer equalization rewrites), weights beside it."""
    rng = np.random.default_rng(5)
    channels = [8, 48, 48, 48]
    nodes, weights = [], []
    for i in range(3):
        scale = rng.uniform(0.1, 4.0, size=(channels[i + 1], 1, 1, 1)).astype(np.float32)  # unequal ranges
        weights += [onnx.numpy_helper.from_array(
                        rng.standard_normal((channels[i + 1], channels[i], 3, 3)).astype(np.float32) * scale / 8, f"cw{i}"),
                    onnx.numpy_helper.from_array(rng.standard_normal(channels[i + 1]).astype(np.float32) * 0.1, f"cb{i}")]
        source, out = ("x" if i == 0 else f"r{i - 1}"), ("y" if i == 2 else f"c{i}")
        nodes.append(helper.make_node("Conv", [source, f"cw{i}", f"cb{i}"], [out], name=f"conv{i}", pads=[1, 1, 1, 1]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48, 12, 12])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = folder / name
    _SAVE_MODEL(model, os.fspath(path), save_as_external_data=True, location=name + ".data")
    np.savez(folder / "conv_calib.npz", x=np.random.default_rng(6).standard_normal((16, 8, 12, 12)).astype(np.float32))
    return path


def write_tied_mlp(folder: Path, name: str = "tied.onnx") -> Path:
    """x -> MatMul(w) -> Relu -> MatMul(w) -> MatMul(v) -> y: `w` read by two MatMuls (one tensor, tied), and
    activations with a few large channels (what SmoothQuant moves into the weights)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / WIDTH**0.5
    v = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / WIDTH**0.5
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m0"], name="first"),
             helper.make_node("Relu", ["m0"], ["h0"], name="relu"),
             helper.make_node("MatMul", ["h0", "w"], ["m1"], name="second"),
             helper.make_node("MatMul", ["m1", "v"], ["y"], name="third")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(v, "v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = folder / name
    _SAVE_MODEL(model, os.fspath(path), save_as_external_data=True, location=name + ".data")
    samples = rng.standard_normal((64, WIDTH)).astype(np.float32)
    samples[:, :4] *= 30.0  # outlier channels
    np.savez(folder / "tied_calib.npz", x=samples)
    return path


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_same_model(a: Path, b: Path) -> None:
    """The same nodes, and the same initializers bit for bit (names, types, shapes, bytes)."""
    first, second = onnx.load(os.fspath(a)), onnx.load(os.fspath(b))
    assert list(first.graph.node) == list(second.graph.node)
    tensors = [{t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer} for m in (first, second)]
    assert tensors[0].keys() == tensors[1].keys()
    for name, values in tensors[0].items():
        other = tensors[1][name]
        assert values.dtype == other.dtype and values.shape == other.shape, name
        assert values.tobytes() == other.tobytes(), f"initializer '{name}' differs"


def _quantize_both_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_path: Path, calib: Path,
                        config: onnxq.QuantConfig) -> tuple[onnxq.QuantResult, onnxq.QuantResult]:
    """Quantize in memory (threshold as shipped) then on the large path, saving `small.onnx` and `big.onnx`;
    the input folder's files must be byte-identical afterwards."""
    inputs = _file_bytes(model_path.parent)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    small = onnxq.quantize(model_path, calib, config)
    onnxq.io.save_model(small.model, out / "small.onnx")
    monkeypatch.setattr(external_data, "LARGE_MODEL_BYTES", THRESHOLD)
    model = onnxq.load_model(model_path)
    assert any(mapped_weights.is_mapped(t) for t in model.graph.initializer)  # the weights stay in the file
    big = onnxq.quantize(model, calib, config)
    onnxq.io.save_model(big.model, out / "big.onnx", keep=onnxq.io.external_data_files(model_path))
    monkeypatch.setattr(external_data, "LARGE_MODEL_BYTES", None)
    assert_same_model(out / "small.onnx", out / "big.onnx")
    assert _file_bytes(model_path.parent) == inputs
    return small, big


def test_the_large_path_writes_the_in_memory_paths_model_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    model_path, calib = write_mlp(folder), write_calib(folder)
    # bias correction rewrites the biases; a kept-float layer keeps its weight as a reference to the input
    config = onnxq.QuantConfig(bias_correction=True, selection=onnxq.Selection(exclude_node_patterns=("matmul5$",)))
    small, big = _quantize_both_ways(tmp_path, monkeypatch, model_path, calib, config)
    corrected = big.finding(BiasCorrected)
    assert isinstance(corrected, BiasCorrected) and corrected.layers
    assert (small.finding(BiasCorrected).layers, small.finding(BiasCorrected).kept) == (  # type: ignore[union-attr]
        corrected.layers, corrected.kept)
    # The float weight the excluded layer reads went from the input's file to the output's, unchanged.
    light = onnx.load(os.fspath(tmp_path / "out" / "big.onnx"), load_external_data=False)
    assert {t.name: t.data_location for t in light.graph.initializer}["w5"] == TensorProto.EXTERNAL
    original = onnx.load(os.fspath(model_path))
    written = onnx.load(os.fspath(tmp_path / "out" / "big.onnx"))
    np.testing.assert_array_equal(*(onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w5"))
                                    for m in (original, written)))


@pytest.mark.parametrize("smoothquant", [0.5, False], ids=["smoothed", "untouched"])
def test_the_large_path_matches_with_a_tied_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   smoothquant: float | bool) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    model_path = write_tied_mlp(folder)
    config = onnxq.QuantConfig(smoothquant=smoothquant, bias_correction=False)
    small, big = _quantize_both_ways(tmp_path, monkeypatch, model_path, folder / "tied_calib.npz", config)
    smoothed = big.finding(Smoothed)
    if smoothquant:
        assert isinstance(smoothed, Smoothed) and "h0" in smoothed.tensors  # the tied weight was rewritten
        assert small.finding(Smoothed).tensors == smoothed.tensors  # type: ignore[union-attr]
    else:
        assert smoothed is None


def test_the_large_path_matches_with_cross_layer_equalization(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    model_path = write_convnet(folder)
    config = onnxq.QuantConfig(equalize=True, smoothquant=False, bias_correction=True)
    small, big = _quantize_both_ways(tmp_path, monkeypatch, model_path, folder / "conv_calib.npz", config)
    equalized = big.finding(Equalized)
    assert isinstance(equalized, Equalized) and any(p.equalized for p in equalized.conv_pairs)
    assert isinstance(big.finding(BiasCorrected), BiasCorrected)


def test_a_statistics_file_fits_the_model_on_either_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model digest a statistics file is checked against reads weights left in the file the same."""
    model_path = write_mlp(tmp_path)
    digest = model_digest(onnxq.load_model(model_path))
    monkeypatch.setattr(external_data, "LARGE_MODEL_BYTES", THRESHOLD)
    model = onnxq.load_model(model_path)
    assert any(mapped_weights.is_mapped(t) for t in model.graph.initializer)
    assert model_digest(model) == digest


def test_loading_a_large_model_leaves_its_weights_in_the_file(tmp_path: Path, large: list[str]) -> None:
    model = onnxq.load_model(write_mlp(tmp_path))
    weights = [t for t in model.graph.initializer if t.name.startswith("w")]
    assert weights and all(mapped_weights.is_mapped(t) and not t.HasField("raw_data") for t in weights)
    assert external_data.is_large(model)  # their size counts, though nothing of them is in memory
    biases = [t for t in model.graph.initializer if t.name.startswith("b")]  # below MAP_FROM_BYTES: loaded
    assert all(t.HasField("raw_data") and t.data_location == TensorProto.DEFAULT for t in biases)


def test_saving_over_the_inputs_data_file_is_refused_without_being_told(tmp_path: Path, large: list[str]) -> None:
    """An output whose `<name>.data` is the file a loaded model's weights are read from is refused even when
    the caller does not list that file in `keep` (the model itself says where its weights are)."""
    source = write_mlp(tmp_path, "b.onnx")
    source.rename(tmp_path / "a.onnx")
    before = _file_bytes(tmp_path)
    model = onnxq.load_model(tmp_path / "a.onnx")
    with pytest.raises(ModelError, match="b.onnx.data, which the input model reads"):
        onnxq.io.save_model(model, tmp_path / "b.onnx")
    assert _file_bytes(tmp_path) == before


def test_a_large_model_whose_data_file_is_too_short_is_refused(tmp_path: Path, large: list[str]) -> None:
    model_path = write_mlp(tmp_path)
    data = tmp_path / "mlp.onnx.data"
    data.write_bytes(data.read_bytes()[:-1000])
    with pytest.raises(ModelError, match=r"tensor '\w+' cannot be read: its bytes .* lie beyond the end of mlp.onnx.data"):
        onnxq.load_model(model_path)
