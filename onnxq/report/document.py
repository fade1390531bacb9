"""The quantization report: what was quantized and why, the ranges chosen, and how accurate the result is.

`build_report` gathers everything from a `QuantResult` (plus metrics, sensitivity rows and fallback
decisions computed elsewhere) into a frozen `QuantReport`; `to_json` and `to_markdown` render it as
text; `write_report` writes `report.json`, `report.md` and, when matplotlib is installed (the `report`
extra) and sensitivity rows exist, `sensitivity.png`. Nothing here prints.

JSON: standard JSON, keys = the dataclass field names below (plus `format`, `format_version`). Non-finite
floats are the strings "nan", "inf", "-inf" (as in `onnxq compare --json`); values that do not exist (a
method without a histogram, a weight whose scale was not found) are `null`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
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
from onnxq.atomic import write_atomic
from onnxq.errors import OnnxqError
from onnxq.plan.core import QuantizedActivation, NodeDecision, QuantPlan
from onnxq.report.chart import CHART_FILE, LayerRow, SensitivityRow, available, rank_layers, sensitivity_png
from onnxq.metrics import OutputMetrics

__all__ = ["SensitivityRow", "LayerRow", "ActivationRow", "WeightRow", "CalibrationSummary", "QuantReport",
           "METHODS", "build_report", "rank_layers", "to_json", "to_markdown", "write_report"]

FORMAT_VERSION = 1
METHODS = ("max", "percentile", "entropy", "mse")  # the columns of the activation table, in this order
TOP_N = 10  # sensitivity rows shown before the full (folded) table
_FOLD_ROWS = 25  # longer Markdown tables go into a <details> block
_DASH = "—"


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
    percentile: float
    seconds: float


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
        percentile=float(percentile),
        seconds=float(result.seconds),
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _infer_method(result: QuantResult, config: CalibConfig, scheme: ActivationScheme) -> str:
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
        by_method.update({m.value: float(AMAX_METHODS[m](stats, config, levels)) for m in CalibMethod})
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


def _num(value: float | None, spec: str = ".4g") -> str:
    if value is None:
        return _DASH
    return format(value, spec) if math.isfinite(value) else str(value)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], fold: str | None = None) -> list[str]:
    body = [f"| {' | '.join(_cell(c) for c in row)} |" for row in rows]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *body]
    if fold is not None and len(body) > _FOLD_ROWS:
        return [f"<details><summary>{fold} ({len(body)} rows)</summary>", "", *lines, "", "</details>"]
    return lines


def _md_summary(r: QuantReport) -> list[str]:
    quantized = sum(d.quantized for d in r.decisions)
    c = r.calibration
    on = f" on {', '.join(c.providers)}" if c.providers else ""
    rows = [("onnxq", r.onnxq_version), ("target", r.target), ("activation method", r.method),
            ("nodes", f"{quantized} quantized, {len(r.decisions) - quantized} left float"),
            ("activation Q/DQ", f"{len(r.activations)} tensors in {len({a.group for a in r.activations})} "
                                "scale groups (per-tensor)"),
            ("INT8 weights", f"{len(r.weights)} (per-channel)"),
            ("calibration", f"samples {c.samples}, batches {c.batches}{on}, {c.seconds:.1f} s"),
            ("left float by automatic fallback", len(r.fallback)),
            ("total time", f"{r.seconds:.1f} s")]
    return [f"# Quantization report: {_cell(r.model_name)}", "", "## Summary", "",
            *_table(("item", "value"), rows)]


def _md_metrics(r: QuantReport) -> list[str]:
    lines = ["## Accuracy: float vs quantized", ""]
    if not r.metrics:
        return [*lines, "Not measured (no evaluation data)."]
    for stage, rows in r.metrics.items():
        table = [(f"`{m.name}`", m.samples, _num(m.cosine, ".6f"), _num(m.sqnr_db, ".2f"), _num(m.max_abs_error),
                  _DASH if m.top1_agreement is None else f"{100 * m.top1_agreement:.2f}%") for m in rows]
        lines += [f"### {_cell(stage)}", "",
                  *_table(("output", "samples", "cosine", "SQNR dB", "max abs err", "top-1"), table), ""]
    return lines[:-1]


def _md_sensitivity(r: QuantReport, chart: str | None, chart_note: str | None) -> list[str]:
    lines = ["## Per-layer sensitivity", ""]
    if not r.sensitivity:
        return [*lines, "Not computed (so no chart)."]
    header = ("rank", "node", "op", "alone cosine", "alone SQNR dB", "recovered cosine", "recovered SQNR dB")
    rows = [(s.rank, f"`{s.node_name}`", s.op_type, _num(s.alone_cosine, ".6f"), _num(s.alone_sqnr_db, ".2f"),
             _num(s.recovered_cosine, ".6f"), _num(s.recovered_sqnr_db, ".2f")) for s in r.sensitivity]
    lines += ["*alone*: only this layer quantized; *recovered*: as reported by the sensitivity analysis for "
              "this layer kept float. Rank 1 = lowest SQNR alone = most sensitive.", "",
              f"### Top {min(TOP_N, len(rows))}", "", *_table(header, rows[:TOP_N]), ""]
    if len(rows) > TOP_N:
        lines += ["### All layers", "", "<details><summary>all {} layers</summary>".format(len(rows)), "",
                  *_table(header, rows), "", "</details>", ""]
    if chart is not None:
        return [*lines, f"![per-layer sensitivity]({chart})"]
    return [*lines, chart_note or "No chart (`write_report` draws one when matplotlib is installed)."]


def _md_fallback(r: QuantReport) -> list[str]:
    lines = ["## Automatic fallback", ""]
    items = [f"- `{_cell(node)}`: {_cell(reason)}" for node, reason in r.fallback]
    return [*lines, *(items or ["No node was left float by automatic fallback."])]


def _md_plan(r: QuantReport) -> list[str]:
    quantized = [d for d in r.decisions if d.quantized]
    lines = ["## Plan", "", f"### Quantized nodes ({len(quantized)})", "",
             *_table(("node", "op", "reason"), [(f"`{d.node_name}`", d.op_type, d.reason) for d in quantized],
                     fold="quantized nodes"),
             "", f"### Float nodes by reason ({len(r.decisions) - len(quantized)})", ""]
    by_reason: dict[str, list[NodeDecision]] = {}
    for d in r.decisions:
        if not d.quantized:
            by_reason.setdefault(d.reason, []).append(d)
    for reason, group in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
        ops = ", ".join(f"{n} {op}" for op, n in Counter(d.op_type for d in group).most_common())
        names = ", ".join(f"`{_cell(d.node_name)}`" for d in group)
        lines.append(f"- **{_cell(reason)}** ({ops})")
        lines.append(f"  <details><summary>{len(group)} nodes</summary>{names}</details>"
                     if len(group) > 12 else f"  {names}")
    return lines if by_reason else [*lines, "None."]


def _ignored(a: ActivationRow) -> str:
    kinds = ((a.nan_count, "NaN"), (a.inf_count, "Inf"), (a.sentinel_count, "sentinel"))
    return ", ".join(f"{n} {kind}" for n, kind in kinds if n) or "0"


def _md_activations(r: QuantReport) -> list[str]:
    rows = [(f"`{a.tensor_name}`", _DASH if a.group == a.tensor_name else f"`{a.group}`",
             ", ".join(f"{node}[{i}]" for node, i in a.consumers), _num(a.amax),
             *(_num(a.amax_by_method.get(m)) for m in METHODS), _ignored(a)) for a in r.activations]
    header = ("tensor", "scale group", "read by", "chosen amax", "max", f"percentile {r.percentile:g}",
              "entropy", "mse", "ignored values")
    return ["## Activation ranges", "",
            f"`chosen amax` is the range of the tensor's scale group in the model (method: {r.method}); the "
            f"method columns are this tensor's own amax; {_DASH} = no histogram was collected.", "",
            *_table(header, rows, fold="activation ranges")]


def _md_weights(r: QuantReport) -> list[str]:
    rows = [(f"`{w.tensor_name}`", f"{w.consumer}[{w.input_index}]", w.axis, w.channels, _num(w.amax_min),
             _num(w.amax_median), _num(w.amax_max)) for w in r.weights]
    return ["## INT8 weights", "", "Per-channel amax = stored scale x 127.", "",
            *_table(("weight", "read by", "axis", "channels", "min amax", "median amax", "max amax"), rows,
                    fold="weights")]


def to_markdown(report: QuantReport, *, chart: str | None = None, chart_note: str | None = None) -> str:
    """The report as a Markdown document; `chart` names a sensitivity chart beside it to embed, and
    `chart_note` is the line shown instead when there is none."""
    sections = (_md_summary(report), _md_metrics(report), _md_sensitivity(report, chart, chart_note),
                _md_fallback(report), _md_plan(report), _md_activations(report), _md_weights(report))
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def _write_atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, data, "the report")


def write_report(report: QuantReport, folder: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Write report.json, report.md and (with matplotlib and sensitivity rows) sensitivity.png into `folder`.

    The folder and its parents are created; each file is written to a temporary file and renamed.

    Returns:
        The paths written, in that order.

    Raises:
        OnnxqError: the folder or a file cannot be written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OnnxqError(f"{folder}: cannot create the report folder ({err.strerror or err})") from None
    chart, written = None, []
    if report.sensitivity and available():
        png = sensitivity_png(report.sensitivity, title=f"{report.model_name}: per-layer sensitivity")
        written.append(_write_atomic(folder / CHART_FILE, png))
        chart = CHART_FILE
    note = "No chart: matplotlib is not installed (`pip install 'onnxq[report]'`)."
    json_path = _write_atomic(folder / "report.json", to_json(report).encode("utf-8"))
    markdown = to_markdown(report, chart=chart, chart_note=note)
    return (json_path, _write_atomic(folder / "report.md", markdown.encode("utf-8")), *written)
