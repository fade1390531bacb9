"""Plain-text renderings of plans for `onnxq quantize` and `onnxq inspect` (the library never prints)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxq.plan.core import QuantPlan

__all__ = ["plan_counts", "format_plan", "format_plan_summary"]


def _by_op(decisions: tuple) -> str:
    counts = Counter(d.op_type for d in decisions)
    return ", ".join(f"{n} {op}" for op, n in counts.most_common())


def plan_counts(plan: QuantPlan) -> str:
    """One line: how many nodes are quantized and left float, by op type."""
    quantized, floating = plan.quantized_nodes, plan.float_nodes
    return (f"{len(quantized)} nodes quantized ({_by_op(quantized) or 'none'}); "
            f"{len(floating)} left float; {len(plan.activations)} activation Q/DQ pairs (per-tensor), "
            f"{len(plan.weights)} INT8 weights (per-channel)")


def format_plan_summary(plan: QuantPlan) -> str:
    """Counts, then the float nodes grouped by reason."""
    lines = [plan_counts(plan), "", "left float, by reason:"]
    reasons = Counter((d.reason, d.op_type) for d in plan.float_nodes)
    for (reason, op_type), n in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"  {n:4d} x {op_type:<20s} {reason}")
    return "\n".join(lines)


def format_plan(plan: QuantPlan) -> str:
    """Every node with its decision and reason, then every Q/DQ target."""
    width = max((len(d.node_name) for d in plan.decisions), default=4)
    lines = [f"{'node':<{width}}  {'op':<18} {'int8':<5} reason"]
    for d in plan.decisions:
        lines.append(f"{d.node_name:<{width}}  {d.op_type:<18} {'yes' if d.quantized else 'no':<5} {d.reason}")
    lines += ["", "activation Q/DQ (per-tensor):"]
    for a in plan.activations:
        readers = ", ".join(f"{node}[{i}]" for node, i in a.consumers)
        group = f"  scale shared with group '{a.group}'" if a.group != a.tensor_name else ""
        lines.append(f"  {a.tensor_name} -> {readers}{group}")
    lines += ["", "INT8 weights (per-channel):"]
    for w in plan.weights:
        lines.append(f"  {w.tensor_name} -> {w.consumer}[{w.input_index}] axis {w.axis}")
    lines += ["", plan_counts(plan)]
    return "\n".join(lines)
