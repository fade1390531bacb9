"""Whether attention MatMuls (Q·Kᵀ and attention·V) are quantized, decided by measured error.

Their inputs are activations on both sides: per-tensor INT8 on the scores' operands and on the softmax
probabilities costs little on some encoders and a lot on others (a real sentence encoder fell from
0.977 to 0.869 output cosine under ONNX Runtime's CPU kernels). So on a target that quantizes them by
default (`QuantTarget.quantize_attention`), and unless the user chose (`Selection.quantize_attention`),
this step builds the model both ways and measures each on held-back samples (every 4th calibration
sample, up to `SAMPLES`, in sessions as the target runs them): attention stays quantized only when its
worst output SQNR is within `TOLERANCE_DB` of the model with attention in float.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from onnxq.data.held_back import HELD_BACK_EVERY, held_back_sources
from onnxq.plan.core import QuantPlan
from onnxq.steps.accuracy.sensitivity import load_held_back, measure_model, worst
from onnxq.steps.base import Job, Step, StepSkipped

__all__ = ["ChooseAttention", "AttentionChoice", "SAMPLES", "TOLERANCE_DB"]

#: Held-back samples the two models are compared on.
SAMPLES = 16
#: How much lower (dB) the worst output SQNR may be with attention quantized for it to stay quantized.
TOLERANCE_DB = 0.5


@dataclass(frozen=True)
class AttentionChoice:
    """What the attention measurement found.

    Attributes:
        matmuls: the attention MatMuls.
        nodes: every node their quantization brings (the MatMuls and the data movement sharing their scale).
        quantized: whether they stay quantized.
        sqnr_db_quantized: worst output SQNR with them quantized.
        sqnr_db_float: the same with them in float.
        samples: held-back samples measured on.
        seconds: wall time.
    """

    matmuls: tuple[str, ...]
    nodes: tuple[str, ...]
    quantized: bool
    sqnr_db_quantized: float
    sqnr_db_float: float
    samples: int
    seconds: float

    def describe(self) -> str:
        verdict = "quantized" if self.quantized else "kept float"
        return (f"{len(self.matmuls)} attention MatMul(s) {verdict}: worst output SQNR {self.sqnr_db_quantized:.1f} dB "
                f"quantized, {self.sqnr_db_float:.1f} dB float, on {self.samples} held-back samples "
                f"(tolerance {TOLERANCE_DB:g} dB; {self.seconds:.1f} s)")


@dataclass(frozen=True)
class ChooseAttention(Step):
    """Keep attention MatMuls quantized only where that costs at most `TOLERANCE_DB` (module docstring)."""

    name = "attention"

    def refine(self, job: Job, plan: QuantPlan) -> tuple[QuantPlan, AttentionChoice | StepSkipped | None]:
        assert job.graph is not None
        started = time.perf_counter()
        without = job.target.plan(job.graph, replace(job.config.selection, quantize_attention=False))
        nodes = tuple(sorted({d.node_name for d in plan.quantized_nodes} - {d.node_name for d in without.quantized_nodes}))
        if not nodes:
            return plan, None
        if job.source is None:
            return plan, StepSkipped(self.name, "attention quantized (the target's default): a statistics file "
                                                "holds no samples to measure it on")
        total = job.source.num_samples()
        if total is not None and total < HELD_BACK_EVERY:
            return plan, StepSkipped(self.name, f"attention quantized: fewer than {HELD_BACK_EVERY} calibration "
                                                "samples, none to measure it on")
        _, check = held_back_sources(job.source, None, SAMPLES, signature=job.signature)
        calib = job.config.calib
        held = load_held_back(job.model, check, calib.batch_size, calib.providers, signature=job.signature)
        reason = "attention MatMul kept float: quantizing it measured worse (the attention step)"
        floated = job.replan({**dict.fromkeys(nodes, reason)})
        quantized_db = worst(measure_model(job.build(plan), held, calib.providers))[1]
        float_db = worst(measure_model(job.build(floated), held, calib.providers))[1]
        keep = quantized_db >= float_db - TOLERANCE_DB
        if not keep:
            job.keep_float(dict.fromkeys(nodes, reason))
        ops = {node.name: node.op for node in job.graph.nodes}
        matmuls = tuple(name for name in nodes if ops.get(name) == "MatMul")
        choice = AttentionChoice(matmuls, nodes, keep, quantized_db, float_db, held.samples, time.perf_counter() - started)
        return (plan if keep else floated), choice
