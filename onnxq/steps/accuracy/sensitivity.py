"""Per-layer sensitivity: how much output error each quantized layer causes, measured in one session.

A *layer* is a node the plan quantizes (a Conv/Gemm/MatMul with its activation input(s) and weight, a
residual Add's skip input, a pooling input). Its *slots* are the quantized inputs that disappear when
the node is excluded and the graph re-planned: its own inputs, plus inputs whose quantization only
made sense because of it (the skip input of the residual Add fused into a Conv goes with that Conv).

All measurements run the gated model (`passes.gate_qdq`): "only layer i quantized", "all but layer i
quantized" and "these k layers float" are different bool vectors fed to the same session (or to
identical sessions in several processes, `--jobs`: the layers are independent, so they are measured
in one batch and put back in order), with the calibrated scales unchanged. A set of float layers is turned into gates by
re-planning with those nodes excluded (`gate_qdq.LayerMap`), so a tensor shared by two quantized
consumers keeps its Q/DQ for the other one, exactly as `quantize --exclude-nodes` would place it. The
float model's outputs on the held-back samples are computed once and cached; each measurement
streams the outputs through `MetricsAccumulator` against them.

The gates reproduce the re-planned model exactly (tested) except in one case: when a fallback
removes a member of a Concat's shared-scale group, the real model recalibrates the group's scale
from the remaining members while the gated one keeps the old scale. The fallback's verification on
the built model catches any such difference.

Cost: 1 + 2 x layers passes over the held-back samples, each about one unoptimized float inference
plus the Q/DQ and Where nodes (about 15% more), spread over the measurer's sessions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.io import from_graph
from onnxq.lower.gate_qdq import gate_qdq
from onnxq.lower.scales import ActivationParams
from onnxq.metrics import OutputMetrics
from onnxq.runtime.session import CPU_PROVIDER
from onnxq.steps.accuracy.gate_workers import MeasurerFactory, in_process, parallelism
from onnxq.steps.accuracy.held_back import HeldBack, load_held_back, measure_model, prefix_samples, worst
from onnxq.steps.accuracy.layers import LayerMap

__all__ = [
    "HeldBack", "load_held_back", "GatedRunner", "measure_model",
    "LayerSensitivity", "SensitivityResult", "measure_sensitivity", "worst",
]

RunCallback = Callable[[int, int | None], None]


# --- the gated model ----------------------------------------------------------------------------

class GatedRunner:
    """The gated model on the held-back samples; `measure(gates)` is one pass over them.

    The passes run in a `Measurer` (`onnxq.steps.accuracy.gate_workers`): one session in this process by
    default, or several processes (`process_pool.local_measurers(jobs)`); `measure_many` hands a batch
    of independent gate vectors to it at once, the results in input order whoever measured them.

    Attributes:
        held: the held-back samples and float outputs.
        runs: passes made so far.
        on_run: called after each pass with (runs, planned).
        planned: the run count the current stage expects to reach, or None (reported to `on_run`).
        width: gate vectors the measurer runs at once (`gate_workers.parallelism`).
    """

    def __init__(self, layer_map: LayerMap, params: Mapping[str, ActivationParams],
                 template: onnx.ModelProto, held: HeldBack, providers: Sequence[str] = (CPU_PROVIDER,),
                 on_run: RunCallback | None = None, measurers: MeasurerFactory = in_process) -> None:
        gated = gate_qdq(layer_map.graph, layer_map.gated_plan, params)
        self.held, self.runs, self.on_run, self.planned = held, 0, on_run, None
        self.gates_input = gated.gates_input
        self._measurer = measurers(from_graph(gated.graph, template), gated.gates_input, held, providers)
        self.width = parallelism(self._measurer)

    def measure(self, gates: np.ndarray, samples: int | None = None) -> tuple[OutputMetrics, ...]:
        """Metrics against the float model with the given slots quantized (on the first feeds that hold
        `samples` samples, when given)."""
        return self.measure_many([gates], samples)[0]

    def measure_many(self, gate_vectors: Sequence[np.ndarray], samples: int | None = None) -> list[tuple[OutputMetrics, ...]]:
        """`measure` of each gate vector, in input order (measured at once where the measurer can)."""
        return self._measurer.measure_many(gate_vectors, samples, self._count)

    def _count(self) -> None:
        self.runs += 1
        if self.on_run is not None:
            self.on_run(self.runs, self.planned)

    def close(self) -> None:
        self._measurer.close()

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
    vectors = []
    for layer in layer_map.layers:
        vectors += [layer_map.only(layer), layer_map.gates([layer.node_name])] if alone else [layer_map.gates([layer.node_name])]
    if full is None and samples is None:  # one batch
        full, *results = runner.measure_many([layer_map.gates(()), *vectors])
    else:
        full = runner.measure(layer_map.gates(())) if full is None else full
        results = runner.measure_many(vectors, samples)
    entries, step = [], 1 + alone
    for i, layer in enumerate(layer_map.layers):
        only = worst(results[step * i]) if alone else (math.nan, math.nan)
        recovered = worst(results[step * i + step - 1])
        entries.append(LayerSensitivity(layer.node_name, layer.op_type, layer.tensors, *only, *recovered))
    entries.sort(key=_recovery_key)
    runner.planned = None
    return SensitivityResult(tuple(entries), full, prefix_samples(runner.held, samples), runner.runs - first_run,
                             time.perf_counter() - started, runner.held.description)
