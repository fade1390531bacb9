"""TensorRT engine builds and runs for onnxq's Q/DQ models (optional: `pip install 'onnxq[trt]'`).

Importing this package imports nothing heavy: `tensorrt` and the CUDA bindings are imported by the
functions that need them, and the names below load their submodule on first access::

    from onnxq.runtime.trt import BuildConfig, TrtEngine, build_engine, save_plan

    result = build_engine("model.int8.onnx", BuildConfig(shapes={"input": (8, 3, 224, 224)}))
    save_plan(result.plan, "model.plan")
    with TrtEngine(result.plan) as engine:
        outputs = engine.run({"input": batch})
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "BuildConfig": "build", "BuildResult": "build", "ShapeProfile": "build", "build_engine": "build",
    "layer_precisions": "build", "network_flags": "build", "parse_shapes": "build", "profiles_for": "build",
    "save_plan": "build",
    "TrtEngine": "engine",
    "CudaError": "runtime", "require_cuda_runtime": "runtime", "require_gpu": "runtime",
    "require_tensorrt": "runtime", "summarize_log": "runtime", "tensorrt_version": "runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule behind a public name on first use (PEP 562)."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
