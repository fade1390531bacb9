"""The targets onnxq writes Q/DQ models for, and the registry `--target` chooses from.

    from onnxq.targets import TRT, ORT_CPU, get_target, register_target

A new target is a `QuantTarget` subclass in a module of its own, made known with `register_target`
(then `onnxq quantize --target NAME` and `QuantConfig(target="NAME")` find it).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import onnx_graphsurgeon as gs

from onnxq.errors import ConfigError
from onnxq.options import Selection
from onnxq.plan.core import QuantPlan
from onnxq.targets.base import QuantTarget
from onnxq.targets.ort_cpu import OrtCpu
from onnxq.targets.trt import TensorRT

__all__ = ["QuantTarget", "TensorRT", "OrtCpu", "TRT", "ORT_CPU", "register_target", "get_target", "targets",
           "plan_quantization"]

_REGISTRY: dict[str, QuantTarget] = {}


def register_target(target: QuantTarget) -> QuantTarget:
    """Make `target` available by its name (a name already taken is refused); returns it."""
    if not isinstance(target, QuantTarget):
        raise ConfigError(f"register_target: {target!r} is not a QuantTarget")
    if target.name in _REGISTRY and _REGISTRY[target.name] != target:
        raise ConfigError(f"a target named '{target.name}' is already registered")
    _REGISTRY[target.name] = target
    return target


def targets() -> Mapping[str, QuantTarget]:
    """The registered targets by name, in registration order."""
    return MappingProxyType(dict(_REGISTRY))


def get_target(target: QuantTarget | str | Any) -> QuantTarget:
    """The registered target named `target` (a target object is returned as is)."""
    if isinstance(target, QuantTarget):
        return target
    name = getattr(target, "value", target)  # the deprecated onnxq.config.Target enum
    found = _REGISTRY.get(str(name).lower())
    if found is None:
        raise ConfigError(f"--target: '{target}' is not one of {', '.join(_REGISTRY)}")
    return found


def plan_quantization(graph: gs.Graph, selection: Selection = Selection(),
                      target: QuantTarget | str = "trt") -> QuantPlan:
    """`get_target(target).plan(graph, selection)`: the plan of `target` for `graph`."""
    return get_target(target).plan(graph, selection)


TRT = register_target(TensorRT())
ORT_CPU = register_target(OrtCpu())
