"""Automatic fallback: the fewest layers left in float that bring the INT8 model within an accuracy target.

1. Sensitivity (`onnxq.steps.accuracy.sensitivity`): every layer alone and recovered, on held-back samples.
2. Greedy by recovery: layers sorted by how much putting each alone back in float improves the
   outputs; the shortest prefix of that order that meets the target is found by doubling the
   prefix (1, 2, 4, ...) and then bisecting, one gated run per tried prefix.
3. Prune: each chosen layer, least recovering first, is quantized again if the target still holds.
   Steps 2 and 3 ask one question at a time (`greedy_search`); with several measuring processes the
   next asks are measured ahead, by speculation, and the answers followed exactly as one at a time
   (`onnxq.steps.accuracy.speculation`): the same layers, more runs (`FallbackResult.wasted`).
4. Verify: the model is built for real (the plan re-made with those nodes excluded, the same
   calibration statistics, `insert_qdq`, the checker) and measured. `met` is what this says. The
   gates reproduce the built model bit for bit except where a Concat's shared scale changes or the
   model is converted to float16; if the built model then misses the target, the next layers by rank
   fall back (1, 2, 4, ... more, each built and measured in this process, one at a time whatever the
   measurer) and `FallbackResult.note` says so.

A target that needs every layer in float cannot be met: `TargetNotMetError` (a `CalibrationError`),
unless `AccuracyGoal.write_anyway`, which keeps the fully quantized model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import onnx

from onnxq.data.signature import ModelSignature
from onnxq.data.sources import CalibSource
from onnxq.calib.ranges import activation_params
from onnxq.calib.stats import TensorStats
from onnxq.config import AccuracyGoal
from onnxq.options import CalibConfig
from onnxq.errors import CalibrationError
from onnxq.lower.scales import INT8_SYMMETRIC, ActivationScheme
from onnxq.plan.replan import with_reasons
from onnxq.steps.accuracy.layers import LayerMap
from onnxq.plan.core import QuantPlan
from onnxq.steps.accuracy.gate_workers import MeasurerFactory
from onnxq.steps.accuracy.process_pool import local_measurers
from onnxq.steps.accuracy.speculation import EVEN, FAILS, Ask, Speculator
from onnxq.steps.accuracy.sensitivity import (GatedRunner, HeldBack, LayerSensitivity, RunCallback, SensitivityResult, load_held_back,
                          measure_model, measure_sensitivity, worst)
from onnxq.metrics import OutputMetrics

__all__ = ["FallbackLayer", "FallbackResult", "AccuracyOutcome", "TargetNotMetError", "meets", "margin_db",
           "greedy_search", "search_fallback", "run_accuracy"]

_COSINE_FLOOR = 1e-15  # 1 - cosine below this counts as identical (150 dB)
#: Layers are ranked on this many held-back samples; the search and the verification use all of them.
RANK_SAMPLES = 8


@dataclass(frozen=True)
class FallbackLayer:
    """A layer left in float, and why.

    Attributes:
        node_name: the node.
        op_type: its op type.
        reason: its rank by recovery and what putting it alone back in float gained.
        recovered_cosine: output cosine with only this layer in float.
        recovered_sqnr_db: output SQNR (dB) with only this layer in float.
    """

    node_name: str
    op_type: str
    reason: str
    recovered_cosine: float
    recovered_sqnr_db: float


@dataclass(frozen=True)
class FallbackResult:
    """What fell back and what it gained.

    Attributes:
        float_layers: the layers left in float, most recovering first, each with its reason.
        before: the fully quantized model against float, per output.
        after: the returned model against float, per output, measured on the real model.
        met: `after` meets the target.
        seconds: wall time of the search and the verification.
        runs: passes over the held-back samples (gated runs, those measured ahead included, and the
            verification).
        target: the target searched for.
        estimate: the gated model's metrics for the layers the search chose (equal to `after` when
            the gates reproduce the built model, which is the rule).
        note: why the target was not met, or how the built model disagreed with the estimate (then
            more layers may have fallen back to meet the target on the built model).
        wasted: gated runs measured ahead for idle workers (`--jobs`) that the search never asked for
            (counted in `runs`; `runs - wasted` is what the search costs one at a time).
    """

    float_layers: tuple[FallbackLayer, ...]
    before: tuple[OutputMetrics, ...]
    after: tuple[OutputMetrics, ...]
    met: bool
    seconds: float
    runs: int = 0
    target: AccuracyGoal = AccuracyGoal()
    estimate: tuple[OutputMetrics, ...] = ()
    note: str = ""
    wasted: int = 0

    @property
    def float_layer_names(self) -> tuple[str, ...]:
        return tuple(layer.node_name for layer in self.float_layers)


@dataclass(frozen=True)
class AccuracyOutcome:
    """Everything the accuracy stage decided: the model to return and how it was chosen."""

    sensitivity: SensitivityResult | None
    fallback: FallbackResult | None
    plan: QuantPlan
    model: onnx.ModelProto
    held_samples: int = 0
    held_data: str = ""


class TargetNotMetError(CalibrationError):
    """The target is not met: no model with a quantized layer meets it, or the built model missed it.

    Attributes:
        result: the measurements, as `quantize` would have returned them with `write_anyway`.
    """

    def __init__(self, message: str, result: FallbackResult) -> None:
        super().__init__(message)
        self.result = result


def _cosine_db(cosine: float) -> float:
    return -10.0 * math.log10(max(1.0 - cosine, _COSINE_FLOOR))


def _margin(cosine: float, sqnr_db: float, target: AccuracyGoal) -> float:
    margins = [math.inf]
    if target.min_cosine is not None:
        margins.append(_cosine_db(cosine) - _cosine_db(target.min_cosine))
    if target.max_sqnr_drop_db is not None:
        margins.append(sqnr_db - target.max_sqnr_drop_db)
    value = min(margins)
    return -math.inf if math.isnan(value) else value


def margin_db(metrics: Sequence[OutputMetrics], target: AccuracyGoal) -> float:
    """How far the worst output is inside the target, in dB (cosine c counts as -10*log10(1-c)); < 0: missed."""
    return _margin(*worst(metrics), target)


def meets(metrics: Sequence[OutputMetrics], target: AccuracyGoal) -> bool:
    """Every output meets every threshold of `target` (NaN never does)."""
    cosine, sqnr = worst(metrics)
    return not ((target.min_cosine is not None and not cosine >= target.min_cosine)
                or (target.max_sqnr_drop_db is not None and not sqnr >= target.max_sqnr_drop_db))


def _by_recovery(sensitivity: SensitivityResult, target: AccuracyGoal) -> list[LayerSensitivity]:
    """Layers sorted by how far inside the target each alone in float brings the outputs, best first."""
    return sorted(sensitivity.layers, key=lambda e: -_margin(e.recovered_cosine, e.recovered_sqnr_db, target))


@dataclass(frozen=True)
class _Choice:
    """The search's answer: the float layers (None: infeasible), every set it asked for (in the order it
    asked) and how many sets were measured ahead and never asked for."""

    float_layers: tuple[str, ...] | None
    measured: Mapping[frozenset[str], tuple[OutputMetrics, ...]]
    wasted: int = 0


def greedy_search(order: Sequence[str], ask: Ask) -> tuple[str, ...] | None:
    """The serial search over layers ranked best first: the fewest float layers it finds (None: only all).

    Doubling finds a prefix of `order` that holds (1, 2, 4, ...; the full order is never asked), bisection
    the shortest one between the last that failed and it, and pruning then tries each of its layers, least
    recovering first, quantized again. A pure function of `ask`'s answers (`speculation.Speculator` relies
    on it), with each ask's guess of its answer.
    """
    if ask((), FAILS):
        return ()
    failing, passing, size = 0, len(order), 1  # prefix lengths
    while size < len(order):
        if ask(order[:size], FAILS):
            passing = size
            break
        failing, size = size, size * 2
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if ask(order[:middle], EVEN):
            passing = middle
        else:
            failing = middle
    if passing == len(order):
        return None
    chosen = list(order[:passing])
    for name in reversed(order[:passing]):
        trial = [other for other in chosen if other != name]
        if ask(trial, FAILS):
            chosen = trial
    return tuple(chosen)


def search_fallback(runner: GatedRunner, layer_map: LayerMap, sensitivity: SensitivityResult,
                    target: AccuracyGoal, width: int | None = None) -> _Choice:
    """`greedy_search` over the layers by recovery, each ask a gated run on every held-back sample.

    With `width` > 1 (default: the runner's measurer's `jobs`), up to that many runs are measured at once
    by speculation (`speculation.Speculator`): the same asks answered, the same layers chosen, more runs.
    """
    order = [entry.node_name for entry in _by_recovery(sensitivity, target)]
    width = getattr(runner, "width", 1) if width is None else width

    def measure(keys: list[frozenset[str]]) -> list[tuple[OutputMetrics, ...]]:
        if len(keys) == 1:
            return [runner.measure(layer_map.gates(keys[0]))]
        return runner.measure_many([layer_map.gates(key) for key in keys])

    speculator = Speculator(measure, lambda metrics: meets(metrics, target), width,
                            {frozenset(): sensitivity.float_vs_int8})
    chosen = speculator.run(lambda ask: greedy_search(order, ask))
    return _Choice(chosen, speculator.measured, len(speculator.ahead))


def _fallen(entry: LayerSensitivity, rank: int, count: int, full: tuple[float, float]) -> FallbackLayer:
    reason = (f"rank {rank} of {count} by recovery: alone in float it lifts cosine {full[0]:.5f} -> "
              f"{entry.recovered_cosine:.5f}, SQNR {full[1]:.2f} -> {entry.recovered_sqnr_db:.2f} dB")
    return FallbackLayer(entry.node_name, entry.op_type, reason, entry.recovered_cosine, entry.recovered_sqnr_db)


def _infeasible_note(choice: _Choice, layer_count: int, target: AccuracyGoal) -> str:
    partial = [(margin_db(m, target), len(key), m) for key, m in choice.measured.items() if len(key) < layer_count]
    if not partial:
        return f"{target.describe()} cannot be met: the plan has no layer that can fall back to float"
    _, floated, best = max(partial, key=lambda item: (item[0], -item[1]))
    return (f"{target.describe()} cannot be met with any layer quantized: the closest measured, with "
            f"{floated} of {_layers(layer_count)} in float, reaches {_figures(best)}")


def _layers(count: int) -> str:
    return f"{count} layer{'' if count == 1 else 's'}"


def _figures(metrics: Sequence[OutputMetrics]) -> str:
    cosine, sqnr = worst(metrics)
    return f"cosine {cosine:.5f}, SQNR {sqnr:.2f} dB"


@dataclass(frozen=True)
class _Built:
    """A set of float layers, built for real and measured."""

    layers: tuple[FallbackLayer, ...]
    plan: QuantPlan
    model: onnx.ModelProto
    after: tuple[OutputMetrics, ...]


class _Stage:
    """What the search and the verification share."""

    def __init__(self, runner: GatedRunner, layer_map: LayerMap, sensitivity: SensitivityResult,
                 target: AccuracyGoal, build: Callable[[QuantPlan], onnx.ModelProto], providers: Sequence[str]):
        self.runner, self.layer_map, self.sensitivity, self.target = runner, layer_map, sensitivity, target
        self.build, self.providers, self.builds = build, providers, 0
        self.order = [entry.node_name for entry in _by_recovery(sensitivity, target)]

    def built(self, names: Sequence[str]) -> _Built:
        """Build the model with `names` in float through `build` and measure it on the held-back samples."""
        rank = {name: i for i, name in enumerate(self.order)}
        full = worst(self.sensitivity.float_vs_int8)
        layers = tuple(_fallen(self.sensitivity.layer(n), rank[n] + 1, len(rank), full)
                       for n in sorted(names, key=rank.__getitem__))
        plan = with_reasons(self.layer_map.final_plan(names),
                            {layer.node_name: f"accuracy fallback: {layer.reason}" for layer in layers})
        model = self.build(plan)
        self.builds += 1
        return _Built(layers, plan, model, measure_model(model, self.runner.held, self.providers))

    def repaired(self, first: _Built) -> tuple[_Built, str]:
        """When the built model misses the target the gates met, fall back the next layers by rank
        (1, 2, 4, ... more, never all), each built and measured, until it holds."""
        if meets(first.after, self.target):
            return first, ""
        names = [layer.node_name for layer in first.layers]
        rest = [name for name in self.order if name not in names]
        current, more = first, 1
        while not meets(current.after, self.target) and more < len(rest):
            current, more = self.built(names + rest[:more]), more * 2
        missed = (f"the gated estimate met {self.target.describe()} with {_layers(len(names))} in float but the "
                  f"built model does not ({_figures(first.after)})")
        if meets(current.after, self.target):
            return current, f"{missed}; {_layers(len(current.layers) - len(names))} more fell back to meet it"
        return current, f"{missed}, nor does any built model with more layers in float and one quantized"


def _fall_back(stage: _Stage) -> AccuracyOutcome:
    started, runs_before = time.perf_counter(), stage.runner.runs
    choice = search_fallback(stage.runner, stage.layer_map, stage.sensitivity, stage.target)
    before = stage.sensitivity.float_vs_int8
    if choice.float_layers is None:
        note = _infeasible_note(choice, len(stage.layer_map.layers), stage.target)
        result = FallbackResult((), before, before, False, time.perf_counter() - started,
                                stage.runner.runs - runs_before, stage.target, before, note, choice.wasted)
        _raise_unless_anyway(result, stage.runner.held)
        return AccuracyOutcome(stage.sensitivity, result, stage.layer_map.plan, stage.build(stage.layer_map.plan))
    final, note = stage.repaired(stage.built(choice.float_layers))
    result = FallbackResult(final.layers, before, final.after, meets(final.after, stage.target),
                            time.perf_counter() - started, stage.runner.runs - runs_before + stage.builds,
                            stage.target, choice.measured[frozenset(choice.float_layers)], note, choice.wasted)
    _raise_unless_anyway(result, stage.runner.held)
    return AccuracyOutcome(stage.sensitivity, result, final.plan, final.model)


def _raise_unless_anyway(result: FallbackResult, held: HeldBack) -> None:
    if not result.met and not result.target.write_anyway:
        raise TargetNotMetError(f"accuracy target not met on {held.samples} held-back samples: {result.note}. "
                                "Hint: lower the target, or --write-anyway to keep the model", result)


def run_accuracy(layer_map: LayerMap, stats: Mapping[str, TensorStats], template: onnx.ModelProto,
                 held_back: CalibSource | HeldBack, build: Callable[[QuantPlan], onnx.ModelProto],
                 target: AccuracyGoal, calib: CalibConfig = CalibConfig(), *,
                 signature: ModelSignature | None = None, on_progress: RunCallback | None = None,
                 scheme: ActivationScheme = INT8_SYMMETRIC, amax: Mapping[str, float] | None = None,
                 measurers: MeasurerFactory | None = None) -> AccuracyOutcome:
    """Measure sensitivity and, if `target` has a threshold, fall back until it is met.

    Args:
        layer_map: the full plan's layers (it holds the prepared graph, selection and target),
            restricted to the tensors `stats` covers.
        stats: calibration statistics of every tensor in `layer_map.calibrated_names` (or fewer).
        template: the float model: the reference outputs and the metadata of built models.
        held_back: the held-back samples, or already loaded ones.
        build: makes the final model from a plan (the normal quantize path, same statistics).
        target: the thresholds.
        calib: batch size and providers for the runs.
        signature: the model's input signature (sample axes, fixed batch); default: read from `template`.
        on_progress: called after each pass over the held-back samples with (runs, planned or None).
        scheme: the target's activation scheme (the gated model's scales and zero points).
        amax: ranges chosen by group (a range search's); other groups get the method's.
        measurers: who runs the gated model (default: `local_measurers(target.jobs)`); the results are the
            same whoever does.

    Raises:
        TargetNotMetError: the target is not met and `target.write_anyway` is False.
    """
    started = time.perf_counter()
    held = held_back if isinstance(held_back, HeldBack) else load_held_back(
        template, held_back, calib.batch_size, calib.providers, signature=signature)
    params = activation_params(layer_map.gated_plan, stats, calib, scheme, amax)
    measurers = local_measurers(target.jobs) if measurers is None else measurers
    with GatedRunner(layer_map, params, template, held, calib.providers, on_progress, measurers) as runner:
        if not target.has_threshold:
            sensitivity = measure_sensitivity(runner, layer_map, started)
            outcome = AccuracyOutcome(sensitivity, None, layer_map.plan, build(layer_map.plan))
        else:
            full = runner.measure(layer_map.gates(()))
            outcome = _met_fully_quantized(runner, layer_map, full, target, build, calib.providers, started) \
                if meets(full, target) else None
            if outcome is None:
                sensitivity = measure_sensitivity(runner, layer_map, started, full=full, alone=False,
                                                  samples=RANK_SAMPLES)
                outcome = _fall_back(_Stage(runner, layer_map, sensitivity, target, build, calib.providers))
    return replace(outcome, held_samples=held.samples, held_data=held.description)


def _met_fully_quantized(runner: GatedRunner, layer_map: LayerMap, full: tuple[OutputMetrics, ...],
                         target: AccuracyGoal, build: Callable[[QuantPlan], onnx.ModelProto],
                         providers: Sequence[str], started: float) -> AccuracyOutcome | None:
    """The fully quantized model, built and measured, when it meets the target (None when it does not)."""
    model = build(layer_map.plan)
    after = measure_model(model, runner.held, providers)
    if not meets(after, target):
        return None
    result = FallbackResult((), full, after, True, time.perf_counter() - started, runner.runs + 1, target, full,
                            "the fully quantized model meets the target: no layer measured or left float")
    return AccuracyOutcome(None, result, layer_map.plan, model)
