"""ONNX Runtime sessions: provider names, honest provider reporting, and errors a user can read.

This module and `onnxq.metrics` are the only places that import onnxruntime. A `Session` reports the
execution providers ONNX Runtime actually uses, which can differ from the requested ones: the GPU
build lists CUDA and TensorRT as available even when their libraries cannot be loaded, and then runs
on CPU after logging an error. That fallback is logged as a warning and visible in
`Session.providers`.
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime

import onnxq.external_data as external_data
import onnxq.mapped_weights as mapped_weights
from onnxq.io import export_light, from_graph, graph_size_bytes, has_mapped_constants
from onnxq.errors import ConfigError, ModelError
from onnxq.runtime.ort_errors import describe_array, ort_message

__all__ = ["PROVIDER_ALIASES", "CPU_PROVIDER", "resolve_providers", "Session", "open_session"]

_LOG = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"

PROVIDER_ALIASES: Mapping[str, str] = {
    "cpu": CPU_PROVIDER,
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt-rtx": "NvTensorRTRTXExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "acl": "ACLExecutionProvider",
    "cann": "CANNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}


def _known_provider_names() -> dict[str, str]:
    """Lower-cased alias or full provider name -> full provider name."""
    known = {name.lower(): name for name in onnxruntime.get_all_providers()}
    known.update(PROVIDER_ALIASES)
    return known


def resolve_providers(names: Sequence[str]) -> tuple[str, ...]:
    """Turn aliases (`cuda`, `trt`, ...) or full names into full ONNX Runtime provider names.

    Matching is case-insensitive; duplicates are dropped, order is kept. Whether a provider is
    available on this machine is checked by `open_session`, not here.

    Args:
        names: provider aliases or full names, in order of preference.

    Returns:
        The full provider names.

    Raises:
        ConfigError: a name is neither an alias nor a provider ONNX Runtime knows.
    """
    known = _known_provider_names()
    resolved: list[str] = []
    for name in names:
        full_name = known.get(name.strip().lower())
        if full_name is None:
            close = difflib.get_close_matches(name.strip().lower(), list(known), n=1, cutoff=0.6)
            hint = f" Hint: did you mean '{close[0]}'?" if close else ""
            available = ", ".join(onnxruntime.get_available_providers())
            raise ConfigError(
                f"--providers: unknown execution provider '{name}'.{hint} "
                f"Available here: {available}; aliases: {', '.join(PROVIDER_ALIASES)}"
            )
        if full_name not in resolved:
            resolved.append(full_name)
    return tuple(resolved)


@dataclass(frozen=True)
class Session:
    """A thin typed wrapper around `onnxruntime.InferenceSession`.

    Use it as a context manager, or call `close()`, to remove the temporary copy of a model that was
    too large to pass to ONNX Runtime as bytes (it is also removed when the session is collected).

    Attributes:
        ort_session: the wrapped ONNX Runtime session.
        requested: the providers the caller asked for (full names), before the CPU fallback was added.
    """

    ort_session: onnxruntime.InferenceSession
    requested: tuple[str, ...]
    _temp_dir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False, compare=False)
    _shared: tuple[object, ...] = field(default=(), repr=False, compare=False)

    @property
    def providers(self) -> tuple[str, ...]:
        """The providers ONNX Runtime actually uses, in priority order."""
        return tuple(self.ort_session.get_providers())

    @property
    def unloaded_providers(self) -> tuple[str, ...]:
        """Requested providers that ONNX Runtime could not load (it silently runs without them)."""
        used = set(self.providers)
        return tuple(name for name in self.requested if name not in used)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The graph's input names, initializers excluded."""
        return tuple(arg.name for arg in self.ort_session.get_inputs())

    @property
    def output_names(self) -> tuple[str, ...]:
        """The graph's output names."""
        return tuple(arg.name for arg in self.ort_session.get_outputs())

    def run(
        self, feed: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            feed: input name -> array.
            output_names: the outputs to compute; all graph outputs when None.

        Returns:
            Output name -> array. No returned array shares memory with an array of `feed`.

        Raises:
            ModelError: ONNX Runtime failed; the message names the node if ONNX Runtime did, and the
                input shapes.
        """
        names = list(output_names) if output_names is not None else list(self.output_names)
        run_options = onnxruntime.RunOptions()
        # The failure is raised as a ModelError below; do not also let ORT print it.
        run_options.log_severity_level = 4
        try:
            arrays = self.ort_session.run(names, dict(feed), run_options)
        except Exception as err:  # onnxruntime's exceptions share no base class but Exception
            shapes = ", ".join(f"{name} {describe_array(value)}" for name, value in feed.items())
            raise ModelError(f"{ort_message(err)} (inputs: {shapes or 'none'})") from None
        feed_arrays = [value for value in feed.values() if isinstance(value, np.ndarray)]
        outputs: dict[str, np.ndarray] = {}
        for name, array in zip(names, arrays):
            if isinstance(array, np.ndarray) and any(np.may_share_memory(array, x) for x in feed_arrays):
                array = array.copy()
            outputs[name] = array
        return outputs

    def close(self) -> None:
        """Remove the temporary model copy, if there is one, and drop the pages of mapped weights this
        session touched from the process's memory (`onnxq.mapped_weights.release_pages`). Safe to call
        more than once."""
        if self._temp_dir is not None:
            self._temp_dir.cleanup()
        if self._shared:
            mapped_weights.release_pages()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_session(
    model: onnx.ModelProto | gs.Graph | str | os.PathLike[str],
    providers: Sequence[str] = (CPU_PROVIDER,),
    *,
    optimize: bool = False,
    intra_op_threads: int | None = None,
    spin: bool = True,
    spin_after_run: bool = True,
    memory_pattern: bool = True,
    arena: bool = True,
) -> Session:
    """Create an ONNX Runtime session for `model`.

    Args:
        model: a model, a graph (exported as `from_graph` does; a large graph's weights are handed to ONNX
            Runtime in place, without a copy), or the path of an .onnx file (its external data beside it).
        providers: provider aliases or full names in order of preference; CPU is always added last.
        optimize: apply all ONNX Runtime graph optimizations (they never remove a graph output, so a
            calibration session whose measured tensors are outputs may use them).
        intra_op_threads: threads per operator; ONNX Runtime's default when None.
        spin: let idle worker threads busy-wait after a run (ORT's default). Turn it off when two
            sessions take turns, or one session's spinning threads steal the other's cores.
        spin_after_run: with `spin`, let the threads go on spinning after a run returns (ORT's
            default). Off when the caller's own threads work between runs (calibration folding
            statistics): the spinning threads would take their cores.
        memory_pattern: let ORT pre-plan one block for every intermediate tensor (its default). Off
            for calibration: with dozens of tensors exposed as outputs the plan over-allocates
            (EfficientNet-Lite0, 64 samples: peak 731 -> 574 MiB, no slower).
        arena: let ORT keep freed memory for later runs (its default). Off for a session that runs
            rarely beside another, so its large runs leave nothing allocated behind them.

    Returns:
        The session. A requested provider that could not be loaded is logged as a warning and is
        missing from `Session.providers`.

    Raises:
        ConfigError: a provider is unknown or not available in this ONNX Runtime build.
        ModelError: ONNX Runtime cannot load the model.
    """
    requested = resolve_providers(providers)
    available = onnxruntime.get_available_providers()
    for name in requested:
        if name not in available:
            raise ConfigError(
                f"--providers: {name} is not available in this onnxruntime build "
                f"(available: {', '.join(available)})"
            )
    ort_providers = list(requested) if CPU_PROVIDER in requested else [*requested, CPU_PROVIDER]
    options = _session_options(optimize, intra_op_threads)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif not spin_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_mem_pattern = memory_pattern
    options.enable_cpu_mem_arena = arena
    source, temp_dir, arrays, copied = _session_source(model)
    shared = _share_weights(arrays, options, copied)
    try:
        ort_session = onnxruntime.InferenceSession(source, sess_options=options, providers=ort_providers)
    except Exception as err:  # onnxruntime's exceptions share no base class but Exception
        if temp_dir is not None:
            temp_dir.cleanup()
        raise ModelError(f"ONNX Runtime cannot load the model: {ort_message(err)}") from None

    session = Session(ort_session=ort_session, requested=requested, _temp_dir=temp_dir, _shared=shared)
    if temp_dir is not None:
        weakref.finalize(session, temp_dir.cleanup)
    if shared:
        weakref.finalize(session, mapped_weights.release_pages)
    _warn_about_unloaded_providers(session)
    return session


def _session_source(
    model: onnx.ModelProto | gs.Graph | str | os.PathLike[str],
) -> tuple[str | bytes, tempfile.TemporaryDirectory[str] | None, dict[str, np.ndarray], bool]:
    """What to hand ONNX Runtime: a path, serialized bytes, or for a large model the path of a temporary
    skeleton, the arrays of the weights it leaves out, and whether ORT must get copies of them (its graph
    optimizers read the weights of the skeleton's `_OPTIMIZERS_READ_WEIGHTS_OF` nodes)."""
    if isinstance(model, gs.Graph):
        if graph_size_bytes(model) <= external_data.threshold() and not has_mapped_constants(model):
            return from_graph(model).SerializeToString(), None, {}, False
        light, arrays = export_light(model)
    elif isinstance(model, onnx.ModelProto):
        _reject_unresolved_external_data(model)
        if not external_data.is_large(model) and not mapped_weights.has_mapped(model):
            return model.SerializeToString(), None, {}, False
        light, arrays = external_data.skeleton(model, external_data.SESSION_DATA_NAME), None
    else:
        return os.fspath(model), None, {}, False
    _LOG.debug("opening an ONNX Runtime session on a large model's skeleton, its weights shared")
    temp_dir = tempfile.TemporaryDirectory(prefix="onnxq-session-", ignore_cleanup_errors=True)
    try:
        path = _save_skeleton(light, Path(temp_dir.name))
        copied = any(node.op_type in _OPTIMIZERS_READ_WEIGHTS_OF for node in light.graph.node)
        return path, temp_dir, external_data.shared_arrays(model) if arrays is None else arrays, copied
    except BaseException:
        temp_dir.cleanup()
        raise


def _session_options(optimize: bool, intra_op_threads: int | None) -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    level = onnxruntime.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    if intra_op_threads is not None:
        if intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be 0 (ORT decides) or more, got {intra_op_threads}")
        options.intra_op_num_threads = intra_op_threads
    return options


def _warn_about_unloaded_providers(session: Session) -> None:
    running_on = ", ".join(session.providers)
    for name in session.unloaded_providers:
        if name != CPU_PROVIDER:
            _LOG.warning("%s was requested but could not be loaded; running on %s", name, running_on)


def _reject_unresolved_external_data(model: onnx.ModelProto) -> None:
    for tensor in external_data.all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not mapped_weights.is_mapped(tensor):
            raise ModelError(
                f"tensor '{tensor.name}' refers to external data that was not loaded; "
                "load the model with its external data or pass the model's path"
            )


def _save_skeleton(skeleton: onnx.ModelProto, directory: Path) -> str:
    """Write a skeleton (large tensors as references into an empty side file); return its path.

    ONNX Runtime gets the large tensors' values from `_share_weights`, not from the file.
    """
    model_path = directory / "model.onnx"
    try:
        (directory / external_data.SESSION_DATA_NAME).touch()
        onnx.save_model(skeleton, os.fspath(model_path))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot write a temporary copy of the model: {err}") from None
    return os.fspath(model_path)


# ORT's CPU graph optimizers read the weights of these nodes (Conv: the NCHWc layout, fusions) from the
# model's tensor protos, where a weight handed over by `add_initializer` is a reference to an empty file.
_OPTIMIZERS_READ_WEIGHTS_OF = frozenset({"Conv", "ConvTranspose", "FusedConv"})


def _share_weights(arrays: Mapping[str, np.ndarray], options: onnxruntime.SessionOptions,
                   copied: bool = False) -> tuple[object, ...]:
    """Hand ONNX Runtime a large model's weights as arrays it uses in place (shared between sessions over
    equal weights, see `external_data.shared_array`, or the graph's own arrays). Prepacking is off: it
    would give each session a repacked copy of every MatMul weight. Returns what must outlive the session.

    `copied`: as external initializers instead, which ORT resolves before its optimizers run, and copies
    (measured on ORT 1.31: +1x the weights in the process's own memory, where `add_initializer` adds none)."""
    if not arrays:
        return ()
    contiguous = [np.ascontiguousarray(array) for array in arrays.values()]
    values = tuple(onnxruntime.OrtValue.ortvalue_from_numpy(array) for array in contiguous)
    if copied:
        options.add_external_initializers(list(arrays), list(values))
    else:
        for name, value in zip(arrays, values):
            options.add_initializer(name, value)
    options.add_session_config_entry("session.disable_prepacking", "1")
    return (*contiguous, *values)


def set_runtime_log_level(verbose: bool) -> None:
    """Set ONNX Runtime's process-wide log level: everything when `verbose`, else fatal errors only.

    For the CLI. onnxq itself reports providers that failed to load (see `Session.unloaded_providers`),
    so ORT's own load errors would only repeat it.
    """
    onnxruntime.set_default_logger_severity(0 if verbose else 4)
