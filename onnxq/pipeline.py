"""The quantization pipeline, spelled out once: load → prepare → plan → calibrate → write back → check."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxq.calib.calibrate import CalibrationResult, ProgressCallback, calibrate, model_batch_size
from onnxq.data.sources import CalibSource, input_specs, open_source
from onnxq.data.images import ImagePreprocess
from onnxq.calib.channel_absmax import channel_absmax
from onnxq.calib.histogram import Histogram
from onnxq.calib.ranges import activation_params, group_amax
from onnxq.calib.stats_file import StatsFile, load_stats, model_digest
from onnxq.config import AccuracyTarget, HighPrecision, QuantConfig, Selection, Target
from onnxq.errors import CalibrationError, ConfigError, ModelError
from onnxq.steps.accuracy.fallback import FallbackResult, run_accuracy
from onnxq.io import check_model, from_graph, load_model, to_graph
from onnxq.passes import PREPARE, GraphPass, run
from onnxq.lower.gate_qdq import LayerMap
from onnxq.lower.insert_qdq import insert_qdq
from onnxq.passes.name_nodes import name_nodes
from onnxq.passes.shuffle_to_gather import shuffle_to_gather
from onnxq.passes.smoothquant import smoothquant, smoothquant_targets
from onnxq.lower.to_fp16 import FP16_MIN_OPSET, to_fp16, upgrade_graph_opset
from onnxq.passes.upgrade_opset import upgrade_opset
from onnxq.plan.core import QuantPlan, plan_quantization
from onnxq.steps.latency_search import LatencySearch, LatencySearchConfig, search_latency
from onnxq.steps.accuracy.sensitivity import SensitivityResult, held_back_sources

__all__ = ["QuantResult", "prepare", "inspect", "quantize", "collect_stats", "group_amax"]

ModelLike = onnx.ModelProto | str | os.PathLike[str]

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"})


@dataclass(frozen=True)
class QuantResult:
    """The quantized model and how it was made (`sensitivity`, `fallback`: with an accuracy target)."""

    model: onnx.ModelProto
    plan: QuantPlan
    calibration: CalibrationResult
    group_amax: Mapping[str, float]
    seconds: float
    sensitivity: SensitivityResult | None = None
    fallback: FallbackResult | None = None
    latency: LatencySearch | None = None


def _as_model(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(Path(model))


# Rewrites that pay off on one target's runtime only (see each pass's measurements).
TARGET_PREPARE: dict[Target, tuple[GraphPass, ...]] = {Target.ORT_CPU: (shuffle_to_gather,)}


def prepare(model: ModelLike, target: Target | None = None) -> gs.Graph:
    """Upgrade to opset >= 13, import, move Constant weights to initializers, fold constants and BN;
    then the rewrites for `target`'s runtime, if any."""
    model = _as_model(model)
    already = sorted({n.op_type for n in model.graph.node} & _QDQ_OPS)
    if already:
        raise ModelError(f"the model is already quantized (contains {', '.join(already)})")
    target_passes = TARGET_PREPARE.get(target, ()) if target is not None else ()
    return run(to_graph(upgrade_opset(model)), (*PREPARE, *target_passes, name_nodes))


def inspect(model: ModelLike, selection: Selection = Selection(), target: Target = Target.TRT) -> QuantPlan:
    """The quantization plan for `model`, without calibrating."""
    return plan_quantization(prepare(model, target), selection, target)


def _open(calib: CalibSource | str | os.PathLike[str], model: onnx.ModelProto,
          preprocess: ImagePreprocess) -> CalibSource:
    return open_source(calib, input_specs(model), preprocess) if isinstance(calib, (str, os.PathLike)) else calib


def collect_stats(model: ModelLike, calib: CalibSource | str | os.PathLike[str],
                  config: QuantConfig = QuantConfig(), *, preprocess: ImagePreprocess = ImagePreprocess(),
                  on_progress: ProgressCallback | None = None,
                  user_passes: Sequence[GraphPass] = ()) -> tuple[StatsFile, CalibrationResult]:
    """Collect histograms of every tensor the plan quantizes, for `quantize(..., stats=...)` later."""
    model = _as_model(model)
    graph = run(prepare(model, config.target), user_passes)
    plan = plan_quantization(graph, config.selection, config.target)
    calibration = calibrate(graph, plan.activation_names, _open(calib, model, preprocess), config.calib,
                            on_progress, histograms=True)
    histograms = {name: h for name, h in calibration.stats.items() if isinstance(h, Histogram)}
    return StatsFile(model_digest(model), calibration.samples, calibration.batches, histograms), calibration


def _stats_as_calibration(stats: StatsFile | str | os.PathLike[str], model: onnx.ModelProto) -> CalibrationResult:
    loaded = stats if isinstance(stats, StatsFile) else load_stats(stats)
    if loaded.model_digest != model_digest(model):
        raise CalibrationError("the statistics were collected for a different model (digest mismatch). "
                               "Hint: run onnxq calibrate on this model")
    return CalibrationResult(loaded.histograms, loaded.samples, loaded.batches, (), 0.0)


def _smooth(graph: gs.Graph, source: CalibSource | None, config: QuantConfig) -> gs.Graph:
    """SmoothQuant: per-input-channel ranges of the smoothable MatMul/Gemm inputs, then the rewrite."""
    if source is None or config.smoothquant is None:
        raise ConfigError("--smoothquant needs --calib: a statistics file holds no per-channel ranges")
    names = [t.tensor_name for t in smoothquant_targets(graph) if t.smoothable]
    if not names:
        return graph
    return smoothquant(graph, channel_absmax(graph, names, source, config.calib), alpha=config.smoothquant)


def _build(graph: gs.Graph, plan: QuantPlan, calibration: CalibrationResult, config: QuantConfig,
           template: onnx.ModelProto, amax: Mapping[str, float] | None = None) -> onnx.ModelProto:
    """The checked INT8 model of `plan` with the calibrated statistics: insert_qdq, fp16, export, check.

    `amax`: the plan's group amaxes if already computed (else computed here).
    """
    params = activation_params(plan, calibration.stats, config.calib, config.target, amax)
    graph = insert_qdq(graph, plan, params)
    if config.high_precision is HighPrecision.FP16:
        graph = to_fp16(upgrade_graph_opset(graph, FP16_MIN_OPSET))
    quantized = from_graph(graph, template=template)
    check_model(quantized, "the quantized model")
    return quantized


def quantize(model: ModelLike, calib: CalibSource | str | os.PathLike[str] | None = None,
             config: QuantConfig = QuantConfig(), *, stats: StatsFile | str | os.PathLike[str] | None = None,
             preprocess: ImagePreprocess = ImagePreprocess(), on_progress: ProgressCallback | None = None,
             user_passes: Sequence[GraphPass] = (), accuracy: AccuracyTarget | None = None,
             eval_source: CalibSource | str | os.PathLike[str] | None = None,
             on_accuracy_progress: ProgressCallback | None = None,
             latency: LatencySearchConfig | None = None,
             on_latency_progress: ProgressCallback | None = None) -> QuantResult:
    """Quantize `model` to INT8 Q/DQ for TensorRT, calibrating on `calib` or reusing `stats`.

    Args:
        model: a ModelProto or the path of an .onnx file.
        calib: a calibration source, or a path `open_source` understands (.npz, .npy, a folder of
            them or of images, `loader.py:function`).
        config: selection, calibration and target options.
        stats: statistics from `collect_stats` (or a file `save_stats` wrote), instead of `calib`:
            no inference runs, and any method can be applied.
        preprocess: how images are turned into tensors, when `calib` is a folder of images.
        on_progress: called after each calibration batch with (samples done, total or None).
        user_passes: your own graph passes, run in order after the prepare stage and before planning.
        accuracy: measure every layer's sensitivity on held-back samples and leave the fewest layers
            in float that meet the target (see `onnxq.steps.accuracy.fallback`); the result's `sensitivity` and
            `fallback` say what was measured and what fell back. Raises `TargetNotMetError` when no
            model with a quantized layer meets it, unless `accuracy.write_anyway`.
        eval_source: the held-back samples for `accuracy` (its first `accuracy.samples`); without
            it every fourth calibration sample is held back and not used for calibration.
        on_accuracy_progress: called after each pass over the held-back samples with (runs done,
            runs planned or None).
        latency: `--target ort-cpu` only: time each class of quantized layers in INT8 and in float on
            the first calibration batch and leave in float those ORT runs faster in float (see
            `onnxq.steps.latency_search`); the result's `latency` holds the measurements (None when the plan
            quantizes nothing). Needs `calib`. Off unless given (the CLI turns it on for ort-cpu).
        on_latency_progress: called after each class timed with (classes done, classes total).
    """
    started = time.perf_counter()
    if (calib is None) == (stats is None):
        raise ConfigError("give either calibration data (--calib) or a statistics file (--stats), not both")
    if config.high_precision is HighPrecision.FP16 and config.target is not Target.TRT:
        raise ConfigError("--high-precision fp16 is for --target trt; ONNX Runtime's CPU kernels run float32")
    if latency is not None:
        if config.target is not Target.ORT_CPU:
            raise ConfigError("--latency-search is for --target ort-cpu: TensorRT times its own kernel choices")
        if calib is None:
            raise ConfigError("--latency-search needs calibration data (--calib): it times the model on one batch")
        if accuracy is not None:
            raise ConfigError("--latency-search cannot be combined with an accuracy target yet")
    model = _as_model(model)
    graph = run(prepare(model, config.target), user_passes)
    source = None if calib is None else _open(calib, model, preprocess)
    held_back = layers = None
    if accuracy is not None:
        evaluation = None if eval_source is None else _open(eval_source, model, preprocess)
        source, held_back = held_back_sources(source, evaluation, accuracy.samples)
    if config.smoothquant is not None:
        graph = _smooth(graph, source, config)
    plan = plan_quantization(graph, config.selection, config.target)
    if accuracy is not None:
        layers = LayerMap(graph, plan, config.selection, config.target)  # falling back may quantize more tensors
    if stats is not None:
        calibration = _stats_as_calibration(stats, model)
    else:
        assert source is not None
        names = plan.activation_names if layers is None else layers.calibrated_names
        calibration = calibrate(graph, names, source, config.calib, on_progress)
    if held_back is None or layers is None or accuracy is None:
        searched = None
        if latency is not None and plan.quantized_nodes:  # nothing quantized: nothing to time
            assert source is not None
            feed = next(iter(source.batches(model_batch_size(graph) or config.calib.batch_size)))
            plan, quantized, searched = search_latency(
                graph, plan, config.selection, calibration.stats,
                lambda candidate: _build(graph, candidate, calibration, config, model), model, feed,
                latency, on_latency_progress)
        amax = group_amax(plan, calibration.stats, config.calib)
        if searched is None:
            quantized = _build(graph, plan, calibration, config, model, amax)
        return QuantResult(quantized, plan, calibration, amax, time.perf_counter() - started, latency=searched)
    outcome = run_accuracy(
        layers.restricted(calibration.stats), calibration.stats, model, held_back,
        lambda final_plan: _build(graph, final_plan, calibration, config, model), accuracy, config.calib,
        fixed_batch=model_batch_size(graph), on_progress=on_accuracy_progress)
    return QuantResult(outcome.model, outcome.plan, calibration,
                       group_amax(outcome.plan, calibration.stats, config.calib), time.perf_counter() - started,
                       outcome.sensitivity, outcome.fallback)
