"""From per-tensor statistics to one amax per scale group, with the configured method.

Tensors in one group (a Concat's inputs and output) are calibrated as one tensor: their statistics are
merged before the method runs, so the shared scale reflects all of their values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from onnxq.config import CalibConfig, CalibMethod, Target
from onnxq.errors import CalibrationError
from onnxq.plan.core import QuantPlan
from onnxq.lower.scales import ActivationParams, asymmetric_uint8
from onnxq.calib.amax import entropy_amax, max_amax, mse_amax, percentile_amax
from onnxq.calib.histogram import Histogram
from onnxq.calib.stats import MaxStats, TensorStats, merge_all

__all__ = ["AMAX_METHODS", "group_amax", "group_ranges", "activation_params"]

AMAX_METHODS: Mapping[CalibMethod, Callable[[Histogram, CalibConfig], float]] = MappingProxyType({
    CalibMethod.MAX: lambda h, cfg: max_amax(h),
    CalibMethod.PERCENTILE: lambda h, cfg: percentile_amax(h, cfg.percentile),
    CalibMethod.ENTROPY: lambda h, cfg: entropy_amax(h),
    CalibMethod.MSE: lambda h, cfg: mse_amax(h),
})


def _amax(group: str, stats: TensorStats, config: CalibConfig) -> float:
    if isinstance(stats, MaxStats):
        if config.method is not CalibMethod.MAX:
            raise CalibrationError(
                f"tensor group '{group}': only a running max was collected; method '{config.method.value}' "
                "needs histograms")
        return stats.amax
    return AMAX_METHODS[config.method](stats, config)


def _grouped(plan: QuantPlan, stats: Mapping[str, TensorStats]) -> dict[str, TensorStats]:
    members: dict[str, list[TensorStats]] = {}
    for target in plan.activations:
        if target.tensor_name not in stats:
            raise CalibrationError(
                f"no calibration statistics for tensor '{target.tensor_name}'. Hint: statistics files must "
                "be collected for this model and --target (onnxq calibrate) with the same or fewer exclusions")
        members.setdefault(target.group, []).append(stats[target.tensor_name])
    return {group: merge_all(group_stats) for group, group_stats in members.items()}


def group_amax(plan: QuantPlan, stats: Mapping[str, TensorStats], config: CalibConfig) -> dict[str, float]:
    """One amax per scale group of `plan`, from the merged statistics of the group's tensors."""
    return {group: _amax(group, merged, config) for group, merged in _grouped(plan, stats).items()}


def group_ranges(plan: QuantPlan, stats: Mapping[str, TensorStats], config: CalibConfig,
                 amax: Mapping[str, float] | None = None) -> dict[str, tuple[float, float]]:
    """One signed range [low, high] (holding 0) per group: the seen range, clipped to +-amax of the method.

    `amax`: the groups' amax if already computed by `group_amax` (the entropy and MSE searches are not free).
    """
    ranges = {}
    for group, merged in _grouped(plan, stats).items():
        limit = amax[group] if amax is not None else _amax(group, merged, config)
        ranges[group] = (max(merged.low, -limit), min(merged.high, limit))
    return ranges


def activation_params(plan: QuantPlan, stats: Mapping[str, TensorStats], config: CalibConfig,
                      target: Target, amax: Mapping[str, float] | None = None) -> dict[str, float | ActivationParams]:
    """What insert_qdq needs per group: an amax (TensorRT, symmetric INT8) or uint8 parameters (ORT CPU)."""
    if target is Target.TRT:
        return dict(group_amax(plan, stats, config) if amax is None else amax)
    ranges = group_ranges(plan, stats, config, amax)
    return {group: asymmetric_uint8(group, low, high) for group, (low, high) in ranges.items()}
