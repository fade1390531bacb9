"""Whether TensorRT, the CUDA Python bindings and a GPU are available, imported only when first needed.

Nothing here imports `tensorrt` or the CUDA bindings at module import time: `require_tensorrt` and
`require_cuda_runtime` do, and turn a missing package into a one-line `MissingDependencyError` that
says which package is missing and how to install it (the CLI maps it to exit code 2).

Also here: the TensorRT logger onnxq passes to the builder and runtime (it keeps warnings and errors
for the build summary and forwards every message to Python logging), `summarize_log`, and
`cuda_check`, which unpacks the `(cudaError_t, value...)` tuples the CUDA bindings return.

Documentation followed:
    TensorRT Python API, "Logger" (custom ILogger subclasses must call `trt.ILogger.__init__`; one logger
    for the builder and runtime), https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Logger.html
    cuda-python "Overview" (every binding returns a tuple whose first item is the status, checked through
    `.value`; host pointers are passed as `ndarray.ctypes.data`), https://nvidia.github.io/cuda-python/cuda-bindings/latest/overview.html
    cuda-bindings 13.0.0 release notes (`int(cuda_obj)` is deprecated in favour of
    `cuda.bindings.utils.get_cuda_native_handle`), NVIDIA/cuda-python cuda_bindings/docs/source/release/13.0.0-notes.rst
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from onnxq.errors import MissingDependencyError, OnnxqError, first_line

__all__ = [
    "CudaError",
    "LogEntry",
    "MIN_TENSORRT",
    "cuda_check",
    "native_handle",
    "require_cuda_runtime",
    "require_gpu",
    "require_tensorrt",
    "summarize_log",
    "tensorrt_logger",
    "tensorrt_version",
    "version_of",
]

log = logging.getLogger(__name__)

MIN_TENSORRT = (10, 0)
TENSORRT_INSTALL = ("pip install 'onnxq[trt]' (NVIDIA's wheels: pip install tensorrt "
                    "--extra-index-url https://pypi.nvidia.com)")
CUDA_BINDINGS_INSTALL = "pip install 'onnxq[trt]' (or pip install cuda-python)"
# Newer cuda-python releases put the runtime API in `cuda.bindings.runtime`; older ones in `cuda.cudart`.
_CUDA_RUNTIME_MODULES = ("cuda.bindings.runtime", "cuda.cudart")

LogEntry = tuple[str, str]
"""One TensorRT log message kept for the summary: (severity name such as "ERROR", message)."""

_ERROR_SEVERITIES = ("INTERNAL_ERROR", "ERROR")
_KEPT_SEVERITIES = (*_ERROR_SEVERITIES, "WARNING")


class CudaError(OnnxqError):
    """A CUDA runtime call failed (out of memory, a launch failure, a lost device)."""


def version_of(trt: ModuleType) -> tuple[int, int]:
    """The (major, minor) version of an imported `tensorrt` module, from its `__version__`.

    Raises:
        MissingDependencyError: the module carries no readable version.
    """
    match = re.match(r"\s*(\d+)\.(\d+)", str(getattr(trt, "__version__", "")))
    if match is None:
        raise MissingDependencyError(f"TensorRT reports no readable version ({getattr(trt, '__version__', None)!r}); "
                                     f"reinstall it: {TENSORRT_INSTALL}")
    return int(match[1]), int(match[2])


def require_tensorrt() -> ModuleType:
    """Import and return the `tensorrt` module, checking that it is 10.0 or newer.

    Raises:
        MissingDependencyError: TensorRT is not installed, cannot be loaded, or is older than 10.0.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except ModuleNotFoundError as err:
        if err.name not in (None, "tensorrt"):  # tensorrt is there but one of its own imports is not
            raise MissingDependencyError(f"TensorRT is installed but cannot be loaded ({first_line(err)}): "
                                         f"reinstall it: {TENSORRT_INSTALL}") from None
        raise MissingDependencyError(f"TensorRT is not installed: {TENSORRT_INSTALL}") from None
    except (ImportError, OSError) as err:  # e.g. libnvinfer.so or the CUDA libraries not found
        raise MissingDependencyError(f"TensorRT is installed but cannot be loaded ({first_line(err)}): "
                                     f"reinstall it: {TENSORRT_INSTALL}") from None
    version = version_of(trt)
    if version < MIN_TENSORRT:
        raise MissingDependencyError(f"TensorRT {version[0]}.{version[1]} is too old: onnxq needs TensorRT "
                                     f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer: {TENSORRT_INSTALL}")
    return trt


def tensorrt_version() -> tuple[int, int]:
    """The (major, minor) version of the installed TensorRT.

    Raises:
        MissingDependencyError: as `require_tensorrt`.
    """
    return version_of(require_tensorrt())


def require_cuda_runtime() -> ModuleType:
    """Import and return the CUDA runtime bindings of cuda-python (`cuda.bindings.runtime`, else `cuda.cudart`).

    Raises:
        MissingDependencyError: neither module can be imported.
    """
    failures: list[str] = []
    for name in _CUDA_RUNTIME_MODULES:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        except (ImportError, OSError) as err:
            failures.append(f"{name}: {first_line(err)}")
    if failures:
        raise MissingDependencyError(f"the CUDA Python bindings cannot be loaded ({'; '.join(failures)}): "
                                     f"{CUDA_BINDINGS_INSTALL}")
    raise MissingDependencyError(f"the CUDA Python bindings are not installed: {CUDA_BINDINGS_INSTALL}")


def _status_name(status: Any) -> str:
    return str(getattr(status, "name", status))


def _status_code(status: Any) -> int:
    return int(getattr(status, "value", status))


def cuda_check(result: Any, call: str) -> Any:
    """Unpack a CUDA bindings result `(status, *values)`, raising CudaError unless status is success (0).

    Returns:
        None for a call that returns only a status, the value for one value, else the tuple of values.
    """
    status, *values = result if isinstance(result, tuple) else (result,)
    if _status_code(status) != 0:
        raise CudaError(f"{call} failed: {_status_name(status)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def native_handle(cuda_object: Any) -> int:
    """The address behind a CUDA bindings handle (a `cudaStream_t`, say), as TensorRT's Python API wants it."""
    if isinstance(cuda_object, int):
        return cuda_object
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-python 13.0 and newer
    except ImportError:
        return int(cuda_object)
    return int(get_cuda_native_handle(cuda_object))


def require_gpu() -> None:
    """Check that the CUDA runtime sees at least one GPU.

    Raises:
        MissingDependencyError: the CUDA bindings are missing, or no device is visible (no driver, a
            driver too old for the bindings, or CUDA_VISIBLE_DEVICES hiding every GPU).
    """
    cudart = require_cuda_runtime()
    hint = "check the NVIDIA driver and CUDA_VISIBLE_DEVICES"
    try:
        status, count = cudart.cudaGetDeviceCount()
    except (RuntimeError, OSError) as err:  # the bindings could not load the driver library
        raise MissingDependencyError(f"no CUDA GPU visible: {first_line(err)} ({hint})") from None
    if _status_code(status) != 0:
        raise MissingDependencyError(f"no CUDA GPU visible: the CUDA runtime reports {_status_name(status)} ({hint})")
    if int(count) < 1:
        raise MissingDependencyError(f"no CUDA GPU visible: the CUDA runtime finds 0 devices ({hint})")


def summarize_log(entries: Sequence[LogEntry]) -> str:
    """One line for a TensorRT log: how many errors and warnings, and the last error's first line.

    Args:
        entries: (severity name, message) pairs, oldest first; INTERNAL_ERROR counts as an error.
    """
    errors = [message for severity, message in entries if severity in _ERROR_SEVERITIES]
    warnings = sum(severity == "WARNING" for severity, _ in entries)
    if not errors and not warnings:
        return "no errors or warnings"
    counts = (f"{len(errors)} error{'' if len(errors) == 1 else 's'}, "
              f"{warnings} warning{'' if warnings == 1 else 's'}")
    if not errors:
        return counts
    last = errors[-1].strip().splitlines()[0] if errors[-1].strip() else "(empty message)"
    return f"{counts}; last error: {last}"


_LOGGER_CACHE: dict[ModuleType, Any] = {}  # keyed by the tensorrt module itself (one in practice)
_PYTHON_LEVELS = {"INTERNAL_ERROR": logging.DEBUG, "ERROR": logging.DEBUG, "WARNING": logging.DEBUG,
                  "INFO": logging.DEBUG, "VERBOSE": logging.DEBUG - 1}


def tensorrt_logger(trt: ModuleType) -> Any:
    """The process-wide `trt.ILogger` onnxq gives TensorRT, created on first use.

    TensorRT treats the logger as a singleton, so the builder and every runtime share this one. It keeps
    warnings and errors in `entries` (call `clear()` before a build) and forwards every message to the
    `onnxq.runtime.trt.runtime` Python logger at debug level (`onnxq -vv` shows them); it never prints.
    """
    cached = _LOGGER_CACHE.get(trt)
    if cached is not None:
        return cached

    class RecordingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        """Keeps (severity, message) for warnings and errors; forwards all messages to logging."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.entries: list[LogEntry] = []

        def log(self, severity: Any, msg: str) -> None:
            name = str(getattr(severity, "name", severity)).rsplit(".", 1)[-1]
            if name in _KEPT_SEVERITIES:
                self.entries.append((name, msg))
            log.log(_PYTHON_LEVELS.get(name, logging.DEBUG), "TensorRT %s: %s", name, msg)

        def clear(self) -> None:
            self.entries = []

    logger = RecordingLogger()
    _LOGGER_CACHE[trt] = logger
    return logger
