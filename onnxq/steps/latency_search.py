"""Latency-aware placement for ONNX Runtime's CPU provider: keep INT8 only where it runs faster here.

Whether one of ORT's integer kernels beats its float counterpart depends on the CPU, the shapes and
the kernel: on the PP-OCR classifier the uint8 5x5 depthwise QLinearConv takes several times as long
as the float NCHWc convolution it replaces, while its 1x1 convolutions gain. Rules cannot know that
for every machine, so this measures:

1. The quantized layers are grouped into classes that share a kernel: op type, and for convolutions
   depthwise or not and the kernel size ("Conv depthwise 5x5", "Conv 1x1", "MatMul", ...).
2. Each class in turn (largest first) is put in float: the plan is re-made with its nodes excluded,
   the model built with the same calibration statistics, and it is timed against the current best,
   interleaved, on one calibration batch, with ORT's graph optimisations on. The class stays float when
   that is faster by more than `min_gain` in two separate rounds; otherwise it stays INT8. When any
   class went float, a second sweep retries the classes still INT8 (their neighbours have changed).
3. The chosen model is timed against the float model once more. The result records every trial
   (times and decision) and that final ratio, so a user sees what was measured and why each class
   ended where it did. Nothing guarantees INT8 beats float: when no class pays off the result says so.

Noise: every comparison is interleaved (see `onnxq.runtime.timing`) and sessions do not spin idle threads, and a
class goes float only on a repeated gain, so a burst of load elsewhere cannot flip a decision alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.errors import ConfigError, InternalError, ModelError
from onnxq.plan.core import QuantPlan
from onnxq.runtime.session import Session, open_session
from onnxq.runtime.timing import time_interleaved, wall_clock_timer
from onnxq.steps.base import Job, Step, StepSkipped

__all__ = ["LatencySearchConfig", "ClassTrial", "LatencySearch", "SearchLatency", "layer_classes", "search_latency"]

Replan = Callable[[Mapping[str, str]], QuantPlan]
Progress = Callable[[int, int | None], None]

# A class whose float version is slower than this fraction in the probe round is decided there.
_CLEAR_LOSS = 0.15
# Sweeps over the classes: putting one class in float changes its neighbours' Q/DQ and layouts, so a
# class that lost while everything around it was INT8 may win once they are float. A second sweep
# retries the classes still INT8, when the first changed anything.
_SWEEPS = 2

@dataclass(frozen=True)
class LatencySearchConfig:
    """How the latency search measures.

    Attributes:
        runs: timed runs per model and round (interleaved; the median is compared).
        warmup: untimed runs per model first.
        min_gain: the fraction by which float must be faster (e.g. 0.03: 3%) to leave a class float.
        providers: ONNX Runtime providers for the timing sessions.
    """

    runs: int = 20
    warmup: int = 3
    min_gain: float = 0.03
    providers: tuple[str, ...] = ("cpu",)

    def __post_init__(self) -> None:
        if self.runs < 3 or self.warmup < 0:
            raise ConfigError(f"latency search needs >= 3 runs and >= 0 warm-up runs, got {self.runs}, {self.warmup}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ConfigError(f"latency search: min_gain must be in [0, 1), got {self.min_gain}")


@dataclass(frozen=True)
class ClassTrial:
    """One class of layers timed in INT8 and in float.

    Attributes:
        layer_class: e.g. "Conv depthwise 5x5".
        nodes: the class's quantized nodes.
        kept_int8: the decision.
        reason: why, with the figures.
        medians_ms: (the best model so far with the class INT8, the same with the class also in float),
            median latencies in ms; also as `int8_ms` and `float_ms`.
    """

    layer_class: str
    nodes: tuple[str, ...]
    kept_int8: bool
    reason: str
    medians_ms: tuple[float, float]

    @property
    def int8_ms(self) -> float:
        return self.medians_ms[0]

    @property
    def float_ms(self) -> float:
        return self.medians_ms[1]


@dataclass(frozen=True)
class LatencySearch:
    """What the search measured and decided.

    Attributes:
        float_model_ms: the float model (as given) on the same batch, median.
        start_ms: the INT8 model of the full plan, median.
        final_ms: the chosen model, median (timed beside the float model once more when it differs
            from the full plan's).
        trials: every class tried, in order (a class tried again in the second sweep appears twice).
        float_nodes: the nodes left in float for speed.
        seconds: wall time of the search.
    """

    float_model_ms: float
    start_ms: float
    final_ms: float
    trials: tuple[ClassTrial, ...]
    float_nodes: tuple[str, ...]
    seconds: float = 0.0

    @property
    def speedup(self) -> float:
        """Float model latency over the chosen INT8 model's (> 1: INT8 faster)."""
        return self.float_model_ms / self.final_ms if self.final_ms > 0 else float("nan")


def _class_of(node: gs.Node) -> str:
    if node.op not in ("Conv", "ConvTranspose"):
        return node.op
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    values = getattr(weight, "values", None)
    kernel = "x".join(str(k) for k in np.shape(values)[2:]) if values is not None else "?"
    group = int(node.attrs.get("group", 1))
    if group > 1 and values is not None and np.shape(values)[1] == 1:
        return f"{node.op} depthwise {kernel}"
    return f"{node.op} grouped {kernel}" if group > 1 else f"{node.op} {kernel}"


def layer_classes(graph: gs.Graph, plan: QuantPlan) -> dict[str, tuple[str, ...]]:
    """The plan's quantized nodes by class, largest class first (ties by name)."""
    nodes = {node.name: node for node in graph.nodes}
    classes: dict[str, list[str]] = {}
    for decision in plan.quantized_nodes:
        node = nodes.get(decision.node_name)
        if node is not None:
            classes.setdefault(_class_of(node), []).append(node.name)
    ordered = sorted(classes.items(), key=lambda item: (-len(item[1]), item[0]))
    return {name: tuple(members) for name, members in ordered}


class _Timer:
    """Times models on one feed: sessions with ORT's optimisations on and no spinning threads, kept open
    for the models `retain` names (the float model and the best so far are timed again and again)."""

    def __init__(self, feed: Mapping[str, np.ndarray], config: LatencySearchConfig) -> None:
        self.feed, self.config = dict(feed), config
        self._open: dict[int, tuple[onnx.ModelProto, Session]] = {}

    def _session(self, model: onnx.ModelProto) -> Session:
        if id(model) not in self._open:
            self._open[id(model)] = (model, open_session(model, self.config.providers, optimize=True, spin=False))
        return self._open[id(model)][1]

    def medians(self, models: list[onnx.ModelProto], runs: int | None = None) -> list[float]:
        """Median ms per model. A model ORT cannot load or run here is one onnxq built (the float model has
        already run in calibration): an InternalError, not an error blaming the user's model."""
        try:
            sessions = [self._session(model) for model in models]
            timers = [wall_clock_timer(lambda s=session: s.run(self.feed)) for session in sessions]
            stats = time_interleaved(timers, self.config.warmup, runs or self.config.runs)
        except ModelError as err:
            raise InternalError(f"the latency search built a model ONNX Runtime cannot run with its graph "
                                f"optimizations on: {err}. This is an onnxq bug; --no-latency-search avoids it "
                                "meanwhile") from None
        return [result.median_ms for result in stats]

    def retain(self, models: list[onnx.ModelProto]) -> None:
        """Close the sessions of every model but these."""
        keep = {id(model) for model in models}
        for key in [key for key in self._open if key not in keep]:
            self._open.pop(key)[1].close()


def _trial(timer: _Timer, best: onnx.ModelProto, candidate: onnx.ModelProto, name: str, members: tuple[str, ...],
           config: LatencySearchConfig, sweep: int) -> ClassTrial:
    """Time the best model so far against `candidate` (the class in float); a win must repeat.

    A short probe round comes first: a class whose float version is clearly slower (by more than
    `_CLEAR_LOSS`) is decided there, without the full rounds."""
    probe = max(3, config.runs // 4)
    int8_ms, float_ms = timer.medians([best, candidate], probe)
    gain = 1.0 - float_ms / int8_ms
    if gain < -_CLEAR_LOSS:
        reason = (f"INT8 kept: float clearly slower, {abs(100 * gain):.1f}% ({int8_ms:.2f} vs {float_ms:.2f} ms, "
                  f"{probe}-run probe)")
        return ClassTrial(name, members, True, reason + (f" [sweep {sweep + 1}]" if sweep else ""),
                          (int8_ms, float_ms))
    int8_ms, float_ms = timer.medians([best, candidate])
    gain = 1.0 - float_ms / int8_ms
    if gain > config.min_gain:
        int8_ms, float_ms = timer.medians([best, candidate])  # confirm in a second round
        gain = min(gain, 1.0 - float_ms / int8_ms)
    if gain > config.min_gain:
        reason = f"float is {100 * gain:.1f}% faster ({float_ms:.2f} vs {int8_ms:.2f} ms, two rounds)"
    elif gain <= 0:
        reason = f"INT8 kept: float would be {abs(100 * gain):.1f}% slower ({int8_ms:.2f} vs {float_ms:.2f} ms)"
    else:
        reason = (f"INT8 kept: float only {100 * gain:.1f}% faster (< {100 * config.min_gain:.0f}%) "
                  f"({int8_ms:.2f} vs {float_ms:.2f} ms)")
    if sweep > 0:
        reason += f" [sweep {sweep + 1}]"
    return ClassTrial(name, members, gain <= config.min_gain, reason, (int8_ms, float_ms))


def search_latency(graph: gs.Graph, plan: QuantPlan, replan: Replan, build: Callable[[QuantPlan], onnx.ModelProto],
                   float_model: onnx.ModelProto, feed: Mapping[str, np.ndarray],
                   config: LatencySearchConfig = LatencySearchConfig(),
                   on_progress: Progress | None = None) -> tuple[QuantPlan, onnx.ModelProto, LatencySearch]:
    """Leave in float every class of layers that ORT's CPU provider runs faster in float (see module doc).

    Args:
        graph: the prepared float graph the plan was made for.
        plan: the plan to start from.
        replan: the plan with these nodes (name -> reason) also kept float (`Job.replan`).
        build: makes the checked INT8 model of a plan.
        float_model: the float model as given, for the reference latency.
        feed: one calibration batch to time on.
        config: runs, warm-up, min_gain, providers.
        on_progress: called after each trial with (trials done, trials planned so far).

    Returns:
        The chosen plan, its model, and what was measured.
    """
    started = time.perf_counter()
    timer = _Timer(feed, config)
    try:
        return _search(timer, graph, plan, replan, build, float_model, config, on_progress, started)
    finally:
        timer.retain([])


def _search(timer: _Timer, graph: gs.Graph, plan: QuantPlan, replan: Replan,
            build: Callable[[QuantPlan], onnx.ModelProto], float_model: onnx.ModelProto, config: LatencySearchConfig,
            on_progress: Progress | None, started: float) -> tuple[QuantPlan, onnx.ModelProto, LatencySearch]:
    classes = layer_classes(graph, plan)
    best_plan, best_model = plan, build(plan)
    float_ms, start_ms = timer.medians([float_model, best_model])
    float_nodes: dict[str, str] = {}
    trials: list[ClassTrial] = []
    pending = dict(classes)
    total = len(classes)
    for sweep in range(_SWEEPS):
        changed = False
        for name, members in list(pending.items()):
            candidate_plan = replan({**float_nodes, **dict.fromkeys(members, "")})
            candidate = build(candidate_plan)
            trial = _trial(timer, best_model, candidate, name, members, config, sweep)
            if not trial.kept_int8:
                float_nodes.update(dict.fromkeys(members, f"latency search: {name} kept float, {trial.reason}"))
                del pending[name]
                changed = True
                best_plan, best_model = replan(float_nodes), candidate
            timer.retain([float_model, best_model])
            trials.append(trial)
            if on_progress is not None:
                on_progress(len(trials), total)
        if not changed or not pending:
            break
        total = len(trials) + len(pending)  # a second sweep over the classes still INT8
    if float_nodes:  # the chosen model against the float model, in one more interleaved round
        float_ms, final_ms = timer.medians([float_model, best_model])
    else:
        final_ms = start_ms
    return best_plan, best_model, LatencySearch(float_ms, start_ms, final_ms, tuple(trials), tuple(float_nodes),
                                                time.perf_counter() - started)


@dataclass(frozen=True)
class SearchLatency(Step):
    """The latency search as a step of `quantize` (after calibration: needs a batch to time).

    Attributes:
        config: how it measures.
        requested: True when the user asked for it (refused where it cannot run); False when it runs
            as the target's default (then skipped, with a finding saying why, where it cannot).
    """

    config: LatencySearchConfig = LatencySearchConfig()
    requested: bool = True
    name = "latency search"

    def _why_not(self, job: Job) -> str | None:
        if job.target.latency_search_unsupported:
            return f"it is not for --target {job.target.name} ({job.target.latency_search_unsupported})"
        if job.source is None:
            return "a statistics file holds no batch to time (give --calib for one)"
        return None

    def check(self, job: Job) -> None:
        why_not = self._why_not(job)
        if why_not is not None and self.requested:
            raise ConfigError(f"--latency-search cannot run: {why_not}")

    def refine(self, job: Job, plan: QuantPlan) -> tuple[QuantPlan, LatencySearch | StepSkipped | None]:
        why_not = self._why_not(job)
        if why_not is not None:
            return plan, StepSkipped(self.name, f"no latency search: {why_not}")
        if not plan.quantized_nodes:
            return plan, None  # nothing to time (the result notes that nothing was quantized)
        feed = job.first_batch()
        if feed is None:
            return plan, StepSkipped(self.name, "no latency search: the calibration data holds no full batch")
        assert job.graph is not None
        chosen, _, found = search_latency(job.graph, plan, job.replan, job.build, job.model, feed, self.config,
                                          job.progress("timing layer classes"))
        job.keep_float({d.node_name: d.reason for d in chosen.decisions if d.node_name in found.float_nodes})
        return chosen, found
