"""The report's record of what each step did: one row per finding, with its details, from a rule table.

Every finding a run reports (`QuantResult.findings`) becomes a `StepRow`: which step, a one-line summary
and the per-tensor or per-layer details behind it (SmoothQuant's alpha per input, the attention
measurement, bias correction's shift per layer, equalization's pairs, the latency classes). A finding of
a type the table does not know gets its type name and, if it has one, its `describe()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from onnxq.steps.attention import AttentionChoice
from onnxq.steps.base import StepSkipped
from onnxq.steps.bias_correction import BiasCorrected
from onnxq.steps.equalize import Equalized
from onnxq.steps.smoothquant import Smoothed

__all__ = ["StepRow", "step_rows"]


@dataclass(frozen=True)
class StepRow:
    """What one step did.

    Attributes:
        step: the step's name.
        summary: one line.
        details: one line per tensor, layer or pair it decided on.
    """

    step: str
    summary: str
    details: tuple[str, ...] = ()


def _smoothed(found: Smoothed) -> tuple[str, ...]:
    measured = {choice.tensor for choice in found.choices}
    return (*(f"{c.tensor}: {c.reason}" for c in found.choices),
            *(f"{name}: {why}" for name, why in found.left_alone if name not in measured))


def _bias(found: BiasCorrected) -> tuple[str, ...]:
    return (*(f"{layer.node_name} ({layer.op_type}, {layer.channels} channels): largest shift "
              f"{layer.max_abs_shift:.4g}{', bias created' if layer.created_bias else ''}" for layer in found.layers),
            *(f"{name}: left alone, {why}" for name, why in found.skipped))


def _equalized(found: Equalized) -> tuple[str, ...]:
    return tuple(f"{pair.producer} -> {', '.join(pair.consumers)}: {pair.reason}" for pair in found.conv_pairs)


#: finding type -> (step name, summary, details)
_RULES: dict[type, tuple[str, Callable[[object], str], Callable[[object], tuple[str, ...]]]] = {
    Smoothed: ("SmoothQuant", lambda f: f.describe(), _smoothed),
    AttentionChoice: ("attention", lambda f: f.describe(), lambda f: f.nodes),
    BiasCorrected: ("bias correction", lambda f: f"{f.verdict} ({f.held_back})", _bias),
    Equalized: ("cross-layer equalization", lambda f: f.describe(), _equalized),
    StepSkipped: ("", lambda f: f.reason, lambda f: ()),
}


def step_rows(findings: Iterable[object]) -> tuple[StepRow, ...]:
    """One row per finding, in the order the steps reported them."""
    rows = []
    for finding in findings:
        rule = _RULES.get(type(finding))
        if rule is None:
            describe = getattr(finding, "describe", None)
            rows.append(StepRow(type(finding).__name__, describe() if callable(describe) else ""))
            continue
        name, summary, details = rule
        rows.append(StepRow(name or getattr(finding, "step", ""), summary(finding), tuple(details(finding))))
    return tuple(rows)
