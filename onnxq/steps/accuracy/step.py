"""The accuracy target as a step of `quantize`: measure each layer's sensitivity on held-back samples and
keep in float the fewest layers that meet the goal (`onnxq.steps.accuracy.fallback`).

Hooks: `hold_back` keeps the goal's samples out of calibration; `extra_tensors` asks calibration for
every tensor a fallback may newly quantize (`LayerMap.calibrated_names`); `refine` runs the sensitivity
measurement and the fallback, starting from the nodes earlier steps already put in float (the latency
search), so the model it returns is the one measured against the goal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from onnxq.config import AccuracyGoal
from onnxq.data.sources import CalibSource
from onnxq.plan.core import QuantPlan
from onnxq.steps.accuracy.fallback import FallbackResult, run_accuracy
from onnxq.steps.accuracy.gate_workers import MeasurerFactory
from onnxq.steps.accuracy.layers import LayerMap
from onnxq.steps.accuracy.sensitivity import SensitivityResult
from onnxq.steps.base import HoldBack, Job, Step

__all__ = ["MeetAccuracy", "AccuracyFinding", "TRUSTED_SAMPLES"]

#: Fewer held-back samples than this and a met target is a weak promise: an output cosine measured on 8
#: samples moved by 0.01 on a text detector's evaluation set (issue 11's report), so a note says so.
TRUSTED_SAMPLES = 32


@dataclass(frozen=True)
class AccuracyFinding:
    """What the accuracy step measured and what fell back.

    Attributes:
        sensitivity: every layer recovered (and alone, without a threshold), on the held-back samples;
            None when the fully quantized model met the goal and nothing was measured layer by layer.
        fallback: the layers left float for the goal (None when the goal has no threshold).
        held_samples, held_data: how many samples were held back, and where from.
    """

    sensitivity: SensitivityResult | None
    fallback: FallbackResult | None
    held_samples: int = 0
    held_data: str = ""

    @property
    def warning(self) -> str | None:
        """A note when the goal was judged on fewer than `TRUSTED_SAMPLES` held-back samples."""
        if self.fallback is None or self.held_samples >= TRUSTED_SAMPLES:
            return None
        return (f"the accuracy target was measured on {self.held_samples} held-back samples only; trust it from "
                f"{TRUSTED_SAMPLES} on (more --eval data, or --held-back {TRUSTED_SAMPLES})")


@dataclass(frozen=True)
class MeetAccuracy(Step):
    """Keep the fewest layers float that bring the outputs within `goal` on held-back samples.

    Attributes:
        goal: the thresholds and the number of held-back samples.
        eval_source: where the held-back samples come from (its first `goal.samples`); None: every
            4th calibration sample, never calibrated on.
        measurers: who runs the gated model's measurements (a pool of remote workers, say); None: the
            run's Ray workers when it has them (`quantize(..., backend=...)`, see onnxq.cluster.gates), else
            `local_measurers(goal.jobs)`, this process or `goal.jobs` local ones.

    Raises (from `quantize`): `TargetNotMetError` when no model with a quantized layer meets the goal,
    unless `goal.write_anyway`.
    """

    goal: AccuracyGoal = AccuracyGoal()
    eval_source: CalibSource | None = None
    measurers: MeasurerFactory | None = None
    name = "accuracy target"

    def hold_back(self, job: Job) -> HoldBack:
        return HoldBack(self.goal.samples, self.eval_source)

    def extra_tensors(self, job: Job, plan: QuantPlan) -> Iterable[str]:
        assert job.replanner is not None
        return LayerMap(job.replanner, job.kept_float).calibrated_names

    def _measurers(self, job: Job) -> MeasurerFactory | None:
        """This step's measurers; else the run's Ray workers, when it has them; else None (local)."""
        if self.measurers is not None or job.workers is None:
            return self.measurers
        from onnxq.cluster.gates import ray_measurers  # Ray is imported only by a run given a pool

        return ray_measurers(job.workers)

    def refine(self, job: Job, plan: QuantPlan) -> tuple[QuantPlan, AccuracyFinding]:
        assert job.replanner is not None and job.calibration is not None and job.held_back is not None
        stats = job.calibration.stats
        layers = LayerMap(job.replanner, job.kept_float, available=stats)
        outcome = run_accuracy(layers, stats, job.model, job.held_back, job.build, self.goal, job.config.calib,
                               signature=job.signature,
                               on_progress=job.progress("measuring accuracy"), scheme=job.target.scheme,
                               amax=job.ranges, measurers=self._measurers(job))
        if outcome.fallback is not None:
            job.keep_float({layer.node_name: f"accuracy fallback: {layer.reason}"
                            for layer in outcome.fallback.float_layers})
        return outcome.plan, AccuracyFinding(outcome.sensitivity, outcome.fallback, outcome.held_samples,
                                             outcome.held_data)
