"""The quantization pipeline, spelled out once: load → prepare → [steps rewrite] → plan → calibrate →
[steps refine] → build → check → verify (the written model run once in ONNX Runtime, optimized). What differs
between runtimes is the target (`onnxq.targets`); what is optional is a step (`onnxq.steps`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxq.calib.calibrate import CalibrationResult, calibrate
from onnxq.calib.histogram import Histogram
from onnxq.calib.stats_file import StatsFile, load_stats, model_digest
from onnxq.cluster.backend import RayBackend, ShardedData
from onnxq.cluster.pool import WorkerPool, open_pool
from onnxq.config import AccuracyGoal, QuantConfig
from onnxq.data.images import ImagePreprocess
from onnxq.data.held_back import held_back_sources
from onnxq.data.signature import ModelSignature, signature_of
from onnxq.data.sources import CalibSource, open_source
from onnxq.errors import CalibrationError, ConfigError, ModelError
from onnxq.external_data import is_large
from onnxq.io import from_graph, load_model, to_graph
from onnxq.options import CalibMethod, Selection
from onnxq.passes import PREPARE, GraphPass, run
from onnxq.passes.name_nodes import name_nodes
from onnxq.passes.upgrade_opset import upgrade_opset
from onnxq.plan.core import QuantPlan
from onnxq.plan.replan import Replanner
from onnxq.steps.accuracy.fallback import FallbackResult
from onnxq.steps.accuracy.sensitivity import SensitivityResult
from onnxq.steps.accuracy.step import AccuracyFinding, MeetAccuracy
from onnxq.steps.base import Job, ProgressCallback, Step, StepSkipped
from onnxq.steps.bias_correction import BY_DEFAULT as BIAS_CORRECTION_BY_DEFAULT, BiasCorrection
from onnxq.steps.equalize import Equalize
from onnxq.steps.latency_search import LatencySearch, LatencySearchConfig, SearchLatency
from onnxq.steps.ranges import ChooseRanges
from onnxq.steps.smoothquant import SmoothQuant
from onnxq.steps.attention import ChooseAttention
from onnxq.targets import QuantTarget, get_target

__all__ = ["QuantResult", "prepare", "inspect", "quantize", "collect_stats", "steps_for"]

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike[str]
DataLike = CalibSource | ShardedData | str | os.PathLike[str]
#: Where calibration runs besides this process: a Ray backend to connect to, or a pool already open.
Backend = RayBackend | WorkerPool

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"})


@dataclass(frozen=True)
class QuantResult:
    """The quantized model and how it was made.

    Attributes:
        model: the INT8 Q/DQ model.
        plan: the plan it was built from (every node's decision and reason).
        calibration: the statistics and what collecting them took.
        group_amax: the chosen range of every scale group.
        seconds: wall time of the whole run.
        findings: what each step found and did, in pipeline order (`LatencySearch`, `AccuracyFinding`,
            `Equalized`, `Smoothed`, `StepSkipped`, ...).
    """

    model: onnx.ModelProto
    plan: QuantPlan
    calibration: CalibrationResult
    group_amax: Mapping[str, float]
    seconds: float
    findings: tuple[object, ...] = ()

    def finding(self, kind: type) -> object | None:
        """The first finding of type `kind`, or None."""
        return next((f for f in self.findings if isinstance(f, kind)), None)

    @property
    def sensitivity(self) -> SensitivityResult | None:
        found = self.finding(AccuracyFinding)
        return found.sensitivity if isinstance(found, AccuracyFinding) else None

    @property
    def fallback(self) -> FallbackResult | None:
        found = self.finding(AccuracyFinding)
        return found.fallback if isinstance(found, AccuracyFinding) else None

    @property
    def latency(self) -> LatencySearch | None:
        found = self.finding(LatencySearch)
        return found if isinstance(found, LatencySearch) else None

    @property
    def notes(self) -> tuple[str, ...]:
        """What a user should know beyond the figures: steps that did not run, a plan that quantizes nothing."""
        notes = [f.reason for f in self.findings if isinstance(f, StepSkipped)]
        notes += [f.warning for f in self.findings if isinstance(f, AccuracyFinding) and f.warning]
        if not self.plan.quantized_nodes:
            nested = sorted({d.op_type for d in self.plan.decisions if d.op_type in ("If", "Loop", "Scan")})
            where = (f"; the model computes inside {'/'.join(nested)} subgraphs, which onnxq does not quantize yet"
                     if nested else "")
            notes.append(f"nothing was quantized: the output computes what the float model does{where}")
        return tuple(notes)


def _as_model(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(Path(model))


def _open(data: DataLike | None, signature: ModelSignature, preprocess: ImagePreprocess) -> CalibSource | None:
    if isinstance(data, ShardedData):
        return data.open(signature)
    if data is None or not isinstance(data, (str, os.PathLike)):
        return data
    return open_source(data, signature, preprocess)


def _sharded(data: DataLike | None, preprocess: ImagePreprocess, backend: Backend | None) -> ShardedData | None:
    """The data the workers of `backend` read their shards of (None without a backend)."""
    if backend is None or data is None or isinstance(data, ShardedData):
        return data if backend is not None else None
    if not isinstance(data, (str, os.PathLike)):
        raise ConfigError("calibration on Ray reads the data on the workers: give its path (one every node can "
                          "read) or a ShardedData, not an opened source")
    return ShardedData.at(data, preprocess)


@contextmanager
def _workers(backend: Backend | None, config: QuantConfig, model: onnx.ModelProto) -> Iterator[WorkerPool | None]:
    """The worker pool of a run: the caller's, one opened for the run (closed after it), or None."""
    if backend is not None and is_large(model):
        raise ConfigError("a model this large (weights in external data, over ONNXQ_LARGE_MODEL_BYTES) is not sent "
                          "to Ray workers: its prepared copy would go through the object store whole; calibrate "
                          "it without --ray, or with --shard I/N on several machines")
    if backend is None or isinstance(backend, WorkerPool):
        yield backend
        return
    backend.check_providers(config.calib.providers)
    with open_pool(backend) as pool:
        yield pool


_HALF_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def _refuse_float16(model: onnx.ModelProto) -> None:
    """A model whose inputs are float16 or bfloat16 computes in that type: INT8 Q/DQ for it needs opset 19
    and half-precision scales throughout, which onnxq does not write. Refused before any work."""
    for value in model.graph.input:
        half = _HALF_TYPES.get(value.type.tensor_type.elem_type)
        if half is not None:
            raise ModelError(f"input '{value.name}' is {half}: onnxq quantizes float32 models; export the model in "
                             "float32 (--high-precision fp16 then writes its unquantized rest in float16)")


def prepare(model: ModelLike, target: QuantTarget | str | None = None) -> gs.Graph:
    """Upgrade to opset >= 13, import, move Constant weights to initializers, fold constants and BN;
    then the rewrites of `target`'s runtime, if any."""
    model = _as_model(model)
    already = sorted({n.op_type for n in model.graph.node} & _QDQ_OPS)
    if already:
        raise ModelError(f"the model is already quantized (contains {', '.join(already)})")
    target_passes = get_target(target).prepare_passes if target is not None else ()
    return run(to_graph(upgrade_opset(model)), (*PREPARE, *target_passes, name_nodes))


def inspect(model: ModelLike, selection: Selection = Selection(), target: QuantTarget | str = "trt") -> QuantPlan:
    """The quantization plan for `model`, without calibrating."""
    return get_target(target).plan(prepare(model, target), selection)


def steps_for(config: QuantConfig, *, accuracy: AccuracyGoal | None = None, eval_source: CalibSource | None = None,
              latency: LatencySearchConfig | None = None) -> tuple[Step, ...]:
    """The steps the config asks for, in pipeline order: cross-layer equalization (on unless
    `config.equalize` is False), SmoothQuant, the range search (`--method auto`), the latency search (the
    target's default when `config.latency_search` is None), the accuracy target, bias correction (its
    default when `config.bias_correction` is None; `quantize` runs it after the caller's steps too).
    Equalization comes first: it needs no data, and SmoothQuant measures the activations of the graph it is
    given."""
    steps: list[Step] = [Equalize()] if config.equalize is not False else []
    if config.smoothquant is not False:
        alpha = None if config.smoothquant in (None, True) else float(config.smoothquant)
        steps.append(SmoothQuant(alpha, requested=config.smoothquant is not None))
    if config.selection.quantize_attention is None and config.target.quantize_attention:
        steps.append(ChooseAttention())
    if config.calib.method is CalibMethod.AUTO:
        steps.append(ChooseRanges())
    if latency is not None or config.latency_search:
        steps.append(SearchLatency(latency or LatencySearchConfig(providers=config.calib.providers)))
    elif config.latency_search is None and config.target.latency_search:
        steps.append(SearchLatency(LatencySearchConfig(providers=config.calib.providers), requested=False))
    if accuracy is not None:
        steps.append(MeetAccuracy(accuracy, eval_source))
    if config.bias_correction or (config.bias_correction is None and BIAS_CORRECTION_BY_DEFAULT):
        steps.append(BiasCorrection(requested=bool(config.bias_correction)))
    return tuple(steps)


def _bias_correction_last(steps: Sequence[Step]) -> tuple[Step, ...]:
    """`steps` with bias correction moved to the end (it corrects the layers of the final plan), once: a
    `BiasCorrection` the caller gives replaces the config's."""
    corrections = [step for step in steps if isinstance(step, BiasCorrection)]
    rest = tuple(step for step in steps if not isinstance(step, BiasCorrection))
    return (*rest, corrections[-1]) if corrections else rest


def _compose(defaults: Sequence[Step], given: Sequence[Step]) -> tuple[Step, ...]:
    """The config's steps, each replaced in its place by a given step of the same type; then the rest."""
    replacing = {type(step): step for step in given}
    composed = [replacing.get(type(step), step) for step in defaults]
    return (*composed, *(step for step in given if not any(step is used for used in composed)))


def _start(model: onnx.ModelProto, signature: ModelSignature, data: CalibSource | None, config: QuantConfig,
           steps: Sequence[Step], on_progress: ProgressCallback | None) -> Job:
    """The job, checked by every step, with the held-back samples split off the calibration data."""
    job = Job(model, signature, config, data, on_progress=on_progress)
    for step in steps:
        step.check(job)
    holds = [hold for hold in (step.hold_back(job) for step in steps) if hold is not None]
    if holds:
        job.source, job.held_back = held_back_sources(data, holds[0].source, max(h.samples for h in holds),
                                                      signature=signature)
        job.held_back_from_calib = holds[0].source is None
    return job


def _rewrites(steps: Sequence[Step]) -> tuple[str, ...]:
    """The data-free rewrites a statistics file must have been collected after (they change activations)."""
    return tuple(step.tag for step in steps if isinstance(step, Equalize))


def _calibrate(job: Job, plan: QuantPlan, extra: Sequence[str], stats: StatsFile | str | os.PathLike[str] | None,
               histograms: bool | None = None, rewrites: tuple[str, ...] = (),
               sharded: ShardedData | None = None) -> CalibrationResult:
    if stats is not None:
        loaded = stats if isinstance(stats, StatsFile) else load_stats(stats)
        where = "the statistics" if isinstance(stats, StatsFile) else f"{os.fspath(stats)}: these statistics"
        if loaded.model_digest != model_digest(job.model):
            raise CalibrationError(f"{where} were collected for a different model (digest mismatch). "
                                   "Hint: run onnxq calibrate on this model")
        if loaded.rewrites != rewrites:
            collected, wanted = (f"after {', '.join(r) or 'no rewrite'}" for r in (loaded.rewrites, rewrites))
            raise CalibrationError(f"{where} were collected {collected}; this run quantizes {wanted}. "
                                   "Hint: give --equalize/--no-equalize as to onnxq calibrate, or recalibrate")
        if loaded.missing_shards():
            log.warning("%s hold shards %s of the data; shards %s are missing", where, ", ".join(loaded.shards),
                        ", ".join(loaded.missing_shards()))
        return CalibrationResult(loaded.histograms, loaded.samples, loaded.batches, (), 0.0)
    assert job.source is not None and job.graph is not None
    if job.workers is not None and sharded is not None:
        from onnxq.cluster.calibration import calibrate_on_ray

        if job.held_back_from_calib:
            raise ConfigError("calibration on Ray uses every sample of --calib, but the accuracy target holds "
                              "every 4th back; give held-out data with --eval")
        return calibrate_on_ray(from_graph(job.graph).SerializeToString(), (*plan.activation_names, *extra), sharded,
                                job.config.calib, job.workers, signature=job.signature, histograms=histograms,
                                on_progress=job.progress("calibrating"))
    return calibrate(job.graph, (*plan.activation_names, *extra), job.source, job.config.calib,
                     job.progress("calibrating"), histograms=histograms, signature=job.signature)


def quantize(model: ModelLike, calib: DataLike | None = None, config: QuantConfig = QuantConfig(), *,
             stats: StatsFile | str | os.PathLike[str] | None = None, steps: Sequence[Step] = (),
             preprocess: ImagePreprocess = ImagePreprocess(), user_passes: Sequence[GraphPass] = (),
             on_progress: ProgressCallback | None = None, accuracy: AccuracyGoal | None = None,
             eval_source: DataLike | None = None, latency: LatencySearchConfig | None = None,
             backend: Backend | None = None) -> QuantResult:
    """Quantize `model` to INT8 Q/DQ for `config.target`, calibrating on `calib` or reusing `stats`.

    Args:
        model: a ModelProto or the path of an .onnx file.
        calib: a calibration source, or a path `open_source` understands (.npz, .npy, a folder of
            them or of images, `loader.py:function`).
        config: selection, calibration, target and the shorthands for steps (equalize, smoothquant,
            latency_search).
        stats: statistics from `collect_stats` (or a file `save_stats` wrote), instead of `calib`:
            no inference runs, and any method can be applied.
        steps: more steps, run after the config's (e.g. `MeetAccuracy(goal)`, your own `Step`); a step of
            the same type as one the config asks for takes its place (e.g. `ChooseRanges(budget_seconds=5)`).
        preprocess: how images are turned into tensors, when `calib` is a folder of images.
        user_passes: your own graph passes, run in order after the prepare stage and before planning.
        on_progress: called with (stage, done, total or None) during long work.
        accuracy, eval_source, latency: shorthands for `MeetAccuracy(accuracy, eval_source)` and
            `SearchLatency(latency)` (kept for one release).
        backend: calibrate on Ray (`RayBackend`, connected for the run, or an open `WorkerPool`): `calib`
            is then a path every worker reads its shards of (or a `ShardedData`); the statistics are
            identical to calibrating here.

    Raises:
        ConfigError: both or neither of `calib` and `stats`, or a step that cannot run here.
        TargetNotMetError: an accuracy goal is not met (unless `write_anyway`).
    """
    started = time.perf_counter()
    if (calib is None) == (stats is None):
        raise ConfigError("give either calibration data (--calib) or a statistics file (--stats), not both")
    model = _as_model(model)
    _refuse_float16(model)
    signature = signature_of(model)
    steps = _bias_correction_last(_compose(steps_for(config, accuracy=accuracy, latency=latency,
                                                     eval_source=_open(eval_source, signature, preprocess)),
                                           steps))
    sharded = _sharded(calib, preprocess, backend) if stats is None else None
    with _workers(backend if stats is None else None, config, model) as workers:
        job = _start(model, signature, _open(calib, signature, preprocess), config, steps, on_progress)
        job.workers = workers
        graph = run(prepare(model, config.target), user_passes)
        for step in steps:
            graph = step.rewrite(job, graph)
        job.graph, job.replanner = graph, Replanner(graph, config.target.plan, config.selection)
        plan = job.replanner.plan_without(())
        job.calibration = _calibrate(job, plan, [t for step in steps for t in step.extra_tensors(job, plan)], stats,
                                     rewrites=_rewrites(steps), sharded=sharded)
        for step in steps:
            plan, finding = step.refine(job, plan)
            job.findings += [finding] if finding is not None else []
        amax = job.amax(plan)
        model = job.build(plan)
        config.target.verify(model, job.first_batch())
        return QuantResult(model, plan, job.calibration, amax, time.perf_counter() - started, tuple(job.findings))


def collect_stats(model: ModelLike, calib: DataLike, config: QuantConfig = QuantConfig(), *,
                  preprocess: ImagePreprocess = ImagePreprocess(), on_progress: ProgressCallback | None = None,
                  user_passes: Sequence[GraphPass] = (), backend: Backend | None = None
                  ) -> tuple[StatsFile, CalibrationResult]:
    """Collect histograms of every tensor the plan quantizes, for `quantize(..., stats=...)` later (after
    the config's data-free rewrites, cross-layer equalization, which the file records). `backend`: as
    `quantize`'s."""
    model = _as_model(model)
    signature = signature_of(model)
    sharded = _sharded(calib, preprocess, backend)
    with _workers(backend, config, model) as workers:
        job = Job(model, signature, config, _open(calib, signature, preprocess), on_progress=on_progress,
                  workers=workers)
        return _collect(job, user_passes, sharded)


def _collect(job: Job, user_passes: Sequence[GraphPass], sharded: ShardedData | None
             ) -> tuple[StatsFile, CalibrationResult]:
    model, config = job.model, job.config
    graph = run(prepare(model, config.target), user_passes)
    rewriting = [step for step in steps_for(config) if isinstance(step, Equalize)]
    for step in rewriting:
        graph = step.rewrite(job, graph)
    job.graph = graph
    calibration = _calibrate(job, config.target.plan(job.graph, config.selection), (), None, histograms=True,
                             sharded=sharded)
    histograms = {name: h for name, h in calibration.stats.items() if isinstance(h, Histogram)}
    shard = getattr(job.source, "shard", None)  # a shard of the data (onnxq.data.shards) records its id
    return StatsFile(model_digest(model), calibration.samples, calibration.batches, histograms,
                     _rewrites(rewriting), () if shard is None else (str(shard),)), calibration
