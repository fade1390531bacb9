"""Build a TensorRT engine from a Q/DQ ONNX model: strongly typed network, one shape profile, a serialized plan.

The model's Q/DQ nodes carry the precision, so no INT8/FP16 builder flag is ever set: TensorRT 10.x gets a
network created with the STRONGLY_TYPED flag (looked up by name: its bit differs between majors), and
TensorRT 11.x needs nothing, because its networks are always strongly typed and the flag is deprecated
and ignored. The plan comes from `build_serialized_network` on both.

Documentation followed:
    TensorRT Python API "Builder" / NetworkDefinitionCreationFlag (10.x: pass
    `1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)` to create_network; 11.0: STRONGLY_TYPED
    deprecated, strong typing always on), https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
    and https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Builder.html
    "Migrating Python Code from TensorRT 10.x to 11.x" (BuilderFlag.FP16/INT8 removed; build with a
    strongly typed network), https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
    TensorRT Python API "Onnx Parser" (parse_from_file, num_errors, get_error),
    https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-1070/api/python_api/parsers/Onnx/pyOnnx.html ;
    ParserError.desc/node/node_name/node_operator as bound in NVIDIA/TensorRT python/src/parsers/pyOnnx.cpp
    TensorRT Python API "IOptimizationProfile" (set_shape(name, min, opt, max); required when an input
    has a -1 dimension), https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html
    TensorRT C++ API IBuilderConfig (setMemoryPoolLimit(kWORKSPACE), profiling verbosity),
    https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/_static/c-api/classnvinfer1_1_1_i_builder_config.html
    TensorRT "Engine Inspector" (detail depends on ProfilingVerbosity; JSON via get_engine_information),
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/EngineInspector.html
    "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x" (the JSON's "Format/Datatype" is split
    and "Bindings" becomes "I/O Tensors"), https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-IEngineInspector.html
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from onnxq.atomic import write_atomic
from onnxq.errors import ConfigError, ModelError
from onnxq.runtime.trt.runtime import require_gpu, require_tensorrt, summarize_log, tensorrt_logger, version_of

__all__ = [
    "BuildConfig",
    "BuildResult",
    "ShapeProfile",
    "build_engine",
    "layer_precisions",
    "network_flags",
    "parse_shapes",
    "profiles_for",
    "read_model_header",
    "save_plan",
]

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeProfile:
    """The shapes one dynamic input may take in the engine (TensorRT's optimization-profile entry)."""

    name: str
    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class BuildConfig:
    """How to build an engine.

    Attributes:
        shapes: input name -> the shape to build dynamic inputs for (min = opt = max).
        workspace_bytes: the builder's workspace memory-pool limit.
        detailed_profiling: build with detailed profiling verbosity, so that the engine inspector can
            report each layer's types (the plan gets a little larger).
    """

    shapes: Mapping[str, Shape] = field(default_factory=dict)
    workspace_bytes: int = 1 << 30
    detailed_profiling: bool = True

    def __post_init__(self) -> None:
        if self.workspace_bytes < 1:
            raise ConfigError(f"workspace: expected a positive number of bytes, got {self.workspace_bytes}")
        object.__setattr__(self, "shapes", MappingProxyType({k: tuple(v) for k, v in self.shapes.items()}))


@dataclass(frozen=True)
class BuildResult:
    """A built engine.

    Attributes:
        plan: the serialized engine, ready for `save_plan` or `TrtEngine`.
        seconds: wall time of parsing and building.
        log_summary: error and warning counts of TensorRT's build log and its last error.
        layer_precisions: number of engine layers per type ("INT8", "FP16", "FP32", ...), read from the
            engine inspector; empty when the inspector gave no per-layer types.
    """

    plan: bytes
    seconds: float
    log_summary: str
    layer_precisions: Mapping[str, int]


def parse_shapes(text: str) -> dict[str, Shape]:
    """Parse `--shapes` text such as "input:1x3x224x224,mask:1x128" into {name: shape}.

    A name may itself contain ':' (the last one separates the dimensions).

    Raises:
        ConfigError: empty text, a missing name or dimension, a dimension that is not a whole number of
            at least 1, or a name given twice.
    """
    shapes: dict[str, Shape] = {}
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        raise ConfigError("--shapes: expected NAME:DxD..., e.g. input:1x3x224x224; got nothing")
    for entry in entries:
        name, colon, dims_text = entry.rpartition(":")
        name = name.strip()
        if not colon or not name or not dims_text.strip():
            raise ConfigError(f"--shapes: '{entry}' is not NAME:DxD..., e.g. input:1x3x224x224")
        try:
            dims = tuple(int(part) for part in dims_text.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--shapes: '{entry}': dimensions must be whole numbers joined by 'x'") from None
        if any(dim < 1 for dim in dims):
            raise ConfigError(f"--shapes: '{entry}': every dimension must be at least 1")
        if name in shapes:
            raise ConfigError(f"--shapes: '{name}' is given twice")
        shapes[name] = dims
    return shapes


Dim = int | str  # a fixed size, or the label of a dynamic dimension


def _declared_inputs(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...] | None]:
    """Each real graph input's declared shape (None: no shape at all), dynamic dims as their label."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    declared: dict[str, tuple[Dim, ...] | None] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
            declared[value.name] = None
            continue
        dims: list[Dim] = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:  # PP-OCR declares its batch as -1
                dims.append(dim.dim_value)
            else:
                param = dim.dim_param if dim.HasField("dim_param") and dim.dim_param not in ("", "?") else ""
                dims.append(param or f"d{axis}")
        declared[value.name] = tuple(dims)
    return declared


def _check_given(name: str, declared: tuple[Dim, ...] | None, given: Shape) -> None:
    if declared is None:
        return
    if len(given) != len(declared):
        raise ConfigError(f"--shapes {name}: {len(given)} dimensions given, the model's input has {len(declared)} "
                          f"({'x'.join(map(str, declared)) or 'a scalar'})")
    for axis, (dim, size) in enumerate(zip(declared, given)):
        if isinstance(dim, int) and dim != size:
            raise ConfigError(f"--shapes {name}: axis {axis} is {size}, the model fixes it at {dim}")


def _default_shape(name: str, declared: tuple[Dim, ...] | None) -> Shape:
    """Batch 1 for a dynamic axis 0; any other dynamic dimension must come from --shapes."""
    if declared is None:
        raise ConfigError(f"input '{name}' declares no shape; give it with --shapes {name}:DxD...")
    others = [(axis, dim) for axis, dim in enumerate(declared) if isinstance(dim, str) and axis > 0]
    if others:
        listed = ", ".join(f"axis {axis} '{dim}'" for axis, dim in others)
        template = "x".join("1" if axis == 0 and isinstance(dim, str) else str(dim)
                            for axis, dim in enumerate(declared))
        raise ConfigError(f"input '{name}' has dynamic dimensions besides the batch ({listed}); "
                          f"give its shape with --shapes {name}:{template}")
    return tuple(1 if isinstance(dim, str) else dim for dim in declared)


def profiles_for(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> tuple[ShapeProfile, ...]:
    """The single optimization profile for `model`: one entry per input with a dynamic dimension.

    Each entry has min = opt = max = the shape from `shapes`, or without one batch 1 for a dynamic
    axis 0. Inputs whose shape is fully fixed need no entry (a given shape must then match it).

    Raises:
        ConfigError: `shapes` names something that is not an input, has the wrong rank or contradicts a
            fixed dimension; or an input has dynamic dimensions besides the batch and no given shape.
    """
    declared_inputs = _declared_inputs(model)
    unknown = sorted(set(shapes) - set(declared_inputs))
    if unknown:
        raise ConfigError(f"--shapes: {', '.join(unknown)} is not an input of the model "
                          f"(inputs: {', '.join(declared_inputs) or 'none'})")
    profiles = []
    for name, declared in declared_inputs.items():
        given = shapes.get(name)
        if given is not None:
            _check_given(name, declared, tuple(given))
        if declared is not None and all(isinstance(dim, int) for dim in declared):
            continue
        shape = tuple(given) if given is not None else _default_shape(name, declared)
        profiles.append(ShapeProfile(name, shape, shape, shape))
    return tuple(profiles)


def network_flags(trt: ModuleType) -> int:
    """The `create_network` flags for a strongly typed network on this TensorRT.

    10.x: the STRONGLY_TYPED bit, by its symbolic name (its value changed between majors). 11.x: 0,
    since networks are always strongly typed and the flag is deprecated and ignored.
    """
    major, _ = version_of(trt)
    if major >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


_TYPE_WORD = re.compile(r"\b(u?int(?:4|8|32|64)|fp(?:4|8|16|32)|bf16|bfloat16|half|float|bool)\b", re.IGNORECASE)
_TYPE_NAMES = {"half": "FP16", "float": "FP32", "bfloat16": "BF16"}
# Lower rank = more reduced compute type; a layer counts as the most reduced type among its inputs.
_TYPE_RANK = {"INT4": 0, "FP4": 0, "INT8": 1, "UINT8": 1, "FP8": 1, "FP16": 2, "BF16": 2, "FP32": 3}


def _tensor_type(tensor: Any) -> str | None:
    if not isinstance(tensor, Mapping):
        return None
    text = tensor.get("DataType") or tensor.get("Format/Datatype") or tensor.get("Format") or ""
    match = _TYPE_WORD.search(str(text))
    if match is None:
        return None
    word = match[1].lower()
    return _TYPE_NAMES.get(word, word.upper())


def _layer_type(layer: Mapping[str, Any]) -> str | None:
    for side in ("Inputs", "Outputs"):  # a layer without inputs (a constant) is typed by its outputs
        types = [t for t in map(_tensor_type, layer.get(side) or ()) if t is not None]
        if types:
            return min(types, key=lambda name: _TYPE_RANK.get(name, len(_TYPE_RANK)))
    return None


def layer_precisions(engine_information: str) -> dict[str, int]:
    """Count the layers of an engine-inspector JSON dump by type ("INT8", "FP16", "FP32", ...).

    Reads the 10.x field "Format/Datatype" and the 11.x fields "DataType"/"Format". Returns {} when the
    dump has no per-layer detail (an engine built without detailed profiling lists names only).
    """
    try:
        information = json.loads(engine_information)
    except (TypeError, ValueError):
        return {}
    layers = information.get("Layers", ()) if isinstance(information, Mapping) else ()
    counts: dict[str, int] = {}
    for layer in layers:
        layer_type = _layer_type(layer) if isinstance(layer, Mapping) else None
        if layer_type is not None:
            counts[layer_type] = counts.get(layer_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (_TYPE_RANK.get(item[0], len(_TYPE_RANK)), item[0])))


def read_model_header(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model without its external weights (enough for `profiles_for`), or a one-line ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{path}: not a readable ONNX model ({first_line})") from None


def _call_text(error: Any, method: str) -> str:
    """`error.method()` as one stripped line, or "" when this TensorRT's ParserError lacks the method."""
    value = getattr(error, method, None)
    text = str(value()).strip() if callable(value) else ""
    return text.splitlines()[0] if text else ""


def _describe_parser_errors(path: Path, errors: Sequence[Any]) -> str:
    """One line naming the first node TensorRT's ONNX parser rejected (ParserError objects)."""
    if not errors:
        return f"{path}: TensorRT's ONNX parser rejected the model without saying why"
    first = errors[0]
    node_name, operator, index = (_call_text(first, m) for m in ("node_name", "node_operator", "node"))
    if node_name:
        where = f"node '{node_name}'"
    elif index.lstrip("-").isdigit() and int(index) >= 0:
        where = f"node #{index}"
    else:
        where = "the model"
    where += f" ({operator})" if operator else ""
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: TensorRT cannot parse {where}: {_call_text(first, 'desc') or 'no description'}{more}"


def _builder_config(trt: ModuleType, builder: Any, config: BuildConfig, profiles: Sequence[ShapeProfile]) -> Any:
    """Workspace limit, profiling verbosity and the shape profile; deliberately no precision flags."""
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    if config.detailed_profiling:
        builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if profiles:
        profile = builder.create_optimization_profile()
        for entry in profiles:
            profile.set_shape(entry.name, entry.min, entry.opt, entry.max)
        builder_config.add_optimization_profile(profile)
    return builder_config


def _inspect_precisions(trt: ModuleType, logger: Any, plan: bytes) -> dict[str, int]:
    """Deserialize `plan` and count its layers by type; {} if inspection fails (the plan is still good)."""
    try:
        runtime = trt.Runtime(logger)  # kept alive while its engine is in use
        engine = runtime.deserialize_cuda_engine(plan)
        inspector = engine.create_engine_inspector()
        information = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception as err:  # noqa: BLE001 - the inspection is informative only
        log.warning("could not inspect the built engine: %s", err)
        return {}
    return layer_precisions(str(information))


def build_engine(model_path: str | os.PathLike[str], config: BuildConfig = BuildConfig()) -> BuildResult:
    """Build a TensorRT engine from the ONNX file at `model_path`.

    The file is parsed with `parse_from_file`, so external weights resolve relative to it. The network
    is strongly typed; the precision comes from the model's Q/DQ nodes, never from builder flags.

    Raises:
        MissingDependencyError: no TensorRT 10+, CUDA bindings or GPU.
        ConfigError: a shape problem (see `profiles_for`).
        ModelError: the file is unreadable, the parser rejects a node, or the build fails (the message
            carries the summarised TensorRT log).
    """
    trt = require_tensorrt()
    require_gpu()
    path = Path(model_path)
    profiles = profiles_for(read_model_header(path), config.shapes)
    logger = tensorrt_logger(trt)
    logger.clear()
    started = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(path)):
        raise ModelError(_describe_parser_errors(path, [parser.get_error(i) for i in range(parser.num_errors)]))
    plan = builder.build_serialized_network(network, _builder_config(trt, builder, config, profiles))
    seconds = time.perf_counter() - started
    summary = summarize_log(logger.entries)
    if plan is None:
        raise ModelError(f"{path}: TensorRT could not build an engine ({summary})")
    plan_bytes = bytes(plan)
    precisions = _inspect_precisions(trt, logger, plan_bytes) if config.detailed_profiling else {}
    return BuildResult(plan_bytes, seconds, summary, MappingProxyType(precisions))


def save_plan(plan: bytes, path: str | os.PathLike[str]) -> Path:
    """Write `plan` to `path` atomically (a temporary file beside it, then renamed into place).

    Raises:
        ModelError: the folder does not exist or the file cannot be written.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ModelError(f"{path}: the folder {path.parent} does not exist")
    return write_atomic(path, plan, "the engine", ModelError)