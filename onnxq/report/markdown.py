"""The quantization report as a Markdown document (`to_markdown`), from a `QuantReport`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from onnxq.report.document import METHODS, TOP_N, ActivationRow, QuantReport

if TYPE_CHECKING:
    from onnxq.plan.core import NodeDecision

__all__ = ["to_markdown"]

_FOLD_ROWS = 25  # longer Markdown tables go into a <details> block
_DASH = "—"


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


def _md_ranges(r: QuantReport) -> list[str]:
    if not r.ranges:
        return []
    counts = Counter(row.candidate for row in r.ranges)
    lines = ["## Ranges chosen by measurement (--method auto)", "",
             ", ".join(f"{n} {name}" for name, n in counts.most_common()), ""]
    return lines + _table(["group", "chosen", "amax", "why"],
                          ((f"`{row.group}`", row.candidate, _num(row.amax), row.reason) for row in r.ranges),
                          fold="ranges")


def _md_steps(r: QuantReport) -> list[str]:
    if not r.steps:
        return []
    lines = ["## Steps", ""]
    for row in r.steps:
        lines.append(f"- **{row.step}**: {row.summary}")
        lines += [f"  - {detail}" for detail in row.details]
    return lines


def to_markdown(report: QuantReport, *, chart: str | None = None, chart_note: str | None = None) -> str:
    """The report as a Markdown document; `chart` names a sensitivity chart beside it to embed, and
    `chart_note` is the line shown instead when there is none."""
    sections = (_md_summary(report), _md_metrics(report), _md_sensitivity(report, chart, chart_note),
                _md_fallback(report), _md_steps(report), _md_ranges(report), _md_plan(report), _md_activations(report),
                _md_weights(report))
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"
