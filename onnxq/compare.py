"""A float model against its quantized version as deployed: accuracy of every output, and latency.

`compare` feeds both models the same data, measures each quantized output against the float one with
`onnxq.metrics`'s streaming metrics, then times both on the first batch, their runs interleaved
(`onnxq.runtime.timing`). The models run as deployed: ONNX Runtime sessions with every graph optimization on
(Q/DQ pairs fused into integer kernels where ONNX Runtime can), or TensorRT engines with `Backend.TRT`.
`onnxq.metrics.compare_models` stays the check of exact Q/DQ semantics: it runs unoptimized sessions.
"""

from __future__ import annotations

import enum
import importlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.data.signature import InputSpec, ModelSignature, signature_of
from onnxq.data.sources import CalibSource, open_source
from onnxq.data.images import ImagePreprocess
from onnxq.runtime.session import CPU_PROVIDER, open_session, resolve_providers
from onnxq.atomic import write_atomic
from onnxq.errors import CalibrationError, ConfigError, MissingDependencyError, ModelError
from onnxq.io import load_model
from onnxq.runtime.timing import LatencyStats, Timer, speedup, time_interleaved, wall_clock_timer
from onnxq.metrics import MetricsAccumulator, OutputMetrics

__all__ = ["Backend", "CompareConfig", "CompareResult", "ModelRun", "check_compatible", "compare",
           "require_backend", "write_json"]

_LOG = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
ProgressCallback = Callable[[int, int | None], None]


class Backend(enum.Enum):
    """What runs the two models."""

    ORT = "ort"
    TRT = "trt"


@dataclass(frozen=True)
class CompareConfig:
    """How `compare` runs the models.

    Attributes:
        backend: ONNX Runtime (graph optimizations on) or TensorRT engines.
        providers: ONNX Runtime execution providers, in order of preference (ORT backend only).
        batch_size: samples per run (a model with a fixed batch size uses its own).
        warmup: untimed runs of each model before timing.
        iterations: timed runs of each model.
        intra_op_threads: ONNX Runtime threads per operator for both sessions; None: its default.
    """

    backend: Backend = Backend.ORT
    providers: tuple[str, ...] = (CPU_PROVIDER,)
    batch_size: int = 8
    warmup: int = 10
    iterations: int = 50
    intra_op_threads: int | None = None

    def __post_init__(self) -> None:
        threads = 0 if self.intra_op_threads is None else self.intra_op_threads
        for option, value, least in (("--batch-size", self.batch_size, 1), ("--warmup", self.warmup, 0),
                                     ("--iterations", self.iterations, 1), ("--threads", threads, 0)):
            if value < least:
                raise ConfigError(f"{option} must be at least {least}, got {value}")
        object.__setattr__(self, "providers", resolve_providers(self.providers))
        if self.backend is Backend.TRT and self.providers != (CPU_PROVIDER,):
            raise ConfigError("--providers applies to --backend ort only")


@dataclass(frozen=True)
class ModelRun:
    """One model as it ran.

    Attributes:
        path: the model file.
        runtime: what ran it, e.g. "ONNX Runtime, all graph optimizations" or "TensorRT 10.8 engine".
        requested: the execution providers asked for (full names; TensorRT: the engine).
        providers: what actually ran it; ONNX Runtime silently drops providers it cannot load.
        latency: its timed runs.
        layer_precisions: TensorRT only: engine layers per type ("INT8", "FP32", ...).
    """

    path: str
    runtime: str
    requested: tuple[str, ...]
    providers: tuple[str, ...]
    latency: LatencyStats
    layer_precisions: tuple[tuple[str, int], ...] = ()

    @property
    def unloaded(self) -> tuple[str, ...]:
        """Requested providers that did not load."""
        return tuple(name for name in self.requested if name not in self.providers)


@dataclass(frozen=True)
class CompareResult:
    """Everything `compare` measured.

    Attributes:
        backend: what ran the models.
        data: a description of the data, e.g. "16 images in photos/ (...)".
        batch_size: samples per run.
        samples: samples both models were measured on.
        batches: runs per model for the accuracy metrics.
        skipped_samples: samples left out: their batch lacked the shape the models or engines are fixed
            to (a short last batch).
        metrics: one entry per output, in the float model's output order.
        reference: the float model.
        candidate: the quantized model.
        timed_batch: samples in the batch that was timed (the first batch of the data).
        warmup: untimed runs per model before timing.
        iterations: timed runs per model, interleaved float, quantized, float, ...
        intra_op_threads: ONNX Runtime threads per operator for both sessions (None: its default).
        seconds: wall time of the whole comparison.
    """

    backend: Backend
    data: str
    batch_size: int
    samples: int
    batches: int
    skipped_samples: int
    metrics: tuple[OutputMetrics, ...]
    reference: ModelRun
    candidate: ModelRun
    timed_batch: int
    warmup: int
    iterations: int
    intra_op_threads: int | None
    seconds: float

    @property
    def speedup(self) -> float:
        """Median latency of the float model over that of the quantized one; above 1 quantized is faster."""
        return speedup(self.reference.latency, self.candidate.latency)

    def to_dict(self) -> dict[str, Any]:
        """Every field plus `speedup`, as JSON-ready values (+-inf and NaN as "inf", "-inf", "nan")."""
        report = asdict(self)
        report.update(backend=self.backend.value, speedup=self.speedup, latency_order="interleaved",
                      graph_optimizations="all" if self.backend is Backend.ORT else None)
        for role, run in (("reference", self.reference), ("candidate", self.candidate)):
            report[role].update(unloaded=run.unloaded, layer_precisions=dict(run.layer_precisions))
        return _json_safe(report)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _dims_text(spec: InputSpec) -> str:
    dims = ", ".join("?" if dim is None else str(dim) for dim in spec.shape)
    return f"({dims}{',' if len(spec.shape) == 1 else ''}) {spec.dtype.name}"


def check_compatible(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """Check that both models take the same inputs and give the same outputs, by name.

    Returns:
        The inputs, in the float model's order.

    Raises:
        ModelError: an input is missing from either model or differs in shape or type (the message
            names it); or the output names differ (the message names those found in only one model).
    """
    ref_specs = {spec.name: spec for spec in signature_of(reference).inputs}
    cand_specs = {spec.name: spec for spec in signature_of(candidate).inputs}
    for name in ref_specs.keys() - cand_specs.keys():
        raise ModelError(f"input '{name}' of the float model is not an input of the quantized model")
    for name in cand_specs.keys() - ref_specs.keys():
        raise ModelError(f"input '{name}' of the quantized model is not an input of the float model")
    for name, spec in ref_specs.items():
        if (spec.shape, spec.dtype) != (cand_specs[name].shape, cand_specs[name].dtype):
            raise ModelError(f"input '{name}': the float model takes {_dims_text(spec)} but the quantized "
                             f"model takes {_dims_text(cand_specs[name])}")
    ref_outputs = [output.name for output in reference.graph.output]
    cand_outputs = [output.name for output in candidate.graph.output]
    if set(ref_outputs) != set(cand_outputs):
        only_float = ", ".join(f"'{name}'" for name in ref_outputs if name not in cand_outputs) or "none"
        only_quant = ", ".join(f"'{name}'" for name in cand_outputs if name not in ref_outputs) or "none"
        raise ModelError(f"the models' outputs differ: only in the float model {only_float}; "
                         f"only in the quantized model {only_quant}")
    return tuple(ref_specs.values())


def require_backend(backend: Backend) -> None:
    """Check that `backend` can run here, before any work is done.

    Raises:
        MissingDependencyError: TRT without TensorRT (10 or newer), the CUDA bindings, or a GPU.
    """
    if backend is not Backend.TRT:
        return
    try:
        runtime = importlib.import_module("onnxq.runtime.trt.runtime")
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("onnxq.runtime.trt"):
            raise
        raise MissingDependencyError("--backend trt: this onnxq installation has no onnxq.runtime.trt package") from None
    try:
        runtime.require_tensorrt()
        runtime.require_gpu()
    except MissingDependencyError as err:
        raise MissingDependencyError(f"--backend trt: {err}") from None


@dataclass(frozen=True)
class _Runner:
    """One model ready to run: a function for outputs and one that makes a Timer for a fixed feed."""

    runtime: str
    requested: tuple[str, ...]
    providers: tuple[str, ...]
    run: Callable[[Feed], Mapping[str, np.ndarray]]
    timer: Callable[[Feed], Timer]
    layer_precisions: tuple[tuple[str, int], ...] = ()


def _ort_runner(path: Path, config: CompareConfig, stack: ExitStack) -> _Runner:
    # No spinning: the two sessions take turns, and idle spinning threads would steal the other's cores.
    session = stack.enter_context(open_session(path, config.providers, optimize=True,
                                               intra_op_threads=config.intra_op_threads, spin=False))
    names = list(session.output_names)

    def timer(feed: Feed) -> Timer:
        ort_session, arrays = session.ort_session, dict(feed)
        return wall_clock_timer(lambda: ort_session.run(names, arrays))

    return _Runner("ONNX Runtime, all graph optimizations", session.requested, session.providers,
                   lambda feed: session.run(feed, names), timer)


def _trt_runner(path: Path, shapes: Mapping[str, tuple[int, ...]], stack: ExitStack) -> _Runner:
    build = importlib.import_module("onnxq.runtime.trt.build")
    engine_module = importlib.import_module("onnxq.runtime.trt.engine")
    runtime = importlib.import_module("onnxq.runtime.trt.runtime")
    built = build.build_engine(path, build.BuildConfig(shapes=shapes))
    engine = stack.enter_context(engine_module.TrtEngine(built.plan))
    major, minor = runtime.tensorrt_version()
    name = f"TensorRT {major}.{minor}"

    def timer(feed: Feed) -> Timer:
        return lambda: float(engine.time(feed, warmup=0, iterations=1)[0])  # CUDA-event time of one run

    return _Runner(f"{name} engine", (name,), (name,), engine.run, timer,
                   tuple(sorted(built.layer_precisions.items())))




def _shapes(feed: Feed) -> dict[str, tuple[int, ...]]:
    return {name: tuple(np.shape(array)) for name, array in feed.items()}


def _measure(reference: _Runner, candidate: _Runner, names: tuple[str, ...], feeds: Iterable[Feed],
             locked: Mapping[str, tuple[int, ...]] | None, total: int | None, signature: ModelSignature,
             on_progress: ProgressCallback | None) -> tuple[tuple[OutputMetrics, ...], int, int, int]:
    """Run both models on every feed; return the metrics, samples, batches and samples skipped."""
    accumulators = {name: MetricsAccumulator() for name in names}
    samples = batches = skipped = 0
    for feed in feeds:
        if locked is not None and _shapes(feed) != locked:
            skipped += signature.samples_in(feed)
            continue
        ref_outputs, cand_outputs = reference.run(feed), candidate.run(feed)
        for name in names:
            ref, cand = ref_outputs[name], cand_outputs[name]
            if np.shape(ref) != np.shape(cand):
                raise ModelError(f"output '{name}': the float model returns shape {np.shape(ref)} but the "
                                 f"quantized model returns {np.shape(cand)}")
            accumulators[name] = accumulators[name].update(ref, cand, signature.samples_in(feed))
        samples += signature.samples_in(feed)
        batches += 1
        if on_progress is not None:
            on_progress(samples, total)
    if skipped:
        _LOG.warning("%d samples left out: their batch does not have the shape %s the models run with",
                     skipped, locked)
    return tuple(accumulators[name].result(name) for name in names), samples, batches, skipped


def _first_batch(source: CalibSource, batch_size: int, signature: ModelSignature) -> tuple[Feed, Iterable[Feed]]:
    feeds = iter(source.batches(batch_size))
    first = next(feeds, None)
    if first is None:
        raise CalibrationError(f"{source.describe()}: no samples to compare the models on")
    fixed = signature.fixed_batch
    if fixed is not None and signature.samples_in(first) != fixed:
        raise CalibrationError(f"{source.describe()}: the models take batches of exactly {fixed} samples, "
                               f"the data holds only {signature.samples_in(first)}")
    return first, feeds


def compare(reference: str | os.PathLike[str], candidate: str | os.PathLike[str],
            data: str | os.PathLike[str] | CalibSource, config: CompareConfig = CompareConfig(), *,
            preprocess: ImagePreprocess = ImagePreprocess(),
            on_progress: ProgressCallback | None = None) -> CompareResult:
    """Measure the quantized model against the float one on `data`, then time both.

    Args:
        reference: the float model's file.
        candidate: the quantized model's file.
        data: a source, or anything `open_source` reads (.npz, .npy, a folder, loader.py:function).
        config: backend, providers, batch size, warm-up, iterations and threads.
        preprocess: how images are turned into inputs (image folders only).
        on_progress: called after each accuracy batch with (samples done, total samples or None).

    Returns:
        Accuracy per output, latency of both models, and what actually ran them.

    Raises:
        MissingDependencyError: the backend cannot run here (checked first).
        ModelError: a model cannot be loaded or run, or the models' inputs or outputs differ.
        CalibrationError: the data is missing, empty or does not fit the models.
    """
    started = time.perf_counter()
    require_backend(config.backend)
    ref_model, cand_model = load_model(reference), load_model(candidate)
    signature = ModelSignature(check_compatible(ref_model, cand_model))
    names = tuple(output.name for output in ref_model.graph.output)
    del ref_model, cand_model  # the sessions load the files themselves
    source = data if isinstance(data, CalibSource) else open_source(data, signature, preprocess)
    batch_size = signature.batch_size(config.batch_size)
    first, rest = _first_batch(source, batch_size, signature)
    paths = (Path(reference), Path(candidate))
    with ExitStack() as stack:
        if config.backend is Backend.TRT:
            ref_runner, cand_runner = (_trt_runner(path, _shapes(first), stack) for path in paths)
        else:
            ref_runner, cand_runner = (_ort_runner(path, config, stack) for path in paths)
        locked = _shapes(first) if config.backend is Backend.TRT or signature.fixed_batch is not None else None
        metrics, samples, batches, skipped = _measure(ref_runner, cand_runner, names, itertools.chain([first], rest),
                                                      locked, source.num_samples(), signature, on_progress)
        timers = (ref_runner.timer(first), cand_runner.timer(first))
        latencies = time_interleaved(timers, config.warmup, config.iterations)
    runs = [ModelRun(os.fspath(path), runner.runtime, runner.requested, runner.providers, latency,
                     runner.layer_precisions)
            for path, runner, latency in zip(paths, (ref_runner, cand_runner), latencies)]
    return CompareResult(backend=config.backend, data=source.describe(), batch_size=batch_size, samples=samples,
                         batches=batches, skipped_samples=skipped, metrics=metrics, reference=runs[0],
                         candidate=runs[1], timed_batch=signature.samples_in(first), warmup=config.warmup,
                         iterations=config.iterations, intra_op_threads=config.intra_op_threads,
                         seconds=time.perf_counter() - started)


def write_json(result: CompareResult, path: str | os.PathLike[str]) -> Path:
    """Write `result.to_dict()` as JSON to `path` atomically (temporary file beside it, then rename).

    Raises:
        OnnxqError: the file cannot be written; nothing is left behind.
    """
    target = Path(path)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    write_atomic(target, text.encode("utf-8"), "the report")
    return target
