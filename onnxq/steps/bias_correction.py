"""Bias correction as a step of `quantize`: remove the mean shift quantization gives each output channel.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction" (ICCV 2019),
section 4.2: quantizing a layer's weight (W̃ = W + ε) and input shifts the expected value of each output
channel, E[ỹ] = E[y] + ε E[x] (plus what the input's rounding and upstream errors do to the mean); adding
E[y] - E[ỹ] to the float bias removes it. This step uses their empirical form, measured on calibration
data, per output channel c of every quantized Conv, ConvTranspose, Gemm and MatMul with a constant weight
(`onnxq.steps.bias_shift` says which, and rewrites the biases):

    b_c  <-  b_c + mean(y)_c - mean(ỹ)_c

where y is the layer's output in the float model and ỹ in the plan's Q/DQ model, with every layer before
it already corrected (sequential correction), all layers measured in one ONNX Runtime pass
(`onnxq.steps.bias_measure`).

Sequential rather than each layer on its own with float inputs (NNCF's "fast bias correction"): a layer
then also absorbs what the errors before it do to its mean through the non-linearities. EfficientNet-Lite0
(trt, max; corrections from the 64 calibration photos, compared with the float model on the 192 others,
`benchmarks/bias_correction.py --variants`): uncorrected top-1 agreement 78.6 %, cosine 0.9594, SQNR
10.9 dB; fast 81.8 %, 0.9775, 13.5 dB; sequential 84.4 %, 0.9848, 14.6 dB, measured in the same time (2.2
against 2.9 s). Taking every layer's shift from one pass of the uncorrected model and correcting them all
at once corrects each upstream shift again in every later layer: 29.2 %, cosine 0.54.

The correction is kept only when it helps: the model with and without it is compared with the float
model on held-back samples (the accuracy target's, when it holds some back; else every 4th calibration
sample, which the shifts are then not measured on; calibration itself still sees every sample), and kept
when the worst SQNR rises (of each output, or of the logits before a final Softmax: `checked_tensors`)
and an accuracy target an earlier step met is still met. It runs after every other step (`quantize` puts
it last), so it corrects the layers of the final plan: a layer the accuracy fallback put back in float is
not corrected. The corrected float graph replaces the prepared graph (`Job.replace_graph`) and is what the
written model is built from; the activation ranges stay those calibrated on the uncorrected graph.
"""

from __future__ import annotations

import time
from collections.abc import Container, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnxq.calib.expose import expose_tensors
from onnxq.calib.ranges import activation_params
from onnxq.config import AccuracyGoal
from onnxq.data.held_back import HELD_BACK_EVERY, held_back_sources
from onnxq.data.sources import CalibSource
from onnxq.errors import CalibrationError, ConfigError
import onnxq.external_data as external_data
from onnxq.io import from_graph, to_graph
from onnxq.lower.insert_qdq import insert_qdq
from onnxq.metrics import OutputMetrics
from onnxq.plan.core import QuantPlan
from onnxq.steps.accuracy.fallback import meets
from onnxq.steps.accuracy.sensitivity import HeldBack, load_held_back, measure_model, worst
from onnxq.steps.accuracy.step import AccuracyFinding
from onnxq.steps.base import Job, Step, StepSkipped
from onnxq.steps.bias_measure import Shifts, measure, sequential_shift_model
from onnxq.steps.bias_shift import LinearLayer, linear_layers, shift_biases

__all__ = ["BY_DEFAULT", "LayerShift", "BiasCorrected", "BiasCorrection"]

#: Whether `quantize` corrects biases when the config does not say (`QuantConfig.bias_correction` None).
BY_DEFAULT = True


@dataclass(frozen=True)
class LayerShift:
    """One layer's correction.

    Attributes:
        node_name: the Conv, ConvTranspose, Gemm or MatMul.
        op_type: its op type.
        channels: its output channels.
        max_abs_shift: the largest |shift| over its channels: what was added to a bias value (times Gemm's beta).
        created_bias: the layer had no bias and got one.
    """

    node_name: str
    op_type: str
    channels: int
    max_abs_shift: float
    created_bias: bool


@dataclass(frozen=True)
class BiasCorrected:
    """What bias correction measured and did.

    Attributes:
        layers: every corrected layer, in graph order.
        skipped: quantized layers left alone, each with the reason.
        kept: whether the correction is in the written model (it raised the held-back SQNR, and an accuracy
            target met before is still met).
        verdict: the decision and its figures, in words.
        before: the outputs against the float model on the held-back samples, without the correction (an
            output a Softmax produces is measured on the Softmax's input, see `checked_tensors`).
        after: the same with it.
        fit_samples: the samples the shifts were measured on.
        held_back: how many held-back samples, and where they come from.
        seconds: what the step took.
    """

    layers: tuple[LayerShift, ...]
    skipped: tuple[tuple[str, str], ...]
    kept: bool
    verdict: str
    before: tuple[OutputMetrics, ...] = ()
    after: tuple[OutputMetrics, ...] = ()
    fit_samples: int = 0
    held_back: str = ""
    seconds: float = 0.0

    @property
    def largest(self) -> LayerShift | None:
        """The layer with the largest shift."""
        return max(self.layers, key=lambda layer: layer.max_abs_shift, default=None)


def measure_shifts(job: Job, plan: QuantPlan, layers: Sequence[LinearLayer], source: CalibSource) -> Shifts:
    """Per layer, in graph order, the correction per output channel: mean(float output) - mean(Q/DQ output)
    with every layer before it corrected (`onnxq.steps.bias_measure`; the plan's Q/DQ with this run's
    statistics and chosen ranges, as `job.build` writes it but with the float rest in float32); and the
    samples measured on."""
    assert job.graph is not None and job.calibration is not None
    params = activation_params(plan, job.calibration.stats, job.config.calib, job.target.scheme, job.amax(plan))
    # Both exports are dropped once merged: on a large model each holds a copy of the weights.
    model = sequential_shift_model(from_graph(job.graph, template=job.model),
                                   from_graph(insert_qdq(job.graph, plan, params), template=job.model), layers,
                                   reuse=True)
    return measure(model, source, job.config.calib.batch_size, job.signature, job.config.calib.providers,
                   job.progress("measuring output shifts"))


def _with_new_biases(plan: QuantPlan, replanned: QuantPlan, layers: Sequence[LinearLayer]) -> QuantPlan:
    """`plan` plus the biases the target plans for the corrected graph that `plan` has no slot for (a bias
    created, or a scalar Gemm bias made one per channel: ort-cpu stores them as INT32)."""
    have = {(b.consumer, b.input_index) for b in plan.biases}
    corrected = {layer.node_name for layer in layers}
    extra = tuple(b for b in replanned.biases if b.consumer in corrected and (b.consumer, b.input_index) not in have)
    return replace(plan, biases=plan.biases + extra) if extra else plan


_MOVES = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"})


def checked_tensors(model: onnx.ModelProto, available: Container[str] | None = None) -> tuple[str, ...]:
    """What the check compares: each graph output, or the input of the Softmax/LogSoftmax that produces it
    (through data movement: Identity, Reshape, ...) when that tensor is also in `available` (the prepared
    graph's tensors, which the INT8 models keep).

    A classifier's probabilities saturate: on the PP-OCR classifier the SQNR of its two-class softmax over
    16 held-back samples swings by +-15 dB with the one or two lines near 50/50, and said the correction
    helped (+7 dB) where the logits, on the same samples and on all 200 evaluation lines, said it hurt.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    present = {out for node in model.graph.node for out in node.output}
    checked = []
    for output in model.graph.output:
        node = producers.get(output.name)
        while node is not None and node.op_type in _MOVES and node.input:
            node = producers.get(node.input[0])
        logits = node.input[0] if node is not None and node.op_type in ("Softmax", "LogSoftmax") else None
        usable = logits in present and (available is None or logits in available)
        checked.append(logits if usable else output.name)
    return tuple(dict.fromkeys(checked))


def _exposing(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    outputs = {o.name for o in model.graph.output}
    if all(name in outputs for name in names):
        return model
    return from_graph(expose_tensors(to_graph(model), names), template=model)


def _measure(job: Job, model: onnx.ModelProto, held: HeldBack) -> tuple[OutputMetrics, ...]:
    return measure_model(_exposing(model, held.output_names), held, job.config.calib.providers)


def _goal(job: Job) -> AccuracyGoal | None:
    """The accuracy target an earlier step met (the corrected model must still meet it), if any."""
    found = next((f for f in job.findings if isinstance(f, AccuracyFinding) and f.fallback is not None), None)
    return found.fallback.target if found is not None and found.fallback is not None and found.fallback.met else None


def _split(job: Job, samples: int) -> tuple[CalibSource, CalibSource, str] | None:
    """(the samples to measure the shifts on, the held-back samples to check them on, where those come
    from), or None without both."""
    assert job.source is not None
    if job.held_back is not None:
        return job.source, job.held_back, f"the accuracy target's: {job.held_back.describe()}"
    total = job.source.num_samples()
    if total is not None and total < HELD_BACK_EVERY:
        return None
    fit, check = held_back_sources(job.source, None, samples, signature=job.signature)
    assert fit is not None
    return fit, check, (f"every {HELD_BACK_EVERY}th calibration sample, up to {samples}; calibrated on, "
                        "the shifts measured on the others")


@dataclass(frozen=True)
class BiasCorrection(Step):
    """Correct the bias of every quantized linear layer for the mean shift quantization gives its output.

    Attributes:
        samples: at most this many held-back samples to check the correction on (without the accuracy
            target's: every 4th calibration sample, not fitted on).
        requested: True when the user asked for it (refused where it cannot run); False when it runs by
            default (then skipped, with a finding saying why, where it cannot).
    """

    samples: int = 32
    requested: bool = True
    name = "bias correction"

    def check(self, job: Job) -> None:
        if job.source is None and self.requested:
            raise ConfigError("--bias-correction needs --calib: a statistics file holds no samples to measure "
                              "the output shift on")

    def decide(self, before: Sequence[OutputMetrics], after: Sequence[OutputMetrics], checked: Sequence[str],
               outputs: Sequence[str], goal: AccuracyGoal | None) -> tuple[bool, str]:
        """Whether to keep the correction, and why: the worst SQNR over `checked` rises, and the outputs still
        meet `goal` (the accuracy target an earlier step met), if any."""
        def pick(metrics: Sequence[OutputMetrics], names: Sequence[str]) -> list[OutputMetrics]:
            return [m for m in metrics if m.name in names]

        (cosine_before, sqnr_before) = worst(pick(before, checked))
        (cosine_after, sqnr_after) = worst(pick(after, checked))
        figures = f"SQNR {sqnr_before:.2f} -> {sqnr_after:.2f} dB, cosine {cosine_before:.5f} -> {cosine_after:.5f}"
        if not sqnr_after > sqnr_before:
            return False, f"discarded: it does not raise the SQNR ({figures})"
        if goal is not None and not meets(pick(after, outputs), goal):
            return False, f"discarded: the model would miss the accuracy target {goal.describe()} ({figures})"
        return True, f"kept: {figures}"

    def refine(self, job: Job, plan: QuantPlan) -> tuple[QuantPlan, BiasCorrected | StepSkipped | None]:
        started = time.perf_counter()
        if job.source is None:
            return plan, StepSkipped(self.name, "no bias correction: a statistics file holds no samples to "
                                                "measure the output shift on (give --calib for it)")
        if not self.requested and external_data.is_large(job.model):
            limit = external_data.threshold()
            size = f"{limit / 2**30:.3g} GiB" if limit >= 2**30 else f"{limit / 2**20:.3g} MiB"
            return plan, StepSkipped(self.name, f"no bias correction by default on a large model (tensors over {size}, "
                                                "ONNXQ_LARGE_MODEL_BYTES): measuring the shifts holds float and "
                                                "quantized copies of it side by side (about 8x its size in memory); "
                                                "--bias-correction runs it")
        assert job.graph is not None
        layers, skipped = linear_layers(job.graph, plan)
        if not layers:
            return plan, None if not plan.quantized_nodes else StepSkipped(
                self.name, "no bias correction: no quantized Conv, Gemm or MatMul with a bias to correct")
        split = _split(job, self.samples)
        if split is None:
            return plan, StepSkipped(self.name, f"no bias correction: fewer than {HELD_BACK_EVERY} calibration "
                                                "samples, none to hold back and check it on")
        fit, check, where = split
        outputs = tuple(o.name for o in job.model.graph.output)
        checked = checked_tensors(job.model, job.graph.tensors())
        try:
            held = load_held_back(_exposing(job.model, (*outputs, *checked)), check,
                                  job.signature.batch_size(job.config.calib.batch_size), job.config.calib.providers,
                                  signature=job.signature)
        except CalibrationError:
            return plan, StepSkipped(self.name, "no bias correction: no held-back samples to check it on")
        measured = measure_shifts(job, plan, layers, fit)
        if not measured.samples:
            return plan, StepSkipped(self.name, "no bias correction: no samples left to measure the shift on")
        original, before = job.graph, _measure(job, job.build(plan), held)
        job.replace_graph(shift_biases(original, layers, measured.means))
        corrected = _with_new_biases(plan, job.replan(), layers)
        after = _measure(job, job.build(corrected), held)
        kept, verdict = self.decide(before, after, checked, outputs, _goal(job))
        if not kept:
            job.replace_graph(original)
        shifts = tuple(LayerShift(layer.node_name, layer.op_type, layer.channels,
                                  float(np.abs(measured.means[layer.node_name]).max()), layer.creates_bias)
                       for layer in layers)
        finding = BiasCorrected(shifts, skipped, kept, verdict, tuple(m for m in before if m.name in checked),
                                tuple(m for m in after if m.name in checked), measured.samples,
                                f"{held.samples} held-back samples ({where})",
                                time.perf_counter() - started)
        return (corrected if kept else plan), finding

