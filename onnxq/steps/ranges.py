"""`--method auto`: each scale group's range chosen by the output error it causes, measured.

No fixed range method is safe on every model (max loses resolution to outliers, entropy can clip a
narrow band away, percentile and MSE misjudge tensors whose error matters downstream), so this step
measures. Its candidates all come from the one histogram pass: per group, max, MSE-optimal for the
target's grid, entropy and the 99.9 / 99.99 / 99.999 percentiles (and the input grid, see below).
The measure is the error at the model's outputs (a Softmax/LogSoftmax output: its input, the logits,
as bias correction checks: probabilities saturate): the mean over outputs of the noise-to-signal ratio
sum((e - mean(e))^2) / sum(y^2), e = y - y_int8, on a few calibration samples against the float model's
outputs computed once. The mean error per output element over the samples is taken out because bias
correction, which runs after this step, removes such shifts: on the PP-OCR classifier the plain error
(of its probabilities) preferred MSE ranges whose shift bias correction then could not fix (cosine to
float on its 200 evaluation lines 0.99749 trt / 0.99811 ort-cpu; with logits and the mean taken out
0.99861 / 0.99950; max 0.99893 / 0.99976). On EfficientNet-Lite0 neither change moved the result. One ONNX Runtime session of the tunable model (`onnxq.lower.tunable`: every group's
scale and zero point are graph inputs) answers every configuration; nothing is re-exported.

1. Every method for all groups at once; the best is the starting point (so the result is never worse,
   on these samples, than the best fixed method).
2. Coordinate descent: group by group, the groups whose candidates differ most first (largest ratio
   of their largest to smallest candidate: where the choice matters), each other candidate is tried
   with the rest fixed and kept when it lowers the error by more than `min_gain`; a second sweep while
   anything changed, within `max_runs` model runs (a count, so the result does not depend on the
   machine's speed) and, as a safety, `budget_seconds`; what was not reached keeps its range, and the
   finding says so.

Input grids: when a graph input's calibration values all lie on one uniform grid (8-bit images
normalised with one mean and std: (p - mean) / std), its scale is set to the grid's step (a multiple
of it if the range needs more than 255 steps), so quantization is exact there; the finding says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxq.calib.calibrate import full_batches
from onnxq.calib.expose import expose_tensors
from onnxq.calib.amax import entropy_amax, max_amax, mse_amax, percentile_amax
from onnxq.calib.histogram import Histogram
from onnxq.calib.ranges import activation_params, group_stats
from onnxq.data.sources import Feed
from onnxq.errors import ConfigError
from onnxq.io import from_graph, to_graph
from onnxq.lower.tunable import tunable_qdq
from onnxq.plan.core import QuantPlan
from onnxq.runtime.session import open_session
from onnxq.steps.base import Job, Step, StepSkipped
from onnxq.steps.bias_correction import checked_tensors

__all__ = ["ChooseRanges", "RangeChoice", "RangesChosen", "InputGrid", "candidate_ranges", "input_grid"]

_PERCENTILES = (99.9, 99.99, 99.999)
_SAME = 1e-3  # candidates within 0.1 % of each other count as one


def candidate_ranges(h: Histogram, levels: int) -> dict[str, float]:
    """The candidate amaxes of one histogram by name, in a fixed order, near-duplicates dropped."""
    found: dict[str, float] = {}
    named = [("mse", mse_amax(h, levels=levels)), ("max", max_amax(h)),
             *((f"percentile {p:g}", percentile_amax(h, p)) for p in _PERCENTILES),
             ("entropy", entropy_amax(h, levels + 1, levels + 1))]
    for name, amax in named:
        if amax > 0 and all(abs(amax - other) > _SAME * other for other in found.values()):
            found[name] = float(amax)
    return found or {"max": float(h.amax)}


@dataclass(frozen=True)
class InputGrid:
    """A graph input whose values all lie on one uniform grid: offset + k * step for integers k.

    Attributes:
        tensor: the input.
        step: the grid's step.
        offset: its smallest value.
        values: distinct values seen.
    """

    tensor: str
    step: float
    offset: float
    values: int

    def symmetric_amax(self) -> float:
        """The symmetric INT8 amax whose scale is the step, when 0 lies on the grid (else 0.0): values
        beyond +-127 steps are clipped, the rest quantized exactly."""
        if abs(self.offset / self.step - round(self.offset / self.step)) > 1e-3:
            return 0.0
        return 127.0 * self.step


def input_grid(name: str, arrays: Sequence[np.ndarray], max_values: int = 4096) -> InputGrid | None:
    """The uniform grid all values of `arrays` lie on (to float32 rounding), or None."""
    distinct = np.unique(np.concatenate([np.ravel(a) for a in arrays]))
    if not 2 <= distinct.size <= max_values or not np.all(np.isfinite(distinct)):
        return None
    values = distinct.astype(np.float64)
    span, smallest = values[-1] - values[0], float(np.min(np.diff(values)))
    step = span / round(span / smallest)  # the span over the step count: float32 rounding averages out
    positions = (values - values[0]) / step
    if np.max(np.abs(positions - np.rint(positions))) > 1e-3:
        return None
    return InputGrid(name, step, float(values[0]), int(distinct.size))


@dataclass(frozen=True)
class RangeChoice:
    """One scale group's range and why.

    Attributes:
        group: the group (its first tensor's name).
        candidate: the chosen candidate's name ("mse", "max", "percentile 99.99", "entropy", ...).
        amax: its range.
        reason: what was measured.
    """

    group: str
    candidate: str
    amax: float
    reason: str


@dataclass(frozen=True)
class RangesChosen:
    """What the range search measured and chose.

    Attributes:
        by_method: output error (mean noise-to-signal ratio) with every group on each method.
        start: the best of them, where the descent started.
        error: the output error of the chosen ranges.
        choices: one per group.
        grids: graph inputs found on a uniform grid (their "input grid" candidate: scale = step).
        runs: model runs over the samples.
        samples: calibration samples measured on.
        seconds: wall time.
        note: what the time budget cut short, if anything.
    """

    by_method: Mapping[str, float]
    start: str
    error: float
    choices: tuple[RangeChoice, ...]
    grids: tuple[InputGrid, ...] = ()
    runs: int = 0
    samples: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class ChooseRanges(Step):
    """Choose every scale group's range by measured output error (see the module docstring).

    Attributes:
        samples: calibration samples to measure on.
        max_runs: model runs for the per-group descent (the all-groups pass always runs).
        budget_seconds: a time limit for the descent as well (hit only on very slow models; then the
            result depends on the machine, and the finding says so).
        min_gain: relative error decrease a group's change must bring.
    """

    samples: int = 16
    max_runs: int = 48
    budget_seconds: float = 60.0
    min_gain: float = 0.002
    name = "range search"

    def __post_init__(self) -> None:
        if self.samples < 1 or self.max_runs < 0 or self.budget_seconds < 0 or not 0 <= self.min_gain < 1:
            raise ConfigError("range search: samples >= 1, max_runs >= 0, budget_seconds >= 0 and min_gain in [0, 1)")

    def refine(self, job: Job, plan: QuantPlan) -> tuple[QuantPlan, RangesChosen | StepSkipped | None]:
        if not plan.activations:
            return plan, None
        if job.source is None:
            return plan, StepSkipped(self.name, "--method auto from a statistics file: no samples to measure on, "
                                                "every range is MSE's")
        started = time.perf_counter()
        assert job.calibration is not None and job.graph is not None
        merged = group_stats(plan, job.calibration.stats)
        if not all(isinstance(h, Histogram) for h in merged.values()):
            return plan, StepSkipped(self.name, "--method auto needs histograms; every range is max's")
        scheme = job.target.scheme
        options = {g: candidate_ranges(h, scheme.levels(h.low, h.high)) for g, h in merged.items()}
        feeds = _samples(job, self.samples)
        grids = _grid_candidates(plan, feeds, options, scheme.symmetric)
        with _Measure(job, plan, feeds) as measure:
            by_method = {name: measure({g: c.get(name, c[next(iter(c))]) for g, c in options.items()})
                         for name in ("mse", "max", "percentile 99.99", "entropy")}
            start = min(by_method, key=by_method.__getitem__)
            current = {g: start if start in c else next(iter(c)) for g, c in options.items()}
            error, note = _descend(measure, options, current, by_method[start], self, started)
        choices = tuple(RangeChoice(g, current[g], options[g][current[g]], _reason(g, current[g], options[g]))
                        for g in options)
        job.ranges.update({choice.group: choice.amax for choice in choices})
        samples = sum(job.signature.samples_in(feed) for feed in feeds)
        return plan, RangesChosen(by_method, start, error, choices, grids=grids, runs=measure.runs, samples=samples,
                                  seconds=time.perf_counter() - started, note=note)


def _grid_candidates(plan: QuantPlan, feeds: Sequence[Feed], options: dict[str, dict[str, float]],
                     symmetric: bool) -> tuple[InputGrid, ...]:
    """Add an "input grid" candidate to every group of a graph input whose samples lie on a grid.

    Symmetric INT8: amax = 127 steps (scale = step; needs 0 on the grid). Asymmetric uint8: the seen
    range already gives scale = step and an integer zero point when it spans at most 255 steps, which
    "max" is; nothing to add.
    """
    found = []
    for activation in plan.activations:
        arrays = [feed[activation.tensor_name] for feed in feeds if activation.tensor_name in feed]
        grid = input_grid(activation.tensor_name, arrays) if arrays and arrays[0].dtype.kind == "f" else None
        if grid is None:
            continue
        found.append(grid)
        amax = grid.symmetric_amax() if symmetric else 0.0
        if amax > 0:
            options[activation.group] = {"input grid": amax, **options[activation.group]}
    return tuple(found)


def _reason(group: str, chosen: str, options: Mapping[str, float]) -> str:
    others = ", ".join(f"{name} {amax:.4g}" for name, amax in options.items() if name != chosen)
    return f"{chosen} ({options[chosen]:.4g}) measured best" + (f"; also tried {others}" if others else "")


def _descend(measure: _Measure, options: Mapping[str, Mapping[str, float]], current: dict[str, str],
             error: float, step: ChooseRanges, started: float) -> tuple[float, str]:
    """Coordinate descent over the groups (see the module docstring); changes `current` in place."""
    deadline, runs = time.perf_counter() + step.budget_seconds, measure.runs + step.max_runs
    order = sorted(options, key=lambda g: -max(options[g].values()) / min(options[g].values()))
    for sweep in range(2):
        changed = False
        for position, group in enumerate(order):
            for name in options[group]:
                if name == current[group]:
                    continue
                if measure.runs >= runs or time.perf_counter() > deadline:
                    limit = (f"{step.max_runs} runs" if measure.runs >= runs
                             else f"the time limit ({step.budget_seconds:g} s)")
                    return error, (f"{limit} reached in sweep {sweep + 1}: {len(order) - position} of {len(order)} "
                                   "groups (those whose candidates differ least) not revisited")
                trial = measure({g: options[g][current[g] if g != group else name] for g in options})
                if trial < error * (1.0 - step.min_gain):
                    current[group], error, changed = name, trial, True
        if not changed:
            break
    return error, ""


def _samples(job: Job, count: int) -> list[Feed]:
    """The first `count` calibration samples, in batches the model accepts."""
    assert job.source is not None and job.graph is not None
    feeds, taken = [], 0
    for feed in full_batches(job.source, job.graph, job.config.calib.batch_size, signature=job.signature):
        feeds.append(feed)
        taken += job.signature.samples_in(feed)
        if taken >= count:
            break
    return feeds


def _noise(errors: Sequence[np.ndarray]) -> float:
    """The error energy that bias correction leaves: each output element's mean error over the samples
    (axis 0 of every batch) taken out; the plain sum of squares when the batches cannot be stacked."""
    if all(e.ndim >= 1 and e.shape[1:] == errors[0].shape[1:] for e in errors):
        stacked = np.concatenate(errors)
        return float(np.sum((stacked - stacked.mean(axis=0)) ** 2))
    return float(sum(np.sum(e ** 2) for e in errors))


class _Measure:
    """The tunable model in one session; calling it with ranges gives the output error on the samples."""

    def __init__(self, job: Job, plan: QuantPlan, feeds: Sequence[Feed]) -> None:
        assert job.calibration is not None and job.graph is not None
        self.job, self.plan, self.feeds, self.runs = job, plan, feeds, 0
        self.stats = job.calibration.stats
        params = activation_params(plan, self.stats, job.config.calib, job.target.scheme)
        self.tunable = tunable_qdq(job.graph, plan, params)
        providers = job.config.calib.providers
        names = checked_tensors(job.model, job.graph.tensors())  # logits rather than saturated probabilities
        with open_session(from_graph(expose_tensors(to_graph(job.model), names), template=job.model),
                          providers) as reference:
            self.references = [reference.run(feed, list(names)) for feed in feeds]
        self.session = open_session(from_graph(expose_tensors(self.tunable.graph, names), template=job.model),
                                    providers)

    def __call__(self, amax: Mapping[str, float]) -> float:
        params = activation_params(self.plan, self.stats, self.job.config.calib, self.job.target.scheme, amax)
        fed = self.tunable.feed(params)
        errors: dict[str, list[np.ndarray]] = {}
        signal: dict[str, float] = {}
        for feed, reference in zip(self.feeds, self.references):
            outputs = self.session.run({**feed, **fed}, list(reference))
            for name, want in reference.items():
                want64 = np.asarray(want, dtype=np.float64)
                errors.setdefault(name, []).append(want64 - outputs[name])
                signal[name] = signal.get(name, 0.0) + float(np.sum(want64 ** 2))
        noise = {name: _noise(found) for name, found in errors.items()}
        self.runs += 1
        ratios = [noise[n] / signal[n] if signal[n] > 0 else noise[n] for n in noise]
        value = float(np.mean(ratios)) if ratios else 0.0
        return value if math.isfinite(value) else math.inf

    def __enter__(self) -> _Measure:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.session.close()
