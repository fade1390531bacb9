"""onnxq: post-training INT8 quantization of ONNX models into explicit Q/DQ graphs (TensorRT, ONNX Runtime).

The pipeline, stage by stage (each a plain function you can call or replace):
    load_model -> prepare -> [your passes] -> [steps rewrite] -> target.plan -> calibrate
    -> [steps refine] -> insert_qdq -> target.lower -> from_graph
`quantize` runs all of it; `inspect` stops after planning. A target (`onnxq.targets`) is everything that
differs between runtimes; a step (`onnxq.steps`) is an optional feature (cross-layer equalization,
SmoothQuant, latency search, accuracy target).

The names below are imported on first use (PEP 562): `import onnxq` and `import onnxq.errors` load no
onnx nor ONNX Runtime (a second or more), so the command line's `--help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# module -> the names `onnxq` exports from it; `onnxq.passes` is exported as the submodule itself.
_SOURCES: dict[str, tuple[str, ...]] = {
    "onnxq.calib.calibrate": ("CalibrationResult", "calibrate"),
    "onnxq.calib.histogram": ("Histogram",),
    "onnxq.calib.ranges": ("activation_params", "group_amax"),
    "onnxq.calib.stats_file": ("StatsFile", "load_stats", "merge_stats", "save_stats"),
    "onnxq.cluster.backend": ("RayBackend", "ShardedData"),
    "onnxq.compare": ("CompareConfig", "CompareResult"),
    "onnxq.config": ("AccuracyGoal", "QuantConfig", "Target"),
    "onnxq.data.feeds": ("FeedsSource",),
    "onnxq.data.images": ("ColorOrder", "ImagePreprocess", "Layout"),
    "onnxq.data.signature": ("InputSpec", "ModelSignature", "input_specs", "signature_of"),
    "onnxq.data.sources": ("CalibSource", "open_source"),
    "onnxq.errors": ("CalibrationError", "ConfigError", "InternalError", "ModelError", "OnnxqError"),
    "onnxq.io": ("check_model", "from_graph", "load_model", "save_model", "to_graph"),
    "onnxq.lower.insert_qdq": ("insert_qdq",),
    "onnxq.lower.scales": ("INT8_SYMMETRIC", "UINT8_ASYMMETRIC", "ActivationScheme"),
    "onnxq.metrics": ("OutputMetrics", "compare_models"),
    "onnxq.options": ("CalibConfig", "CalibMethod", "HighPrecision", "Selection"),
    "onnxq.pipeline": ("QuantResult", "collect_stats", "inspect", "prepare", "quantize", "steps_for"),
    "onnxq.plan.core": ("NodeDecision", "QuantizedActivation", "QuantizedBias", "QuantizedWeight", "QuantPlan"),
    "onnxq.steps.accuracy.fallback": ("FallbackResult", "TargetNotMetError"),
    "onnxq.steps.accuracy.sensitivity": ("SensitivityResult",),
    "onnxq.steps.accuracy.step": ("AccuracyFinding", "MeetAccuracy"),
    "onnxq.steps.base": ("Job", "Step", "StepSkipped"),
    "onnxq.steps.bias_correction": ("BiasCorrected", "BiasCorrection"),
    "onnxq.steps.equalize": ("Equalize", "Equalized"),
    "onnxq.steps.latency_search": ("LatencySearch", "LatencySearchConfig", "SearchLatency"),
    "onnxq.steps.smoothquant": ("Smoothed", "SmoothQuant"),
    "onnxq.targets": ("ORT_CPU", "TRT", "QuantTarget", "get_target", "plan_quantization", "register_target"),
}
_EXPORTS = {name: module for module, names in _SOURCES.items() for name in names}
# Old names, kept for one release (see README "Changes").
_ALIASES = {"AccuracyTarget": "AccuracyGoal", "ActivationTarget": "QuantizedActivation",
            "WeightTarget": "QuantizedWeight"}

if TYPE_CHECKING:
    from onnxq import passes
    from onnxq.calib.calibrate import CalibrationResult, calibrate
    from onnxq.calib.histogram import Histogram
    from onnxq.calib.ranges import activation_params, group_amax
    from onnxq.calib.stats_file import StatsFile, load_stats, merge_stats, save_stats
    from onnxq.cluster.backend import RayBackend, ShardedData
    from onnxq.compare import CompareConfig, CompareResult
    from onnxq.config import AccuracyGoal, QuantConfig, Target
    from onnxq.data.feeds import FeedsSource
    from onnxq.data.images import ColorOrder, ImagePreprocess, Layout
    from onnxq.data.signature import InputSpec, ModelSignature, input_specs, signature_of
    from onnxq.data.sources import CalibSource, open_source
    from onnxq.errors import CalibrationError, ConfigError, InternalError, ModelError, OnnxqError
    from onnxq.io import check_model, from_graph, load_model, save_model, to_graph
    from onnxq.lower.insert_qdq import insert_qdq
    from onnxq.lower.scales import INT8_SYMMETRIC, UINT8_ASYMMETRIC, ActivationScheme
    from onnxq.metrics import OutputMetrics, compare_models
    from onnxq.options import CalibConfig, CalibMethod, HighPrecision, Selection
    from onnxq.pipeline import QuantResult, collect_stats, inspect, prepare, quantize, steps_for
    from onnxq.plan.core import NodeDecision, QuantizedActivation, QuantizedBias, QuantizedWeight, QuantPlan
    from onnxq.steps.accuracy.fallback import FallbackResult, TargetNotMetError
    from onnxq.steps.accuracy.sensitivity import SensitivityResult
    from onnxq.steps.accuracy.step import AccuracyFinding, MeetAccuracy
    from onnxq.steps.base import Job, Step, StepSkipped
    from onnxq.steps.bias_correction import BiasCorrected, BiasCorrection
    from onnxq.steps.equalize import Equalize, Equalized
    from onnxq.steps.latency_search import LatencySearch, LatencySearchConfig, SearchLatency
    from onnxq.steps.smoothquant import Smoothed, SmoothQuant
    from onnxq.targets import ORT_CPU, TRT, QuantTarget, get_target, plan_quantization, register_target

    AccuracyTarget = AccuracyGoal
    ActivationTarget = QuantizedActivation
    WeightTarget = QuantizedWeight


def __getattr__(name: str) -> Any:
    if name in _ALIASES:
        value = __getattr__(_ALIASES[name])
    elif name == "passes":
        value = importlib.import_module("onnxq.passes")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'onnxq' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AccuracyFinding", "AccuracyGoal", "ActivationScheme", "BiasCorrected", "BiasCorrection", "CalibConfig",
    "CalibMethod", "CalibSource", "CalibrationError", "CalibrationResult", "ColorOrder", "CompareConfig", "CompareResult", "ConfigError",
    "Equalize", "Equalized",
    "FallbackResult", "FeedsSource", "Histogram", "HighPrecision", "ImagePreprocess", "INT8_SYMMETRIC",
    "InputSpec", "InternalError", "Job", "LatencySearch", "LatencySearchConfig", "Layout", "MeetAccuracy",
    "ModelError", "ModelSignature", "NodeDecision", "ORT_CPU", "OnnxqError", "OutputMetrics", "QuantConfig",
    "QuantPlan",
    "QuantResult", "QuantTarget", "QuantizedActivation", "QuantizedBias", "QuantizedWeight", "RayBackend",
    "SearchLatency", "ShardedData",
    "Selection", "SensitivityResult", "SmoothQuant", "Smoothed", "StatsFile", "Step", "StepSkipped", "TRT",
    "TargetNotMetError", "UINT8_ASYMMETRIC", "__version__", "activation_params", "calibrate", "check_model",
    "collect_stats", "compare_models", "from_graph", "get_target", "group_amax", "input_specs", "insert_qdq",
    "inspect", "load_model", "load_stats", "merge_stats", "open_source", "passes", "plan_quantization",
    "prepare", "quantize", "register_target", "save_model", "save_stats", "signature_of",
    "steps_for", "to_graph",
    # deprecated aliases
    "AccuracyTarget", "ActivationTarget", "Target", "WeightTarget",
]
