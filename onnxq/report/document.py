"""The quantization report: what was quantized and why, the ranges chosen, and how accurate the result is.

`build_report` gathers everything from a `QuantResult` (plus metrics, sensitivity rows and fallback
decisions computed elsewhere) into a frozen `QuantReport`; `to_json` renders it as JSON,
`onnxq.report.markdown.to_markdown` as Markdown, and `onnxq.report.files.write_report` writes
`report.json`, `report.md` and, when matplotlib is installed (the `report` extra) and sensitivity rows
exist, `sensitivity.png`. Nothing here prints.

JSON: standard JSON, keys = the dataclass field names below (plus `format`, `format_version`). Non-finite
floats are the strings "nan", "inf", "-inf" (as in `onnxq compare --json`); values that do not exist (a
method without a histogram, a weight whose scale was not found) are `null`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.pipeline import QuantResult
from onnxq.calib.histogram import Histogram
from onnxq.calib.ranges import AMAX_METHODS, group_amax
from onnxq.lower.scales import ActivationScheme
from onnxq.targets import get_target
from onnxq.options import CalibConfig, CalibMethod
from onnxq.errors import OnnxqError
from onnxq.plan.core import QuantizedActivation, NodeDecision, QuantPlan
from onnxq.report.chart import LayerRow, SensitivityRow, rank_layers
from onnxq.metrics import OutputMetrics
from onnxq.steps.ranges import RangesChosen
from onnxq.report.steps import StepRow, step_rows

__all__ = ["SensitivityRow", "LayerRow", "ActivationRow", "WeightRow", "CalibrationSummary", "QuantReport",
           "RangeRow", "METHODS", "TOP_N", "build_report", "rank_layers", "to_json"]

FORMAT_VERSION = 1
METHODS = ("max", "percentile", "entropy", "mse")  # the columns of the activation table, in this order
TOP_N = 10  # sensitivity rows shown before the full (folded) table


@dataclass(frozen=True)
class ActivationRow:
    """A quantized activation: `amax` is its scale group's range in the model, `amax_by_method` its own
    amax per method (only "max" without a histogram), `low`/`high` the signed range seen."""

    tensor_name: str
    group: str
    consumers: tuple[tuple[str, int], ...]
    amax: float | None
    amax_by_method: Mapping[str, float | None]
    num_values: int
    nan_count: int
    inf_count: int
    sentinel_count: int
    low: float | None
    high: float | None


@dataclass(frozen=True)
class WeightRow:
    """One INT8 weight: per-channel amax (scale x 127, as stored in the model) summarised."""

    tensor_name: str
    consumer: str
    input_index: int
    axis: int
    channels: int
    amax_min: float | None
    amax_median: float | None
    amax_max: float | None


@dataclass(frozen=True)
class CalibrationSummary:
    """Samples and batches calibrated on, providers and seconds (none and 0.0 for reused statistics)."""

    samples: int
    batches: int
    providers: tuple[str, ...]
    seconds: float


@dataclass(frozen=True)
class RangeRow:
    """`--method auto`'s choice for one scale group: the candidate, its range, and what was measured."""

    group: str
    candidate: str
    amax: float
    reason: str


@dataclass(frozen=True)
class QuantReport:
    """Everything the report files hold; see `build_report`."""

    model_name: str
    target: str
    method: str
    onnxq_version: str
    decisions: tuple[NodeDecision, ...]
    activations: tuple[ActivationRow, ...]
    weights: tuple[WeightRow, ...]
    metrics: Mapping[str, tuple[OutputMetrics, ...]]
    sensitivity: tuple[LayerRow, ...]
    fallback: tuple[tuple[str, str], ...]
    calibration: CalibrationSummary
    ranges: tuple[RangeRow, ...]
    percentile: float
    seconds: float
    steps: tuple[StepRow, ...] = ()


def build_report(result: QuantResult, *, metrics: Mapping[str, Sequence[OutputMetrics]] = MappingProxyType({}),
                 sensitivity: Iterable[SensitivityRow] = (), fallback: Sequence[tuple[str, str]] = (),
                 percentile: float = 99.99, method: CalibMethod | str | None = None, target: str | None = None,
                 model_name: str | None = None) -> QuantReport:
    """Gather the report of one quantization run.

    Args:
        result: what `onnxq.quantize` returned.
        metrics: output metrics by stage, e.g. {"int8": ..., "before_fallback": ..., "after_fallback": ...}.
        sensitivity: per-layer rows (any objects with `SensitivityRow`'s attributes), in any order.
        fallback: (node, reason) for every node automatic fallback left float.
        percentile: the percentile for the "percentile" column (and for inferring the method).
        method: the calibration method used; by default inferred: the methods reproducing
            `result.group_amax` exactly, joined with " / " ("unknown" when none does).
        target: "trt" or "ort-cpu"; by default "ort-cpu" when activations are uint8, else "trt".
        model_name: by default the graph's name.

    Raises:
        ConfigError: `percentile` is not in (0, 100].
    """
    from onnxq import __version__  # late: onnxq/__init__ may one day import this module

    calibration = result.calibration
    config = CalibConfig(percentile=percentile)
    target = target or _infer_target(result.model)
    scheme = get_target(target).scheme
    method_name = (method.value if isinstance(method, CalibMethod) else method) or _infer_method(result, config, scheme)
    return QuantReport(
        model_name=model_name or result.model.graph.name or "model",
        target=target,
        method=method_name,
        onnxq_version=__version__,
        decisions=tuple(result.plan.decisions),
        activations=tuple(_activation_row(t, calibration.stats.get(t.tensor_name), result.group_amax.get(t.group),
                                          config, scheme) for t in result.plan.activations),
        weights=_weight_rows(result.model, result.plan),
        metrics=MappingProxyType({str(key): tuple(rows) for key, rows in metrics.items()}),
        sensitivity=rank_layers(sensitivity),
        fallback=tuple((str(node), str(reason)) for node, reason in fallback),
        calibration=CalibrationSummary(calibration.samples, calibration.batches, tuple(calibration.providers),
                                       float(calibration.seconds)),
        ranges=_range_rows(result),
        percentile=float(percentile),
        seconds=float(result.seconds),
        steps=step_rows(result.findings),
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _range_rows(result: QuantResult) -> tuple[RangeRow, ...]:
    found = result.finding(RangesChosen)
    if not isinstance(found, RangesChosen):
        return ()
    return tuple(RangeRow(c.group, c.candidate, float(c.amax), c.reason) for c in found.choices)


def _infer_method(result: QuantResult, config: CalibConfig, scheme: ActivationScheme) -> str:
    if isinstance(result.finding(RangesChosen), RangesChosen):
        return CalibMethod.AUTO.value
    if not any(isinstance(s, Histogram) for s in result.calibration.stats.values()):
        return CalibMethod.MAX.value
    chosen = dict(result.group_amax)
    matches = []
    for method in CalibMethod:
        try:
            if group_amax(result.plan, result.calibration.stats, replace(config, method=method), scheme) == chosen:
                matches.append(method.value)
        except OnnxqError:
            continue
    return " / ".join(matches) or "unknown"


def _infer_target(model: onnx.ModelProto) -> str:
    uint8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8}
    uses_uint8 = any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in uint8
                     for n in model.graph.node)
    return "ort-cpu" if uses_uint8 else "trt"


def _activation_row(activation: QuantizedActivation, stats: Any, chosen: float | None, config: CalibConfig,
                    scheme: ActivationScheme) -> ActivationRow:
    by_method: dict[str, float | None] = dict.fromkeys(METHODS)
    if isinstance(stats, Histogram):
        levels = scheme.levels(stats.low, stats.high)
        by_method.update({m: float(AMAX_METHODS[CalibMethod(m)](stats, config, levels)) for m in METHODS})
    elif stats is not None:
        by_method["max"] = float(stats.amax)
    counts = [int(getattr(stats, name, 0)) for name in ("num_values", "nan_count", "inf_count", "sentinel_count")]
    return ActivationRow(activation.tensor_name, activation.group, tuple(activation.consumers), _float(chosen),
                         MappingProxyType(by_method), *counts,
                         _float(getattr(stats, "low", None)), _float(getattr(stats, "high", None)))


def _weight_rows(model: onnx.ModelProto, plan: QuantPlan) -> tuple[WeightRow, ...]:
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    nodes = {node.name: node for node in graph.node}
    initializers = {t.name: t for t in graph.initializer}
    rows = []
    for w in plan.weights:
        amax = _stored_weight_amax(nodes.get(w.consumer), w.input_index, producers, initializers)
        amax = np.empty(0) if amax is None else amax
        stats = (float(amax.min()), float(np.median(amax)), float(amax.max())) if amax.size else (None, None, None)
        rows.append(WeightRow(w.tensor_name, w.consumer, w.input_index, w.axis, int(amax.size), *stats))
    return tuple(rows)


def _stored_weight_amax(consumer: onnx.NodeProto | None, index: int, producers: Mapping[str, onnx.NodeProto],
                        initializers: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    """Per-channel amax = scale x 127 of the DequantizeLinear feeding `consumer`'s input (through Casts)."""
    if consumer is None or index >= len(consumer.input):
        return None
    node = producers.get(consumer.input[index])
    while node is not None and node.op_type == "Cast":
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in initializers:
        return None
    return numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64).ravel() * 127.0


def _plain(value: Any) -> Any:
    """Dataclasses, mappings and sequences as JSON-ready values; non-finite floats as strings."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    return value


def to_json(report: QuantReport) -> str:
    """The report as standard JSON (see the module docstring for the conventions)."""
    document = {"format": "onnxq-report", "format_version": FORMAT_VERSION, **_plain(report)}
    return json.dumps(document, indent=2, allow_nan=False) + "\n"
