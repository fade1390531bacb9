"""Steps: features that plug into `quantize` at fixed points, composed in order.

`quantize` runs one pipeline; a step is a frozen object whose hooks the pipeline calls at each point,
in the order the steps are given (every hook defaults to doing nothing):

    check(job)                  before anything: refuse what cannot run (ConfigError)
    hold_back(job)              samples to keep out of calibration (accuracy targets)
    rewrite(job, graph)         before planning: rewrite the prepared graph (SmoothQuant)
    extra_tensors(job, plan)    before calibration: more tensors to calibrate (the fallback's re-plans)
    refine(job, plan)           after calibration: a better plan, and a finding that says what was done

`Job` is the state of one run that the steps share: the float model and its signature, the config and
target, the data, the prepared graph, the calibration statistics, `replan` (the shared re-plan
primitive: the plan with more nodes kept float) and `build` (the checked INT8 model of a plan, cached).
A new algorithm is one module with one `Step` subclass.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import onnx
import onnx_graphsurgeon as gs

import onnxq.external_data as external_data
from onnxq.calib.calibrate import CalibrationResult, full_batches
from onnxq.calib.ranges import activation_params, group_amax
from onnxq.config import QuantConfig
from onnxq.data.signature import ModelSignature
from onnxq.data.sources import CalibSource, Feed
from onnxq.errors import InternalError
from onnxq.io import check_model, from_graph
from onnxq.lower.insert_qdq import insert_qdq
from onnxq.plan.core import QuantPlan
from onnxq.plan.replan import Replanner, gate_slots, restrict_plan, with_reasons
from onnxq.targets.base import QuantTarget

if TYPE_CHECKING:
    from onnxq.cluster.pool import WorkerPool

__all__ = ["ProgressCallback", "HoldBack", "Job", "Step", "StepSkipped"]

#: Progress of long work: (stage, done, total or None), e.g. ("calibrating", 24, 64).
ProgressCallback = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class HoldBack:
    """Samples a step measures on and calibration must not see.

    Attributes:
        samples: at most this many.
        source: where they come from; None: every 4th calibration sample.
    """

    samples: int
    source: CalibSource | None = None


@dataclass(frozen=True)
class StepSkipped:
    """A step that had nothing to do, and why (a finding like any other)."""

    step: str
    reason: str


@dataclass
class Job:
    """The shared state of one `quantize` run, filled in pipeline order (steps read it; only the
    pipeline, `keep_float` and `replace_graph` change it).

    Attributes:
        model: the float model as given (reference outputs, metadata of every built model).
        signature: its inputs as data must feed them (sample axes, fixed batch).
        config: the whole config; `target` is `config.target`.
        source: calibration data without the held-back samples (None with a statistics file).
        held_back: the held-back samples, when a step asked for them.
        graph: the prepared (and rewritten) float graph, once planned.
        replanner: the target's plans of `graph`, once planned.
        calibration: the statistics, once calibrated.
        kept_float: nodes the steps have put back in float so far, each with its reason.
        ranges: amaxes chosen by a step (the range search) by scale group; other groups get the method's.
        findings: what the steps found and did, in order (`report`, and `refine`'s second value).
        on_progress: where long work reports to.
        workers: the Ray worker pool of the run (`onnxq.cluster`), when it was given one: calibration runs
            there, and a step with many independent measurements may spread them over it.
        held_back_from_calib: the held-back samples were taken out of the calibration data (no separate
            evaluation data), so `source` is a subset of what was given.
    """

    model: onnx.ModelProto
    signature: ModelSignature
    config: QuantConfig
    source: CalibSource | None
    held_back: CalibSource | None = None
    graph: gs.Graph | None = None
    replanner: Replanner | None = None
    calibration: CalibrationResult | None = None
    kept_float: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, float] = field(default_factory=dict)
    findings: list[object] = field(default_factory=list)
    on_progress: ProgressCallback | None = None
    workers: WorkerPool | None = None
    held_back_from_calib: bool = False
    _built: dict[QuantPlan, onnx.ModelProto] = field(default_factory=dict, repr=False)
    _amax: dict[frozenset[str], float] = field(default_factory=dict, repr=False)

    @property
    def target(self) -> QuantTarget:
        return self.config.target

    def progress(self, stage: str) -> Callable[[int, int | None], None] | None:
        """A (done, total) callback reporting under `stage`, or None when nobody listens."""
        report = self.on_progress
        return None if report is None else (lambda done, total: report(stage, done, total))

    def _ready(self) -> tuple[gs.Graph, Replanner, CalibrationResult]:
        if self.graph is None or self.replanner is None or self.calibration is None:
            raise InternalError("a step asked for a plan or a model before calibration")
        return self.graph, self.replanner, self.calibration

    def replan(self, float_nodes: Mapping[str, str] | Iterable[str] = ()) -> QuantPlan:
        """The target's plan with `kept_float` and `float_nodes` excluded, restricted to the calibrated
        tensors, each excluded node saying why (a mapping gives the reasons; names alone keep the
        planner's)."""
        _, replanner, calibration = self._ready()
        extra = dict(float_nodes) if isinstance(float_nodes, Mapping) else dict.fromkeys(float_nodes, "")
        reasons = {**self.kept_float, **extra}
        plan = replanner.plan_without(reasons)
        allowed = {slot.key for slot in gate_slots(plan)
                   if slot.kind != "activation" or slot.tensor_name in calibration.stats}
        plan = restrict_plan(plan, allowed, "its Q/DQ would need a tensor calibration did not measure")
        return with_reasons(plan, {name: why for name, why in reasons.items() if why})

    def report(self, finding: object) -> None:
        """Record a finding (what a step measured or did) for the result."""
        self.findings.append(finding)

    def keep_float(self, reasons: Mapping[str, str]) -> None:
        """Record nodes a step has put back in float (later steps start from them)."""
        self.kept_float.update(reasons)

    def replace_graph(self, graph: gs.Graph) -> None:
        """Continue with `graph` in place of the prepared graph (the same nodes and activations, e.g. with
        corrected biases): a new replanner over it, and no model built from the old graph is reused. The
        calibration statistics stay those measured on the old graph."""
        self.graph = graph
        self.replanner = Replanner(graph, self.target.plan, self.config.selection)
        self._built.clear()

    def amax(self, plan: QuantPlan) -> dict[str, float]:
        """Every scale group's range: a step's choice (`ranges`), else the method's. The method's searches
        (MSE, entropy) run once per set of tensors a group merges, however many plans are built."""
        _, _, calibration = self._ready()
        members: dict[str, set[str]] = {}
        for activation in plan.activations:
            members.setdefault(activation.group, set()).add(activation.tensor_name)
        keys = {group: frozenset(names) for group, names in members.items()}
        missing = [a for a in plan.activations if a.group not in self.ranges and keys[a.group] not in self._amax]
        if missing:
            found = group_amax(replace(plan, activations=tuple(missing)), calibration.stats, self.config.calib,
                               self.target.scheme)
            self._amax.update({keys[group]: value for group, value in found.items()})
        return {group: self.ranges[group] if group in self.ranges else self._amax[key] for group, key in keys.items()}

    def build(self, plan: QuantPlan) -> onnx.ModelProto:
        """The checked INT8 model of `plan` with this run's statistics and target (cached per plan)."""
        if plan not in self._built:
            graph, _, calibration = self._ready()
            params = activation_params(plan, calibration.stats, self.config.calib, self.target.scheme,
                                       self.amax(plan))
            lowered = self.target.lower(insert_qdq(graph, plan, params), self.config.high_precision)
            model = from_graph(lowered, template=self.model)
            if external_data.is_large(self.model):
                # The INT8 graph's weights are now in the model too; the graph's node<->tensor cycles would
                # keep its copy alive until Python's next cycle collection (+0.25x a large model's size).
                del lowered
                gc.collect()
            check_model(model, "the quantized model")
            self._built[plan] = model
        return self._built[plan]

    def first_batch(self) -> Feed | None:
        """One calibration batch of the size the model runs (None without calibration data)."""
        if self.source is None or self.graph is None:
            return None
        return next(iter(full_batches(self.source, self.graph, self.config.calib.batch_size,
                                      signature=self.signature)), None)


class Step:
    """A feature of `quantize`. Subclasses override the hooks they need (see the module docstring)."""

    #: How summaries and reports name the step.
    name = "step"

    def check(self, job: Job) -> None:
        """Raise ConfigError when this step cannot run on this job, before any work."""

    def hold_back(self, job: Job) -> HoldBack | None:
        """Samples to keep out of calibration for this step's measurements (None: none)."""
        return None

    def rewrite(self, job: Job, graph: gs.Graph) -> gs.Graph:
        """The prepared graph, rewritten before planning (return it unchanged to do nothing)."""
        return graph

    def extra_tensors(self, job: Job, plan: QuantPlan) -> Iterable[str]:
        """Tensors to calibrate besides the plan's own."""
        return ()

    def refine(self, job: Job, plan: QuantPlan) -> tuple[QuantPlan, object | None]:
        """After calibration: the plan to continue with, and a finding (None: nothing to say)."""
        return plan, None
