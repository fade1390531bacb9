"""onnxq: post-training INT8 quantization of ONNX models for TensorRT (explicit Q/DQ).

The pipeline, stage by stage (each a plain function you can call or replace):
    load_model -> prepare -> [your passes] -> plan_quantization -> calibrate -> insert_qdq -> from_graph
`quantize` runs all of it; `inspect` stops after planning.
"""

from . import passes
from .api import QuantResult, collect_stats, inspect, prepare, quantize
from .calib.calibrate import CalibrationResult, calibrate
from .calib.data import CalibSource, InputSpec, input_specs, open_source
from .calib.feeds import FeedsSource
from .calib.histogram import Histogram
from .calib.ranges import group_amax
from .calib.stats_file import StatsFile, load_stats, merge_stats, save_stats
from .calib.images import ColorOrder, ImagePreprocess, Layout
from .config import AccuracyTarget, CalibConfig, CalibMethod, HighPrecision, QuantConfig, Selection, Target
from .fallback import FallbackResult, TargetNotMetError
from .sensitivity import SensitivityResult
from .latency_search import LatencySearch, LatencySearchConfig
from .errors import CalibrationError, ConfigError, InternalError, ModelError, OnnxqError
from .io import check_model, from_graph, load_model, save_model, to_graph
from .passes.insert_qdq import insert_qdq
from .quant.plan import ActivationTarget, NodeDecision, QuantPlan, WeightTarget, plan_quantization
from .compare import CompareConfig, CompareResult
from .verify import OutputMetrics, compare_models

__version__ = "0.1.0"

__all__ = [
    "AccuracyTarget", "FallbackResult", "SensitivityResult", "TargetNotMetError", "ActivationTarget", "CompareConfig", "CompareResult", "Histogram", "StatsFile", "collect_stats", "load_stats", "merge_stats", "save_stats", "CalibConfig", "CalibMethod", "CalibSource", "CalibrationError", "CalibrationResult",
    "ColorOrder", "ConfigError", "FeedsSource", "HighPrecision", "ImagePreprocess", "InputSpec",
    "InternalError", "LatencySearch", "LatencySearchConfig", "Layout", "ModelError", "NodeDecision", "OnnxqError", "OutputMetrics", "QuantConfig",
    "QuantPlan", "QuantResult", "Selection", "Target", "WeightTarget", "__version__", "calibrate",
    "check_model", "compare_models", "from_graph", "group_amax", "input_specs", "insert_qdq", "inspect",
    "load_model", "open_source", "passes", "plan_quantization", "prepare", "quantize", "save_model", "to_graph",
]
