"""From per-tensor statistics to one range per scale group, with the configured method and the target's scheme.

Tensors in one group (a Concat's inputs and output) are calibrated as one tensor: their statistics are
merged before the method runs, so the shared scale reflects all of their values. The MSE and entropy
searches fit the grid the target will run (`ActivationScheme.levels`: 127 steps for symmetric INT8,
255 for a one-signed uint8 range); max and percentile do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from onnxq.errors import CalibrationError
from onnxq.lower.scales import INT8_SYMMETRIC, ActivationParams, ActivationScheme
from onnxq.options import CalibConfig, CalibMethod
from onnxq.plan.core import QuantPlan
from onnxq.calib.amax import entropy_amax, max_amax, mse_amax, percentile_amax
from onnxq.calib.histogram import Histogram
from onnxq.calib.stats import MaxStats, TensorStats, merge_all

__all__ = ["AMAX_METHODS", "group_amax", "group_stats", "activation_params"]

# method -> amax from (histogram, config, levels on |x|)
AMAX_METHODS: Mapping[CalibMethod, Callable[[Histogram, CalibConfig, int], float]] = MappingProxyType({
    CalibMethod.MAX: lambda h, cfg, levels: max_amax(h),
    CalibMethod.PERCENTILE: lambda h, cfg, levels: percentile_amax(h, cfg.percentile),
    CalibMethod.ENTROPY: lambda h, cfg, levels: entropy_amax(h, levels + 1, levels + 1),
    CalibMethod.MSE: lambda h, cfg, levels: mse_amax(h, levels=levels),
    # Without a search's choice (`onnxq.steps.ranges.ChooseRanges`), auto starts where MSE does.
    CalibMethod.AUTO: lambda h, cfg, levels: mse_amax(h, levels=levels),
})


def _amax(group: str, stats: TensorStats, config: CalibConfig, scheme: ActivationScheme) -> float:
    if isinstance(stats, MaxStats):
        if config.method is not CalibMethod.MAX:
            raise CalibrationError(
                f"tensor group '{group}': only a running max was collected; method '{config.method.value}' "
                "needs histograms")
        return stats.amax
    return AMAX_METHODS[config.method](stats, config, scheme.levels(stats.low, stats.high))


def group_stats(plan: QuantPlan, stats: Mapping[str, TensorStats]) -> dict[str, TensorStats]:
    """The statistics of each scale group of `plan`: its tensors' statistics merged."""
    return _grouped(plan, stats)


def _grouped(plan: QuantPlan, stats: Mapping[str, TensorStats]) -> dict[str, TensorStats]:
    members: dict[str, list[TensorStats]] = {}
    for activation in plan.activations:
        if activation.tensor_name not in stats:
            raise CalibrationError(
                f"no calibration statistics for tensor '{activation.tensor_name}'. Hint: statistics files must "
                "be collected for this model and --activation (onnxq calibrate) with the same or fewer exclusions")
        members.setdefault(activation.group, []).append(stats[activation.tensor_name])
    return {group: merge_all(group_stats) for group, group_stats in members.items()}


def group_amax(plan: QuantPlan, stats: Mapping[str, TensorStats], config: CalibConfig,
               scheme: ActivationScheme = INT8_SYMMETRIC) -> dict[str, float]:
    """One amax per scale group of `plan`, from the merged statistics of the group's tensors."""
    return {group: _amax(group, merged, config, scheme) for group, merged in _grouped(plan, stats).items()}


def activation_params(plan: QuantPlan, stats: Mapping[str, TensorStats], config: CalibConfig,
                      scheme: ActivationScheme = INT8_SYMMETRIC,
                      amax: Mapping[str, float] | None = None) -> dict[str, ActivationParams]:
    """What `insert_qdq` needs per group: the scale and zero point of `scheme` for the method's range.

    `amax`: chosen amaxes by group (from `group_amax`, or a search's choice); a group it lacks gets the method's.
    """
    params = {}
    for group, merged in _grouped(plan, stats).items():
        limit = amax[group] if amax is not None and group in amax else _amax(group, merged, config, scheme)
        params[group] = scheme.params(group, merged.low, merged.high, limit)
    return params
