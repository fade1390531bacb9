"""Bias correction on the shipped models: the mechanism (each corrected layer's mean output shift per channel
removed), what it changes in the float graph, the written model, the measured effect, the CLI flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.calib.expose import expose_tensors
from onnxq.io import from_graph, to_graph
from onnxq.runtime.session import open_session
from onnxq.steps.bias_correction import measure_shifts
from onnxq.steps.bias_measure import measure, sequential_shift_model
from onnxq.steps.bias_shift import linear_layers
from tests.support.cli import assert_one_line_error, invoke
from tests.support.damaged_mlp import DAMAGED, damaged_mlp, mlp_feeds
from tests.support.paths import MODELS

PHOTOS = MODELS / "data" / "photos"
TEXTLINES = MODELS / "data" / "textlines"
LITE0_PREPROCESS = onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3)


def _lite0() -> onnx.ModelProto:
    return onnxq.load_model(MODELS / "efficientnet_lite0.onnx")


def _ppocr() -> onnx.ModelProto:
    return onnxq.load_model(MODELS / "ppocr_mobile_v2_cls.onnx")


def _photos(folder: str, count: int) -> dict[str, np.ndarray]:
    source = onnxq.open_source(PHOTOS / folder, onnxq.signature_of(_lite0()), LITE0_PREPROCESS)
    return dict(next(iter(source.batches(count))))


def _lines(name: str, count: int) -> dict[str, np.ndarray]:
    return {"x": np.load(TEXTLINES / f"ppocr_cls_{name}.npz")["x"][:count]}


@dataclass
class Seen:
    """What the step saw and left: the float graph before and after, the uncorrected INT8 model, the finding."""

    graph_before: gs.Graph
    graph_after: gs.Graph
    uncorrected: onnx.ModelProto
    finding: object


@dataclass(frozen=True)
class Watched(onnxq.BiasCorrection):
    """Bias correction that records what it saw (it replaces the config's, and runs last like it)."""

    seen: list[Seen] = field(default_factory=list, compare=False)

    def refine(self, job, plan):  # type: ignore[no-untyped-def]
        before, uncorrected = job.graph, job.build(plan)
        chosen, finding = super().refine(job, plan)
        self.seen.append(Seen(before, job.graph, uncorrected, finding))
        return chosen, finding


@dataclass(frozen=True)
class AlwaysKept(Watched):
    """Keeps the correction whatever the held-back samples say."""

    def decide(self, before, after, checked, outputs, goal):  # type: ignore[no-untyped-def]
        return True, "kept: always"


def _fit(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The samples the step measures on without an accuracy target: all but every 4th."""
    keep = np.arange(len(feed["x" if "x" in feed else "input"])) % 4 != 3
    return {name: values[keep] for name, values in feed.items()}


def _channel_means(model: onnx.ModelProto, names: list[str], axes: dict[str, int],
                   feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per channel, each tensor's mean over the feed, in float64, from ONNX Runtime (optimisations off)."""
    exposed = from_graph(expose_tensors(to_graph(model), names), template=model)
    with open_session(exposed) as session:
        values = session.run(feed, names)
    means = {}
    for name in names:
        array = values[name].astype(np.float64)
        axis = axes[name] % array.ndim
        means[name] = array.mean(axis=tuple(i for i in range(array.ndim) if i != axis))
    return means


def _shifts(seen: Seen, written: onnx.ModelProto, plan: onnxq.QuantPlan, feed: dict[str, np.ndarray]):
    """Per corrected layer, mean(float output) - mean(INT8 output) per channel: uncorrected and corrected."""
    layers, _ = linear_layers(seen.graph_before, plan)
    names = [layer.output_name for layer in layers]
    axes = {layer.output_name: layer.channel_axis for layer in layers}
    reference = _channel_means(from_graph(seen.graph_before), names, axes, feed)
    before = _channel_means(seen.uncorrected, names, axes, feed)
    after = _channel_means(written, names, axes, feed)
    return ({n: reference[n] - before[n] for n in names}, {n: reference[n] - after[n] for n in names})


def _largest(shifts: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(values).max()) for values in shifts.values())


def _rms(shifts: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(np.mean(np.concatenate([values ** 2 for values in shifts.values()]))))


@pytest.mark.parametrize("model, feed, target", [
    (_lite0, lambda: _photos("calib", 16), "trt"),
    (_ppocr, lambda: _lines("calib", 32), "ort-cpu"),
], ids=["lite0-trt", "ppocr-ort-cpu"])
def test_the_mean_output_shift_of_every_corrected_layer_is_removed(model, feed, target) -> None:
    """Measured on the samples the shifts were fitted on, in one batch (the sequential correction is then
    exact), per channel of every corrected layer: mean(float output) - mean(INT8 output).

    Before, up to 1.6 (Lite0) and 0.3 (PP-OCR). After, the first layer's is float rounding (trt) or the
    INT32 bias grid (ort-cpu); deeper, what remains (Lite0 RMS 5 % of before, PP-OCR 21 %) is not a bias:
    the written model adds the correction inside the bias where the measurement added it after the layer,
    a float rounding apart, and rounding to INT8 turns such differences into whole steps that grow with
    depth (a quarter of the INT8 codes of Lite0's deepest activations differ between the two by 1-6)."""
    model, feed = model(), feed()
    fit = _fit(feed)
    watched = AlwaysKept()  # the mechanism, whatever the held-back samples say of its effect
    config = onnxq.QuantConfig(target=target, latency_search=False,
                               calib=onnxq.CalibConfig(batch_size=len(next(iter(fit.values())))))
    result = onnxq.quantize(model, onnxq.FeedsSource([feed]), config, steps=[watched])
    (seen,) = watched.seen
    assert isinstance(seen.finding, onnxq.BiasCorrected) and seen.finding.kept, seen.finding
    before, after = _shifts(seen, result.model, result.plan, fit)
    assert len(before) == len(seen.finding.layers) >= 50
    first = next(iter(before))
    assert np.abs(after[first]).max() < 0.01 * np.abs(before[first]).max()
    assert _largest(before) > 0.1
    assert _rms(after) < 0.3 * _rms(before), (_rms(after), _rms(before))


@dataclass(frozen=True)
class SameQdq(onnxq.BiasCorrection):
    """Measures the shifts as the step does, and again on the very model `job.build` writes."""

    pairs: list[tuple[dict, dict]] = field(default_factory=list, compare=False)

    def refine(self, job, plan):  # type: ignore[no-untyped-def]
        layers, _ = linear_layers(job.graph, plan)
        stepped = measure_shifts(job, plan, layers, job.source).means
        model = sequential_shift_model(from_graph(job.graph, template=job.model), job.build(plan), layers)
        built = measure(model, job.source, job.config.calib.batch_size, job.signature).means
        self.pairs.append((stepped, built))
        return super().refine(job, plan)


def test_the_shifts_are_those_of_the_model_quantize_writes_ranges_chosen_by_auto_included() -> None:
    """trt with float32 rest: `job.build` writes the Q/DQ model the step measures, with `--method auto`'s
    chosen ranges (4 of PP-OCR's 65 groups differ from the method's default here)."""
    watched = SameQdq()
    config = onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod.AUTO))
    onnxq.quantize(_ppocr(), onnxq.FeedsSource([_lines("calib", 32)]), config, steps=[watched])
    ((stepped, built),) = watched.pairs
    assert stepped.keys() == built.keys() and len(stepped) == 54
    assert all(np.array_equal(stepped[name], built[name]) for name in stepped)


def test_the_float_graph_changes_by_the_corrections_alone() -> None:
    """Every constant but the corrected biases is the same; each bias moved by the measured correction
    (PP-OCR's MatMul through the constant of its bias Add); the float layer outputs move by exactly that."""
    model, feed = _ppocr(), _lines("calib", 16)
    watched = AlwaysKept()
    result = onnxq.quantize(model, onnxq.FeedsSource([feed]), steps=[watched])
    (seen,) = watched.seen
    assert isinstance(seen.finding, onnxq.BiasCorrected) and seen.finding.kept
    before = {t.name: t for t in seen.graph_before.tensors().values()}
    after = {t.name: t for t in seen.graph_after.tensors().values()}
    assert [n.op for n in seen.graph_before.nodes] == [n.op for n in seen.graph_after.nodes]
    layers, _ = linear_layers(seen.graph_before, result.plan)
    biases = {}
    nodes = {n.name: n for n in seen.graph_before.nodes}
    for layer in layers:
        assert layer.bias_input is not None  # PP-OCR's layers all have a bias
        biases[nodes[layer.bias_node].inputs[layer.bias_input].name] = layer
    assert "fc_0.b_0" in biases and biases["fc_0.b_0"].op_type == "MatMul"
    changed = set()
    for name, tensor in after.items():
        if isinstance(tensor, gs.Constant):
            old, new = np.asarray(before[name].values), np.asarray(tensor.values)
            if name in biases:
                delta = (new.astype(np.float64) - old).reshape(-1)
                largest = next(s for s in seen.finding.layers if s.node_name == biases[name].node_name)
                assert np.abs(delta).max() == pytest.approx(largest.max_abs_shift, rel=1e-3, abs=1e-6)
                changed.add(name)
            else:
                assert np.array_equal(old, new), name
    assert changed == set(biases)
    first = layers[0]
    means = [_channel_means(from_graph(g), [first.output_name], {first.output_name: 1}, feed)[first.output_name]
             for g in (seen.graph_before, seen.graph_after)]
    bias = nodes[first.bias_node].inputs[first.bias_input].name
    delta = np.asarray(after[bias].values, np.float64) - np.asarray(before[bias].values, np.float64)
    np.testing.assert_allclose(means[1] - means[0], delta, atol=1e-5)


def test_the_written_model_is_checked_and_runs_with_optimisations_on_and_off() -> None:
    model, feed = _ppocr(), _lines("calib", 32)
    for target in ("trt", "ort-cpu"):
        config = onnxq.QuantConfig(target=target, latency_search=False)
        result = onnxq.quantize(model, onnxq.FeedsSource([feed]), config, steps=[AlwaysKept()])
        assert result.finding(onnxq.BiasCorrected).kept  # type: ignore[union-attr]
        onnx.checker.check_model(result.model, full_check=True)
        outputs = []
        for optimize in (False, True):  # on: ONNX Runtime's integer kernels for ort-cpu
            with open_session(result.model, optimize=optimize) as session:
                outputs.append(session.run(feed)[session.output_names[0]].astype(np.float64))
        assert np.all(np.isfinite(outputs[0])) and np.all(np.isfinite(outputs[1]))
        cosine = (outputs[0] * outputs[1]).sum() / np.sqrt((outputs[0] ** 2).sum() * (outputs[1] ** 2).sum())
        assert cosine > 0.99 and np.mean(outputs[0].argmax(1) == outputs[1].argmax(1)) >= 0.9


def test_lite0_measured_effect_helps() -> None:
    """32 calibration photos (8 held back), 32 evaluation photos: the correction is kept and brings the
    INT8 model closer to the float one (full data, benchmarks/bias_correction.py: cosine 0.959 -> 0.984)."""
    model, calib, evaluation = _lite0(), _photos("calib", 32), _photos("eval", 32)
    source = onnxq.FeedsSource([calib])
    with_it = onnxq.quantize(model, source, onnxq.QuantConfig(bias_correction=True))
    without = onnxq.quantize(model, source, onnxq.QuantConfig(bias_correction=False))
    found = with_it.finding(onnxq.BiasCorrected)
    assert isinstance(found, onnxq.BiasCorrected) and found.kept and found.fit_samples == 24
    onnx.checker.check_model(with_it.model, full_check=True)
    assert found.after[0].sqnr_db > found.before[0].sqnr_db
    (corrected,) = onnxq.compare_models(model, with_it.model, [evaluation])
    (plain,) = onnxq.compare_models(model, without.model, [evaluation])
    assert corrected.cosine > plain.cosine + 0.01 and corrected.sqnr_db > plain.sqnr_db + 1.0


def test_ppocr_trt_mse_correction_that_does_not_help_is_discarded_and_changes_nothing() -> None:
    """On PP-OCR (trt, mse) the correction lowers the SQNR of the logits on the held-back lines (25.8 -> 24.8
    dB; it would not help on the 200 evaluation lines either, benchmarks/bias_correction.py): it is
    discarded and the model is byte for byte the one without it."""
    model, source = _ppocr(), TEXTLINES / "ppocr_cls_calib.npz"
    mse = onnxq.CalibConfig(method=onnxq.CalibMethod.MSE)
    with_it = onnxq.quantize(model, source, onnxq.QuantConfig(calib=mse, bias_correction=True))
    without = onnxq.quantize(model, source, onnxq.QuantConfig(calib=mse, bias_correction=False))
    found = with_it.finding(onnxq.BiasCorrected)
    assert isinstance(found, onnxq.BiasCorrected) and not found.kept and found.verdict.startswith("discarded")
    assert [m.name for m in found.before] == ["linear_1.tmp_1"]  # the Softmax's input, not the probabilities
    assert with_it.model.SerializeToString() == without.model.SerializeToString()
    assert without.finding(onnxq.BiasCorrected) is None


def _no_bias_model() -> onnx.ModelProto:
    """Conv, Conv, Gemm without biases, and a MatMul (no bias Add) writing the output."""
    rng = np.random.default_rng(0)
    weights = {"w1": (8, 3, 3, 3), "w2": (8, 8, 3, 3), "wg": (16, 8), "wm": (16, 4)}
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal(s)).astype(np.float32), n) for n, s in weights.items()]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg"], ["g"], name="fc", transB=1),
             helper.make_node("Relu", ["g"], ["gr"], name="relu3"),
             helper.make_node("MatMul", ["gr", "wm"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "no_bias",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_layers_without_a_bias_get_one_and_a_bare_matmul_is_left_alone(target: str) -> None:
    model = _no_bias_model()
    x = (np.random.default_rng(1).standard_normal((32, 3, 16, 16)) + 0.5).astype(np.float32)
    result = onnxq.quantize(model, onnxq.FeedsSource([{"x": x}]),
                            onnxq.QuantConfig(target=target, latency_search=False, bias_correction=True))
    found = result.finding(onnxq.BiasCorrected)
    assert isinstance(found, onnxq.BiasCorrected) and found.kept, found
    assert [(layer.node_name, layer.created_bias) for layer in found.layers] == [
        ("conv1", True), ("conv2", True), ("fc", True)]
    assert [name for name, _ in found.skipped] == ["head"] and "no bias Add" in found.skipped[0][1]
    nodes = {n.name: n for n in result.model.graph.node}
    assert all(len(nodes[name].input) == 3 for name in ("conv1", "conv2", "fc"))
    planned = {b.consumer for b in result.plan.biases}
    assert planned == ({"conv1", "conv2", "fc"} if target == "ort-cpu" else set())  # ort-cpu: INT32 biases
    onnx.checker.check_model(result.model, full_check=True)


def test_after_an_accuracy_fallback_only_quantized_layers_are_corrected_and_the_target_still_holds() -> None:
    result = onnxq.quantize(damaged_mlp(), mlp_feeds(64, 1), accuracy=onnxq.AccuracyGoal(min_cosine=0.99),
                            eval_source=mlp_feeds(16, 2))
    assert result.fallback is not None and result.fallback.float_layer_names == (DAMAGED,)
    found = result.finding(onnxq.BiasCorrected)
    assert isinstance(found, onnxq.BiasCorrected)
    assert DAMAGED not in {layer.node_name for layer in found.layers} and len(found.layers) == 3
    assert found.held_back.startswith("16 held-back samples (the accuracy target's")
    (metrics,) = onnxq.compare_models(damaged_mlp(), result.model, mlp_feeds(16, 2).batches(16))
    assert metrics.cosine >= 0.99


def test_cli_flags(tmp_path: Path) -> None:
    model, calib = MODELS / "ppocr_mobile_v2_cls.onnx", TEXTLINES / "ppocr_cls_calib.npz"
    on = invoke("quantize", model, "--calib", calib, "-o", tmp_path / "on.onnx", "--target", "ort-cpu",
                "--no-latency-search", "--bias-correction")
    assert on.code == 0, on
    bias_lines = [line for line in on.stdout.splitlines() if line.startswith("  bias  ")]
    assert len(bias_lines) == 1 and "54 layers (53 Conv, 1 MatMul)" in bias_lines[0]
    assert "kept: SQNR" in on.stdout
    off = invoke("quantize", model, "--calib", calib, "-o", tmp_path / "off.onnx", "--target", "ort-cpu",
                 "--no-latency-search", "--no-bias-correction")
    assert off.code == 0 and "  bias  " not in off.stdout
    api = onnxq.quantize(_ppocr(), calib, onnxq.QuantConfig(target="ort-cpu", latency_search=False,
                                                              bias_correction=False))
    assert (tmp_path / "off.onnx").read_bytes() == api.model.SerializeToString()
    assert (tmp_path / "on.onnx").read_bytes() != api.model.SerializeToString()
    stats = tmp_path / "s.onnxq.npz"
    assert invoke("calibrate", model, "--calib", calib, "-o", stats).code == 0
    refused = invoke("quantize", model, "--stats", stats, "-o", tmp_path / "s.onnx", "--bias-correction")
    assert_one_line_error(refused, 2, "--bias-correction needs --calib")
    default = invoke("quantize", model, "--stats", stats, "-o", tmp_path / "s.onnx")
    assert default.code == 0 and "note         no bias correction: a statistics file holds no samples" in default.stdout


def test_without_the_step_nothing_changes() -> None:
    config = onnxq.QuantConfig(bias_correction=False)
    assert not any(isinstance(step, onnxq.BiasCorrection) for step in onnxq.steps_for(config))
    assert any(isinstance(step, onnxq.BiasCorrection) for step in onnxq.steps_for(onnxq.QuantConfig()))
