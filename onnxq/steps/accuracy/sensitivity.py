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

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.data.sources import CalibSource, Feed
from onnxq.runtime.session import CPU_PROVIDER, Session, open_session
from onnxq.errors import CalibrationError, ConfigError
from onnxq.io import from_graph
from onnxq.lower.gate_qdq import gate_qdq
from onnxq.steps.accuracy.layers import LayerMap
from onnxq.lower.scales import ActivationParams
from onnxq.metrics import MetricsAccumulator, OutputMetrics

__all__ = [
    "HELD_BACK_EVERY", "HeldBack", "held_back_sources", "load_held_back", "GatedRunner", "measure_model",
    "LayerSensitivity", "SensitivityResult", "measure_sensitivity", "worst",
]

#: Without separate evaluation data, every HELD_BACK_EVERY-th calibration sample is held back.
HELD_BACK_EVERY = 4

RunCallback = Callable[[int, int | None], None]


# --- held-back data ------------------------------------------------------------------------------

class _Subset:
    """The samples of `source` whose position (0, 1, ... over the whole source) `keep` accepts."""

    def __init__(self, source: CalibSource, keep: Callable[[np.ndarray], np.ndarray], samples: int | None,
                 description: str, stop: int | None = None) -> None:
        self._source, self._keep, self._samples = source, keep, samples
        self._description, self._stop = description, stop

    def describe(self) -> str:
        return self._description

    def num_samples(self) -> int | None:
        return self._samples

    def batches(self, batch_size: int) -> Iterator[Feed]:
        pending: list[Feed] = []
        scalars: Feed = {}
        position = count = 0
        for feed in self._source.batches(batch_size):
            batched = [name for name, array in feed.items() if np.ndim(array) > 0]
            size = feed[batched[0]].shape[0] if batched else 1
            mask = self._keep(np.arange(position, position + size))
            position += size
            if not batched:
                if mask.all():
                    yield feed
                if self._stop is not None and position >= self._stop:
                    break
                continue
            if mask.any():
                pending.append({name: feed[name][mask] for name in batched})
                count += int(mask.sum())
                scalars = {name: array for name, array in feed.items() if name not in batched}
            while count >= batch_size:
                joined = {name: np.concatenate([piece[name] for piece in pending]) for name in batched}
                yield {**{n: a[:batch_size] for n, a in joined.items()}, **scalars}
                pending, count = [{n: a[batch_size:] for n, a in joined.items()}], count - batch_size
            if self._stop is not None and position >= self._stop:
                break  # nothing further is kept: do not read (decode) the rest
        if count > 0:
            yield {**{n: np.concatenate([p[n] for p in pending]) for n in pending[0]}, **scalars}


def held_back_sources(calib: CalibSource | None, evaluation: CalibSource | None,
                      samples: int) -> tuple[CalibSource | None, CalibSource]:
    """Split off the held-back samples: (what calibration uses, what accuracy is measured on).

    With `evaluation`, its first `samples` samples are held back and calibration keeps all of
    `calib`. Without, every fourth calibration sample (the 4th, 8th, ...), up to `samples` of them,
    is held back and never used for calibration. Interleaving, rather than the last quarter, keeps
    both parts alike when the data is sorted, and needs no sample count (loader scripts have none).

    Raises:
        ConfigError: neither source is given (statistics files hold no samples to hold back).
    """
    if evaluation is not None:
        total = evaluation.num_samples()
        count = samples if total is None else min(samples, total)
        where = evaluation.describe() if total is not None and total <= samples else \
            f"the first {count} of {evaluation.describe()}"
        return calib, _Subset(evaluation, lambda p: p < samples, count, where, stop=samples)
    if calib is None:
        raise ConfigError("an accuracy target needs held-back data: give --eval PATH (statistics files hold "
                          "no samples)")
    every = HELD_BACK_EVERY
    total = calib.num_samples()
    held = None if total is None else min(samples, total // every)

    def is_held(p: np.ndarray) -> np.ndarray:
        return (p % every == every - 1) & (p // every < samples)

    held_source = _Subset(calib, is_held, held, f"every {every}th of {calib.describe()}, up to {samples} "
                          "(not used for calibration)", stop=every * samples)
    kept = None if total is None or held is None else total - held
    return _Subset(calib, lambda p: ~is_held(p), kept, f"{calib.describe()} minus the held-back samples"), held_source


@dataclass(frozen=True)
class HeldBack:
    """Held-back feeds in memory and the float model's outputs for them, computed once.

    Attributes:
        feeds: one feed per run.
        references: the float model's outputs, one mapping per feed.
        output_names: the graph outputs measured, in model order.
        samples: samples held back.
        description: where they come from.
    """

    feeds: tuple[Feed, ...]
    references: tuple[Mapping[str, np.ndarray], ...]
    output_names: tuple[str, ...]
    samples: int
    description: str


def load_held_back(model: onnx.ModelProto, source: CalibSource, batch_size: int,
                   providers: Sequence[str] = (CPU_PROVIDER,), fixed_batch: int | None = None) -> HeldBack:
    """Read `source` into memory and run the float `model` on it once.

    Args:
        model: the float model whose outputs are the reference.
        source: the held-back samples.
        batch_size: samples per run (a model with a fixed batch `fixed_batch` gets only full batches).
        providers: execution providers.
        fixed_batch: the model's fixed batch size, if it has one.

    Raises:
        CalibrationError: no samples were held back.
    """
    feeds, samples = [], 0
    for feed in source.batches(fixed_batch or batch_size):
        size = max((a.shape[0] for a in feed.values() if np.ndim(a) > 0), default=1)
        if fixed_batch is None or size == fixed_batch:
            feeds.append(feed)
            samples += size
    if not feeds:
        raise CalibrationError(f"{source.describe()}: no held-back samples to measure accuracy on")
    with open_session(model, providers) as session:
        references = tuple(session.run(feed) for feed in feeds)
        names = session.output_names
    return HeldBack(tuple(feeds), references, names, samples, source.describe())


def _accumulate(held: HeldBack, run: Callable[[Feed], Mapping[str, np.ndarray]]) -> tuple[OutputMetrics, ...]:
    sums = {name: MetricsAccumulator() for name in held.output_names}
    for feed, reference in zip(held.feeds, held.references):
        outputs = run(feed)
        for name in held.output_names:
            sums[name] = sums[name].update(reference[name], outputs[name])
    return tuple(sums[name].result(name) for name in held.output_names)


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
        self._session: Session = open_session(from_graph(gated.graph, template), providers)

    def measure(self, gates: np.ndarray) -> tuple[OutputMetrics, ...]:
        """Metrics against the float model with the given slots quantized."""
        names = self.held.output_names
        metrics = _accumulate(self.held, lambda feed: self._session.run({**feed, self.gates_input: gates}, names))
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


def measure_sensitivity(runner: GatedRunner, layer_map: LayerMap, started: float | None = None) -> SensitivityResult:
    """Measure every layer alone and recovered; sorted by recovery, largest first.

    Args:
        runner: the gated session on the held-back samples.
        layer_map: the plan's layers.
        started: `time.perf_counter()` when the work began (default: now), for `seconds`.
    """
    started = time.perf_counter() if started is None else started
    first_run = runner.runs
    runner.planned = first_run + 1 + 2 * len(layer_map.layers)
    full = runner.measure(layer_map.gates(()))
    entries = []
    for layer in layer_map.layers:
        alone = worst(runner.measure(layer_map.only(layer)))
        recovered = worst(runner.measure(layer_map.gates([layer.node_name])))
        entries.append(LayerSensitivity(layer.node_name, layer.op_type, layer.tensors, *alone, *recovered))
    entries.sort(key=_recovery_key)
    runner.planned = None
    return SensitivityResult(tuple(entries), full, runner.held.samples, runner.runs - first_run,
                             time.perf_counter() - started, runner.held.description)
