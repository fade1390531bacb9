"""How far a quantized model's outputs are from the float model's, measured while streaming.

`compare_models` runs both models on the same inputs and folds every output into running float64
sums (`MetricsAccumulator`), so memory does not grow with the number of samples. The sums are
mergeable, so batches can also be measured separately and combined.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.data.signature import ModelSignature, signature_of
from onnxq.runtime.session import CPU_PROVIDER, Session, open_session
from onnxq.errors import CalibrationError, ModelError

__all__ = ["OutputMetrics", "MetricsAccumulator", "compare_models", "format_metrics"]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputMetrics:
    """How closely one candidate output matches the reference output, over all samples.

    Attributes:
        name: the output's name.
        samples: samples seen: the sum of the sample counts the caller gave (`MetricsAccumulator.update(...,
            samples=)`, counted on the inputs' sample axes), else of the outputs' first dimensions (1 per
            run for a scalar).
        cosine: cosine similarity of the whole flattened output; 1.0 = identical.
        sqnr_db: 10*log10(sum(ref^2) / sum((ref-cand)^2)); +inf when identical.
        max_abs_error: the largest |ref - cand|.
        top1_agreement: the fraction of samples whose argmax over the last axis agrees; only for
            outputs of rank 2 with at least 2 classes and one row per sample, else None.
    """

    name: str
    samples: int
    cosine: float
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None


@dataclass(frozen=True)
class MetricsAccumulator:
    """Running float64 sums for one output. Immutable: `update` and `merge` return new accumulators.

    Attributes:
        samples: samples seen so far.
        sum_ref_sq: sum of ref^2.
        sum_cand_sq: sum of cand^2.
        sum_dot: sum of ref*cand.
        sum_err_sq: sum of (ref-cand)^2.
        max_abs_error: the largest |ref - cand| so far.
        top1_matches: samples whose argmax over the last axis agrees.
        top1_applicable: every batch so far had rank 2 and at least 2 classes.
        nonfinite_reference: the reference output contained NaN or Inf.
        nonfinite_candidate: the candidate output contained NaN or Inf.
    """

    samples: int = 0
    sum_ref_sq: float = 0.0
    sum_cand_sq: float = 0.0
    sum_dot: float = 0.0
    sum_err_sq: float = 0.0
    max_abs_error: float = 0.0
    top1_matches: int = 0
    top1_applicable: bool = True
    nonfinite_reference: bool = False
    nonfinite_candidate: bool = False

    def update(self, reference: np.ndarray, candidate: np.ndarray, samples: int | None = None) -> MetricsAccumulator:
        """Fold one batch of outputs into the sums.

        Args:
            reference: the float model's output for the batch.
            candidate: the quantized model's output for the same inputs; same shape.
            samples: the batch's sample count, when the caller knows it from the inputs (an output such
                as a recurrent state [layers, N, hidden] does not hold it on axis 0); default: axis 0.

        Returns:
            A new accumulator; this one is unchanged.

        Raises:
            ModelError: the two arrays differ in shape.
        """
        ref = np.asarray(reference, dtype=np.float64)
        cand = np.asarray(candidate, dtype=np.float64)
        if ref.shape != cand.shape:
            raise ModelError(f"reference output has shape {ref.shape} but candidate output has {cand.shape}")
        ref_flat, cand_flat = ref.ravel(), cand.ravel()
        error = ref_flat - cand_flat
        count = samples if samples is not None else ref.shape[0] if ref.ndim else 1
        applicable = ref.ndim == 2 and ref.shape[1] >= 2 and ref.shape[0] == count
        matches = int(np.count_nonzero(ref.argmax(axis=-1) == cand.argmax(axis=-1))) if applicable else 0
        batch = MetricsAccumulator(
            samples=count,
            sum_ref_sq=float(np.dot(ref_flat, ref_flat)),
            sum_cand_sq=float(np.dot(cand_flat, cand_flat)),
            sum_dot=float(np.dot(ref_flat, cand_flat)),
            sum_err_sq=float(np.dot(error, error)),
            max_abs_error=float(np.max(np.abs(error))) if error.size else 0.0,
            top1_matches=matches,
            top1_applicable=applicable,
            nonfinite_reference=not bool(np.all(np.isfinite(ref_flat))),
            nonfinite_candidate=not bool(np.all(np.isfinite(cand_flat))),
        )
        return self.merge(batch)

    def merge(self, other: MetricsAccumulator) -> MetricsAccumulator:
        """The accumulator of both sets of samples."""
        return MetricsAccumulator(
            samples=self.samples + other.samples,
            sum_ref_sq=self.sum_ref_sq + other.sum_ref_sq,
            sum_cand_sq=self.sum_cand_sq + other.sum_cand_sq,
            sum_dot=self.sum_dot + other.sum_dot,
            sum_err_sq=self.sum_err_sq + other.sum_err_sq,
            max_abs_error=max(self.max_abs_error, other.max_abs_error),
            top1_matches=self.top1_matches + other.top1_matches,
            top1_applicable=self.top1_applicable and other.top1_applicable,
            nonfinite_reference=self.nonfinite_reference or other.nonfinite_reference,
            nonfinite_candidate=self.nonfinite_candidate or other.nonfinite_candidate,
        )

    def result(self, name: str) -> OutputMetrics:
        """The metrics of the samples seen so far.

        NaN or Inf in either output makes every metric NaN (and is logged as a warning naming the
        output); so does an accumulator that has seen no samples.

        Args:
            name: the output's name, for the result and the warning.

        Returns:
            The output's metrics.
        """
        top1_possible = self.top1_applicable and self.samples > 0
        if self.samples == 0 or self.nonfinite_reference or self.nonfinite_candidate:
            if self.samples > 0:
                _warn_nonfinite(name, self.nonfinite_reference, self.nonfinite_candidate)
            nan = math.nan
            return OutputMetrics(name, self.samples, nan, nan, nan, nan if top1_possible else None)
        return OutputMetrics(
            name=name,
            samples=self.samples,
            cosine=self._cosine(),
            sqnr_db=self._sqnr_db(),
            max_abs_error=self.max_abs_error,
            top1_agreement=self.top1_matches / self.samples if top1_possible else None,
        )

    def _cosine(self) -> float:
        if self.sum_err_sq == 0.0:
            return 1.0  # identical, including both all-zero
        if self.sum_ref_sq == 0.0 or self.sum_cand_sq == 0.0:
            return 0.0  # an all-zero output has no direction
        cosine = self.sum_dot / (math.sqrt(self.sum_ref_sq) * math.sqrt(self.sum_cand_sq))
        return min(1.0, max(-1.0, cosine))

    def _sqnr_db(self) -> float:
        if self.sum_err_sq == 0.0:
            return math.inf
        if self.sum_ref_sq == 0.0:
            return -math.inf  # all-zero signal, non-zero noise
        return 10.0 * math.log10(self.sum_ref_sq / self.sum_err_sq)


def _warn_nonfinite(name: str, in_reference: bool, in_candidate: bool) -> None:
    where = " and ".join(
        model for model, found in (("reference", in_reference), ("candidate", in_candidate)) if found
    )
    _LOG.warning("output '%s' contains NaN or Inf in the %s model's results; metrics are NaN", name, where)


def compare_models(
    reference: onnx.ModelProto | Session,
    candidate: onnx.ModelProto | Session,
    feeds: Iterable[Mapping[str, np.ndarray]],
    providers: Sequence[str] = (CPU_PROVIDER,),
    *,
    signature: ModelSignature | None = None,
) -> tuple[OutputMetrics, ...]:
    """Run both models on every feed and measure each candidate output against the reference.

    Outputs are folded into running sums and dropped, so `feeds` may be a long generator.

    Args:
        reference: the float model, or an open session of it.
        candidate: the quantized model, or an open session of it; it must have the reference's outputs.
        feeds: input name -> array, one mapping per run; both models get the same arrays.
        providers: execution providers for the models given as ModelProto (sessions keep theirs).
        signature: the models' inputs, along whose sample axes each feed's samples are counted
            (default: `signature_of(reference)` for a ModelProto; for a session, or inputs without a
            shape, each output's axis 0).

    Returns:
        One OutputMetrics per reference output, in the reference's output order.

    Raises:
        CalibrationError: `feeds` is empty.
        ModelError: the candidate lacks an output, an output's shapes differ, or a run fails.
    """
    opened: list[Session] = []
    try:
        reference_session = _as_session(reference, providers, opened)
        candidate_session = _as_session(candidate, providers, opened)
        names = reference_session.output_names
        for name in names:
            if name not in candidate_session.output_names:
                raise ModelError(f"output '{name}' of the reference model is missing from the candidate")
        accumulators = {name: MetricsAccumulator() for name in names}
        if signature is None and isinstance(reference, onnx.ModelProto):
            signature = _signature_or_none(reference)
        runs = 0
        for feed in feeds:
            runs += 1
            reference_outputs = reference_session.run(feed, names)
            candidate_outputs = candidate_session.run(feed, names)
            samples = None if signature is None else signature.samples_in(feed)
            for name in names:
                ref, cand = reference_outputs[name], candidate_outputs[name]
                if np.shape(ref) != np.shape(cand):
                    raise ModelError(
                        f"output '{name}': the reference model returns shape {np.shape(ref)} "
                        f"but the candidate model returns {np.shape(cand)}"
                    )
                accumulators[name] = accumulators[name].update(ref, cand, samples)
            del reference_outputs, candidate_outputs
        if runs == 0:
            raise CalibrationError("no input samples to compare the models on: the feeds are empty")
        return tuple(accumulators[name].result(name) for name in names)
    finally:
        for session in opened:
            session.close()


def _signature_or_none(model: onnx.ModelProto) -> ModelSignature | None:
    """The model's signature, or None if its inputs have none (an input without a shape): then each
    output counts its samples on its own axis 0."""
    try:
        return signature_of(model)
    except ModelError:
        return None


def _as_session(model: onnx.ModelProto | Session, providers: Sequence[str], opened: list[Session]) -> Session:
    if isinstance(model, Session):
        return model
    session = open_session(model, providers)
    opened.append(session)
    return session


def format_metrics(metrics: Sequence[OutputMetrics]) -> str:
    """An aligned text table of `metrics`, one row per output, for a command-line summary."""
    header = ("output", "samples", "cosine", "SQNR dB", "max abs err", "top-1")
    rows = [
        (
            m.name,
            str(m.samples),
            f"{m.cosine:.6f}",
            f"{m.sqnr_db:.2f}",
            f"{m.max_abs_error:.4g}",
            "-" if m.top1_agreement is None else f"{100.0 * m.top1_agreement:.2f}%",
        )
        for m in metrics
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
