"""The summary lines `onnxq quantize` prints for the steps' findings, and its `--report`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from onnxq.pipeline import QuantResult
from onnxq.config import QuantConfig
from onnxq.steps.accuracy.fallback import FallbackResult
from onnxq.steps.accuracy.step import AccuracyFinding
from onnxq.steps.bias_correction import BiasCorrected
from onnxq.steps.latency_search import LatencySearch
from onnxq.steps.ranges import RangesChosen
from onnxq.steps.equalize import Equalized
from onnxq.steps.attention import AttentionChoice
from onnxq.steps.smoothquant import Smoothed
from onnxq.steps.accuracy.sensitivity import SensitivityResult, worst
from onnxq.metrics import OutputMetrics

from .progress import plural

def _figures(metrics: Sequence[OutputMetrics]) -> tuple[str, str]:
    cosine, sqnr = worst(metrics)
    return f"{cosine:.5f}", "nan" if math.isnan(sqnr) else f"{sqnr:.2f}"


def sensitivity_lines(result: SensitivityResult) -> list[str]:
    """The held-back data and the cost and headline of the sensitivity measurements."""
    cosine, sqnr = _figures(result.float_vs_int8)
    lines = [f"  sensitivity  {plural(len(result.layers), 'layer')} on {plural(result.samples, 'held-back sample')}: "
             f"{plural(result.runs, 'run')} in {result.seconds:.1f} s; fully INT8: cosine {cosine}, SQNR {sqnr} dB"]
    if result.layers:
        top = result.layers[0]
        lines.append(f"               most sensitive: {top.node_name} (alone in float: cosine "
                     f"{top.recovered_cosine:.5f}, SQNR {top.recovered_sqnr_db:.2f} dB)")
    return lines


def fallback_lines(result: FallbackResult, layer_count: int) -> list[str]:
    """The outcome of the fallback search and a table of the layers left in float."""
    before, after = _figures(result.before), _figures(result.after)
    ahead = f" ({result.wasted} measured ahead, unused)" if result.wasted else ""
    cost = f"{plural(result.runs, 'run')}{ahead}, {result.seconds:.1f} s"
    target = result.target.describe()
    if not result.met:
        kept = "the fully quantized model" if not result.float_layers else "this model"
        return [f"  fallback     {target}: NOT met ({cost}); {result.note}",
                f"               wrote {kept} anyway (--write-anyway): cosine {after[0]}, SQNR {after[1]} dB"]
    if not result.float_layers:
        return [f"  fallback     {target}: met with every layer quantized ({cost}); cosine {after[0]}, "
                f"SQNR {after[1]} dB"]
    lines = [f"  fallback     {target}: met with {len(result.float_layers)} of {layer_count} layers in float "
             f"({cost}); cosine {before[0]} -> {after[0]}, SQNR {before[1]} -> {after[1]} dB "
             "(measured on the written model)"]
    if result.note:
        lines.append(f"               note: {result.note}")
    width = max(len(layer.node_name) for layer in result.float_layers)
    lines.append(f"    {'left float':<{width}}  {'op':<8} why")
    for layer in result.float_layers:
        lines.append(f"    {layer.node_name:<{width}}  {layer.op_type:<8} {layer.reason}")
    return lines


def accuracy_lines(found: AccuracyFinding) -> list[str]:
    """The summary lines of the accuracy stage."""
    sensitivity, fallback = found.sensitivity, found.fallback
    lines = [f"  held back    {plural(found.held_samples, 'sample')}: {found.held_data}"]
    lines += [] if sensitivity is None else sensitivity_lines(sensitivity)
    if fallback is not None:
        lines += fallback_lines(fallback, 0 if sensitivity is None else len(sensitivity.layers))
    return lines


def latency_lines(search: LatencySearch | None) -> list[str]:
    """The summary lines of `--latency-search`; none without it."""
    if search is None:
        return []
    final = {trial.layer_class: trial.kept_int8 for trial in search.trials}  # a later sweep's trial decides
    verdict = "INT8 faster" if search.speedup > 1.0 else "INT8 NOT faster than float on this machine"
    lines = [f"  latency      float {search.float_model_ms:.2f} ms, full INT8 plan {search.start_ms:.2f} ms, "
             f"chosen {search.final_ms:.2f} ms on one batch ({search.speedup:.2f}x: {verdict}); "
             f"{sum(final.values())} of {len(final)} layer classes kept INT8 ({search.seconds:.1f} s)"]
    for trial in search.trials:
        where = "int8 " if trial.kept_int8 else "float"
        lines.append(f"    {where} {trial.layer_class} ({plural(len(trial.nodes), 'node')}): {trial.reason}")
    return lines


def bias_lines(found: BiasCorrected) -> list[str]:
    """The summary lines of bias correction: what was measured, and whether it was kept, with the figures."""
    ops: dict[str, int] = {}
    for layer in found.layers:
        ops[layer.op_type] = ops.get(layer.op_type, 0) + 1
    kinds = ", ".join(f"{count} {op}" for op, count in ops.items())
    created = sum(layer.created_bias for layer in found.layers)
    created_text = f"; {plural(created, 'bias', 'biases')} created" if created else ""
    largest = found.largest
    where = f", largest {largest.max_abs_shift:.4g} ({largest.node_name})" if largest is not None else ""
    lines = [f"  bias         {plural(len(found.layers), 'layer')} ({kinds}{created_text}): mean output shift per "
             f"channel measured on {plural(found.fit_samples, 'sample')}{where} ({found.seconds:.1f} s)",
             f"               {found.verdict} on {found.held_back}"]
    if found.skipped:
        name, why = found.skipped[0]
        lines.append(f"               left alone: {plural(len(found.skipped), 'layer')} (e.g. {name}: {why})")
    return lines


def range_lines(found: RangesChosen) -> list[str]:
    """The summary of `--method auto`: the methods tried whole, the choice per group counted, the cost."""
    counts = Counter(choice.candidate for choice in found.choices)
    methods = ", ".join(f"{name} {error:.3g}" for name, error in found.by_method.items())
    lines = [f"  ranges       auto over {plural(len(found.choices), 'group')} on {plural(found.samples, 'sample')}: "
             f"output noise/signal {methods}; from {found.start}, chosen {found.error:.3g} "
             f"({plural(found.runs, 'run')}, {found.seconds:.1f} s)",
             "               " + ", ".join(f"{n} {name}" for name, n in counts.most_common())]
    lines += [f"               input '{g.tensor}' lies on a grid of step {g.step:.6g} ({g.values} values): "
              f"scale = step makes its quantization exact" for g in found.grids]
    if found.note:
        lines.append(f"               note: {found.note}")
    return lines


def finding_lines(findings: Sequence[object]) -> list[str]:
    """The summary lines of every step's finding, in the order the steps ran."""
    lines: list[str] = []
    for finding in findings:
        if isinstance(finding, LatencySearch):
            lines += latency_lines(finding)
        elif isinstance(finding, AccuracyFinding):
            lines += accuracy_lines(finding)
        elif isinstance(finding, RangesChosen):
            lines += range_lines(finding)
        elif isinstance(finding, Equalized):
            lines.append(f"  equalize     {finding.describe()}")
        elif isinstance(finding, BiasCorrected):
            lines += bias_lines(finding)
        elif isinstance(finding, Smoothed):
            lines.append(f"  smoothquant  {finding.describe()}")
        elif isinstance(finding, AttentionChoice):
            lines.append(f"  attention    {finding.describe()}")
    return lines


def write_run_report(result: QuantResult, metrics: Sequence[OutputMetrics], folder: Path, config: QuantConfig,
                     model_name: str) -> tuple[Path, ...]:
    """`--report DIR`: the plan, ranges, metrics (before/after fallback when it ran), sensitivity, fallback."""
    from onnxq.report.document import build_report
    from onnxq.report.files import write_report

    sets: dict[str, Sequence[OutputMetrics]] = {}
    if result.fallback is not None:
        sets = {"before_fallback": result.fallback.before, "after_fallback": result.fallback.after}
    if metrics:
        sets["int8_on_eval"] = metrics
    layers = result.sensitivity.layers if result.sensitivity is not None else ()
    fallen = tuple((layer.node_name, layer.reason) for layer in result.fallback.float_layers) if result.fallback else ()
    report = build_report(result, metrics=sets, sensitivity=layers, fallback=fallen,
                          percentile=config.calib.percentile, method=config.calib.method,
                          target=config.target.name, model_name=model_name)
    return write_report(report, folder)
