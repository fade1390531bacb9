"""onnxq: post-training INT8 quantization of ONNX models into explicit Q/DQ graphs (TensorRT, ONNX Runtime).

The pipeline, stage by stage (each a plain function you can call or replace):
    load_model -> prepare -> [your passes] -> [steps rewrite] -> target.plan -> calibrate
    -> [steps refine] -> insert_qdq -> target.lower -> from_graph
`quantize` runs all of it; `inspect` stops after planning. A target (`onnxq.targets`) is everything that
differs between runtimes; a step (`onnxq.steps`) is an optional feature (cross-layer equalization,
SmoothQuant, latency search, accuracy target).
"""

from onnxq import passes
from onnxq.calib.calibrate import CalibrationResult, calibrate
from onnxq.calib.histogram import Histogram
from onnxq.calib.ranges import activation_params, group_amax
from onnxq.calib.stats_file import StatsFile, load_stats, merge_stats, save_stats
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

__version__ = "0.1.0"

# Old names, kept for one release (see README "Changes").
AccuracyTarget = AccuracyGoal
ActivationTarget = QuantizedActivation
WeightTarget = QuantizedWeight

__all__ = [
    "AccuracyFinding", "AccuracyGoal", "ActivationScheme", "BiasCorrected", "BiasCorrection", "CalibConfig",
    "CalibMethod", "CalibSource", "CalibrationError", "CalibrationResult", "ColorOrder", "CompareConfig", "CompareResult", "ConfigError",
    "Equalize", "Equalized",
    "FallbackResult", "FeedsSource", "Histogram", "HighPrecision", "ImagePreprocess", "INT8_SYMMETRIC",
    "InputSpec", "InternalError", "Job", "LatencySearch", "LatencySearchConfig", "Layout", "MeetAccuracy",
    "ModelError", "ModelSignature", "NodeDecision", "ORT_CPU", "OnnxqError", "OutputMetrics", "QuantConfig",
    "QuantPlan",
    "QuantResult", "QuantTarget", "QuantizedActivation", "QuantizedBias", "QuantizedWeight", "SearchLatency",
    "Selection", "SensitivityResult", "SmoothQuant", "Smoothed", "StatsFile", "Step", "StepSkipped", "TRT",
    "TargetNotMetError", "UINT8_ASYMMETRIC", "__version__", "activation_params", "calibrate", "check_model",
    "collect_stats", "compare_models", "from_graph", "get_target", "group_amax", "input_specs", "insert_qdq",
    "inspect", "load_model", "load_stats", "merge_stats", "open_source", "passes", "plan_quantization",
    "prepare", "quantize", "register_target", "save_model", "save_stats", "signature_of",
    "steps_for", "to_graph",
    # deprecated aliases
    "AccuracyTarget", "ActivationTarget", "Target", "WeightTarget",
]
