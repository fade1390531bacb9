"""Per-layer sensitivity: how much output error each quantized layer causes, measured in one session.

A *layer* is a node the plan quantizes (a Conv/Gemm/MatMul with its activation input(s) and weight, a
residual Add's skip input, a pooling input). Its *slots* are the quantized inputs that disappear when
the node is excluded and the graph re-planned: its own inputs, plus inputs whose quantization only
made sense because of it (the skip input of the residual Add fused into a Conv goes with that Conv).

All measurements run one ONNX Runtime session of the gated model (`passes.gate_qdq`): "only layer i
quantized", "all but layer i quantized" and "these k layers float" are different bool vectors fed to
the same session, with the calibrated scales unchanged. A set of float layers is turned into gates by
re-planning with those nodes excluded (`gate_qdq.LayerMap`), so a tensor shared by two quantized
consumers keeps its Q/DQ for the other one, exactly as `quantize --exclude-nodes` would place it. The
float model's outputs on the held-back samples are computed once and cached; each measurement
streams the outputs through `MetricsAccumulator` against them.

The gates reproduce the re-planned model exactly (tested) except in one case: when a fallback
removes a member of a Concat's shared-scale group, the real model recalibrates the group's scale
from the remaining members while the gated one keeps the old scale. The fallback's verification on
the built model catches any such difference.

Cost: 1 + 2 x layers passes over the held-back samples, each about one unoptimized float inference
plus the Q/DQ and Where nodes (about 15% more).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.data.signature import Feed, ModelSignature, signature_of
from onnxq.data.sources import CalibSource
from onnxq.runtime.session import CPU_PROVIDER, Session, open_session
from onnxq.errors import CalibrationError
from onnxq.io import from_graph
from onnxq.lower.gate_qdq import gate_qdq
from onnxq.steps.accuracy.layers import LayerMap
from onnxq.lower.scales import ActivationParams
from onnxq.metrics import MetricsAccumulator, OutputMetrics

__all__ = [
    "HeldBack", "load_held_back", "GatedRunner", "measure_model",
    "LayerSensitivity", "SensitivityResult", "measure_sensitivity", "worst",
]

RunCallback = Callable[[int, int | None], None]


# --- held-back data ------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeldBack:
    """Held-back feeds in memory and the float model's outputs for them, computed once.

    Attributes:
        feeds: one feed per run.
        references: the float model's outputs, one mapping per feed.
        output_names: the graph outputs measured, in model order.
        samples: samples held back.
        description: where they come from.
        feed_samples: the samples in each feed, counted along the model's sample axes (empty: each
            output counts its own axis 0).
    """

    feeds: tuple[Feed, ...]
    references: tuple[Mapping[str, np.ndarray], ...]
    output_names: tuple[str, ...]
    samples: int
    description: str
    feed_samples: tuple[int, ...] = ()


def load_held_back(model: onnx.ModelProto, source: CalibSource, batch_size: int,
                   providers: Sequence[str] = (CPU_PROVIDER,), fixed_batch: int | None = None, *,
                   signature: ModelSignature | None = None) -> HeldBack:
    """Read `source` into memory and run the float `model` on it once.

    Args:
        model: the float model whose outputs are the reference.
        source: the held-back samples.
        batch_size: samples per run (a model with a fixed batch gets only full batches).
        providers: execution providers.
        fixed_batch: the model's fixed batch size, if it has one (default: the signature's).
        signature: the model's inputs, along whose sample axes samples are counted (default:
            `signature_of(model)`).

    Raises:
        CalibrationError: no samples were held back.
    """
    signature = signature_of(model) if signature is None else signature
    fixed = signature.fixed_batch if fixed_batch is None else fixed_batch
    feeds, sizes = [], []
    for feed in source.batches(fixed or batch_size):
        size = signature.samples_in(feed)
        if fixed is None or size == fixed:
            feeds.append(feed)
            sizes.append(size)
    if not feeds:
        raise CalibrationError(f"{source.describe()}: no held-back samples to measure accuracy on")
    with open_session(model, providers) as session:
        references = tuple(session.run(feed) for feed in feeds)
        names = session.output_names
    return HeldBack(tuple(feeds), references, names, sum(sizes), source.describe(), tuple(sizes))


def _accumulate(held: HeldBack, run: Callable[[Feed], Mapping[str, np.ndarray]],
                samples: int | None = None) -> tuple[OutputMetrics, ...]:
    """Metrics over the held-back feeds (the first ones holding at least `samples` samples, if given)."""
    sums = {name: MetricsAccumulator() for name in held.output_names}
    sizes = held.feed_samples or (None,) * len(held.feeds)
    seen = 0
    for feed, reference, size in zip(held.feeds, held.references, sizes):
        if samples is not None and seen >= samples:
            break
        seen += size or 1
        outputs = run(feed)
        for name in held.output_names:
            sums[name] = sums[name].update(reference[name], outputs[name], size)
    return tuple(sums[name].result(name) for name in held.output_names)


def _prefix_samples(held: HeldBack, samples: int | None) -> int:
    """How many samples `_accumulate(held, ..., samples)` measures on (whole feeds)."""
    if samples is None or not held.feed_samples:
        return held.samples
    seen = 0
    for size in held.feed_samples:
        if seen >= samples:
            break
        seen += size
    return seen


def measure_model(model: onnx.ModelProto, held: HeldBack,
                  providers: Sequence[str] = (CPU_PROVIDER,)) -> tuple[OutputMetrics, ...]:
    """Metrics of `model` against the cached float outputs, in a session of its own."""
    with open_session(model, providers) as session:
        return _accumulate(held, lambda feed: session.run(feed, held.output_names))


def worst(metrics: Sequence[OutputMetrics]) -> tuple[float, float]:
    """(lowest cosine, lowest SQNR dB) over the outputs; NaN if any output is NaN."""
    cosines, sqnrs = [m.cosine for m in metrics], [m.sqnr_db for m in metrics]
    nan = float("nan")
    return (nan if any(np.isnan(cosines)) else min(cosines), nan if any(np.isnan(sqnrs)) else min(sqnrs))


# --- the gated session ----------------------------------------------------------------------

class GatedRunner:
    """One session of the gated model; `measure(gates)` is one pass over the held-back samples.

    The session runs with ONNX Runtime's graph optimizations on: the Where nodes keep every Q/DQ pair
    out of its fusions, so only folding and layout changes apply, and the outputs stay those of the
    unoptimized graph (tested bit for bit against the written models).

    Attributes:
        held: the held-back samples and float outputs.
        runs: passes made so far.
        on_run: called after each pass with (runs, planned).
        planned: the run count the current stage expects to reach, or None (reported to `on_run`).
    """

    def __init__(self, layer_map: LayerMap, params: Mapping[str, ActivationParams],
                 template: onnx.ModelProto, held: HeldBack, providers: Sequence[str] = (CPU_PROVIDER,),
                 on_run: RunCallback | None = None) -> None:
        gated = gate_qdq(layer_map.graph, layer_map.gated_plan, params)
        self.held, self.runs, self.on_run, self.planned = held, 0, on_run, None
        self.gates_input = gated.gates_input
        self._session: Session = open_session(from_graph(gated.graph, template), providers, optimize=True)

    def measure(self, gates: np.ndarray, samples: int | None = None) -> tuple[OutputMetrics, ...]:
        """Metrics against the float model with the given slots quantized (on the first feeds that hold
        `samples` samples, when given)."""
        names = self.held.output_names
        metrics = _accumulate(self.held, lambda feed: self._session.run({**feed, self.gates_input: gates}, names),
                              samples)
        self.runs += 1
        if self.on_run is not None:
            self.on_run(self.runs, self.planned)
        return metrics

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> GatedRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- sensitivity ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSensitivity:
    """What one layer's quantization does to the outputs (the worst output when there are several).

    Attributes:
        node_name: the quantized node.
        op_type: its op type.
        tensors: the tensors whose Q/DQ go float with it.
        alone_cosine: output cosine vs float with only this layer quantized, the rest float.
        alone_sqnr_db: the same as SQNR in dB.
        recovered_cosine: output cosine with every layer quantized except this one.
        recovered_sqnr_db: the same as SQNR in dB.
    """

    node_name: str
    op_type: str
    tensors: tuple[str, ...]
    alone_cosine: float
    alone_sqnr_db: float
    recovered_cosine: float
    recovered_sqnr_db: float


@dataclass(frozen=True)
class SensitivityResult:
    """Every layer's sensitivity, measured on held-back samples.

    Attributes:
        layers: one entry per layer, most sensitive first (see `ranked`).
        float_vs_int8: the fully quantized model against the float model, per output.
        samples: held-back samples measured on.
        runs: passes over the held-back samples (1 + 2 per layer).
        seconds: wall time, from `started` (the caller includes the gated model's build and the float
            reference run).
        data: where the held-back samples come from.
    """

    layers: tuple[LayerSensitivity, ...]
    float_vs_int8: tuple[OutputMetrics, ...]
    samples: int
    runs: int
    seconds: float
    data: str = ""

    def layer(self, node_name: str) -> LayerSensitivity:
        """The entry of `node_name`."""
        for entry in self.layers:
            if entry.node_name == node_name:
                return entry
        raise KeyError(node_name)


def _recovery_key(entry: LayerSensitivity) -> tuple[float, float]:
    cosine = -np.inf if np.isnan(entry.recovered_cosine) else entry.recovered_cosine
    sqnr = -np.inf if np.isnan(entry.recovered_sqnr_db) else entry.recovered_sqnr_db
    return (-cosine, -sqnr)


def measure_sensitivity(runner: GatedRunner, layer_map: LayerMap, started: float | None = None, *,
                        full: tuple[OutputMetrics, ...] | None = None, alone: bool = True,
                        samples: int | None = None) -> SensitivityResult:
    """Measure every layer recovered (and alone); sorted by recovery, largest first.

    Args:
        runner: the gated session on the held-back samples.
        layer_map: the plan's layers.
        started: `time.perf_counter()` when the work began (default: now), for `seconds`.
        full: the fully quantized model's metrics on every held-back sample, if already measured.
        alone: also measure each layer alone quantized (the ranking needs only "recovered"; without
            it the alone figures are NaN).
        samples: measure the layers on the first this many held-back samples only (the ranking);
            `float_vs_int8` is always on all of them.
    """
    started = time.perf_counter() if started is None else started
    first_run = runner.runs
    runner.planned = first_run + (full is None) + (1 + alone) * len(layer_map.layers)
    full = runner.measure(layer_map.gates(())) if full is None else full
    entries = []
    for layer in layer_map.layers:
        only = worst(runner.measure(layer_map.only(layer), samples)) if alone else (math.nan, math.nan)
        recovered = worst(runner.measure(layer_map.gates([layer.node_name]), samples))
        entries.append(LayerSensitivity(layer.node_name, layer.op_type, layer.tensors, *only, *recovered))
    entries.sort(key=_recovery_key)
    runner.planned = None
    return SensitivityResult(tuple(entries), full, _prefix_samples(runner.held, samples), runner.runs - first_run,
                             time.perf_counter() - started, runner.held.description)
