"""onnxq: post-training INT8 quantization of ONNX models for TensorRT (explicit Q/DQ).

The pipeline, stage by stage (each a plain function you can call or replace):
    load_model -> prepare -> [your passes] -> plan_quantization -> calibrate -> insert_qdq -> from_graph
`quantize` runs all of it; `inspect` stops after planning.
"""

from onnxq import passes
from onnxq.pipeline import QuantResult, collect_stats, inspect, prepare, quantize
from onnxq.calib.calibrate import CalibrationResult, calibrate
from onnxq.data.sources import CalibSource, InputSpec, input_specs, open_source
from onnxq.data.feeds import FeedsSource
from onnxq.calib.histogram import Histogram
from onnxq.calib.ranges import group_amax
from onnxq.calib.stats_file import StatsFile, load_stats, merge_stats, save_stats
from onnxq.data.images import ColorOrder, ImagePreprocess, Layout
from onnxq.config import AccuracyTarget, CalibConfig, CalibMethod, HighPrecision, QuantConfig, Selection, Target
from onnxq.steps.accuracy.fallback import FallbackResult, TargetNotMetError
from onnxq.steps.accuracy.sensitivity import SensitivityResult
from onnxq.steps.latency_search import LatencySearch, LatencySearchConfig
from onnxq.errors import CalibrationError, ConfigError, InternalError, ModelError, OnnxqError
from onnxq.io import check_model, from_graph, load_model, save_model, to_graph
from onnxq.lower.insert_qdq import insert_qdq
from onnxq.plan.core import ActivationTarget, NodeDecision, QuantPlan, WeightTarget, plan_quantization
from onnxq.compare import CompareConfig, CompareResult
from onnxq.metrics import OutputMetrics, compare_models

__version__ = "0.1.0"

__all__ = [
    "AccuracyTarget", "FallbackResult", "SensitivityResult", "TargetNotMetError", "ActivationTarget", "CompareConfig", "CompareResult", "Histogram", "StatsFile", "collect_stats", "load_stats", "merge_stats", "save_stats", "CalibConfig", "CalibMethod", "CalibSource", "CalibrationError", "CalibrationResult",
    "ColorOrder", "ConfigError", "FeedsSource", "HighPrecision", "ImagePreprocess", "InputSpec",
    "InternalError", "LatencySearch", "LatencySearchConfig", "Layout", "ModelError", "NodeDecision", "OnnxqError", "OutputMetrics", "QuantConfig",
    "QuantPlan", "QuantResult", "Selection", "Target", "WeightTarget", "__version__", "calibrate",
    "check_model", "compare_models", "from_graph", "group_amax", "input_specs", "insert_qdq", "inspect",
    "load_model", "open_source", "passes", "plan_quantization", "prepare", "quantize", "save_model", "to_graph",
]
