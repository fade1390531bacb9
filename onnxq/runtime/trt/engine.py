"""Run and time a serialized TensorRT engine with the CUDA runtime bindings of cuda-python.

`TrtEngine` deserialises a plan, keeps one device buffer per I/O tensor (found by name, grown when a
larger shape arrives), and runs on one CUDA stream of its own: inputs are copied in, the engine is
enqueued with `execute_async_v3`, outputs are copied back. `time` measures only the enqueued inference
with CUDA events recorded on that stream; the copies happen before and after the timed region.

Documentation followed:
    TensorRT Python API "ICudaEngine" (num_io_tensors, get_tensor_name, get_tensor_mode / TensorIOMode,
    get_tensor_dtype, get_tensor_shape with -1 for dynamic dimensions),
    https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Engine.html
    TensorRT Python API "IExecutionContext" (set_input_shape, get_tensor_shape, set_tensor_address,
    execute_async_v3(stream_handle)), https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
    "Migrating Python Code from TensorRT 8.x to 10.x" (name-based I/O and enqueueV3 replace bindings),
    https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-8x-to-10x-python-api.html
    CUDA Runtime API "API synchronization behavior" (cudaMemcpyAsync from pageable host memory is legal;
    it is staged and may synchronize), https://docs.nvidia.com/cuda/archive/12.2.0/cuda-runtime-api/api-sync-behavior.html
    CUDA Runtime API "Event Management" (cudaEventCreate/Record/Synchronize/ElapsedTime; times in ms),
    https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__EVENT.html
    cuda-python "Overview" (result tuples; host pointers from ndarray.ctypes.data),
    https://nvidia.github.io/cuda-python/cuda-bindings/latest/overview.html
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from onnxq.errors import ConfigError, ModelError
from onnxq.runtime.trt.runtime import (CudaError, cuda_check, native_handle, require_cuda_runtime, require_gpu, require_tensorrt,
                      tensorrt_logger)

__all__ = ["TrtEngine"]

log = logging.getLogger(__name__)

# TensorRT DataType member name -> NumPy type. BF16, FP8 and the 4-bit types have no NumPy equivalent.
_NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8,
                "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


@dataclass
class _IoTensor:
    """One engine input or output and the device buffer bound to it."""

    name: str
    is_input: bool
    dtype: np.dtype
    engine_shape: tuple[int, ...]  # -1 marks a dynamic dimension
    address: int = 0
    capacity: int = 0


def _numpy_dtype(trt: ModuleType, data_type: Any, name: str) -> np.dtype:
    for type_name, numpy_type in _NUMPY_TYPES.items():
        if getattr(trt.DataType, type_name, None) == data_type:
            return np.dtype(numpy_type)
    raise ModelError(f"engine tensor '{name}' has type {getattr(data_type, 'name', data_type)}, "
                     "which has no NumPy equivalent")


class TrtEngine:
    """A deserialised TensorRT engine with its execution context, device buffers and CUDA stream.

    Use it as a context manager (or call `close()`) so that device memory is freed::

        with TrtEngine(result.plan) as engine:
            outputs = engine.run({"input": batch})
            latencies_ms = engine.time({"input": batch})
    """

    def __init__(self, plan: bytes | str | os.PathLike[str]) -> None:
        """Deserialise `plan` (the bytes, or the path of a .plan file) and prepare a context and stream.

        Raises:
            MissingDependencyError: no TensorRT 10+, CUDA bindings or GPU.
            ModelError: the plan cannot be read or deserialised (another TensorRT version or GPU).
            CudaError: a CUDA call failed.
        """
        self._stream: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._tensors: dict[str, _IoTensor] = {}
        self._pending: list[np.ndarray] = []  # host arrays that must outlive the copies in flight
        self._trt = require_tensorrt()
        self._cudart = require_cuda_runtime()
        require_gpu()
        data = plan if isinstance(plan, (bytes, bytearray, memoryview)) else self._read_plan(Path(plan))
        try:
            self._open(data)
        except BaseException:
            self.close()
            raise

    def _open(self, plan: bytes | bytearray | memoryview) -> None:
        self._runtime = self._trt.Runtime(tensorrt_logger(self._trt))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ModelError("TensorRT cannot deserialise the engine plan (built by another TensorRT version, "
                             "or for another GPU?)")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise CudaError("TensorRT cannot create an execution context (out of GPU memory?)")
        self._stream = cuda_check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            is_input = self._engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT
            dtype = _numpy_dtype(self._trt, self._engine.get_tensor_dtype(name), name)
            shape = tuple(int(d) for d in self._engine.get_tensor_shape(name))
            self._tensors[name] = _IoTensor(name, is_input, dtype, shape)

    @staticmethod
    def _read_plan(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as err:
            raise ModelError(f"{path}: cannot read the engine plan ({err.strerror or err})") from None

    @property
    def input_names(self) -> tuple[str, ...]:
        """The engine's input tensor names, in engine order."""
        return tuple(t.name for t in self._tensors.values() if t.is_input)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The engine's output tensor names, in engine order."""
        return tuple(t.name for t in self._tensors.values() if not t.is_input)

    def _reserve(self, tensor: _IoTensor, nbytes: int) -> None:
        """Make `tensor`'s device buffer hold at least `nbytes` and bind it to the context."""
        if nbytes > tensor.capacity or tensor.address == 0:
            if tensor.address:
                cuda_check(self._cudart.cudaFree(tensor.address), "cudaFree")
                tensor.address, tensor.capacity = 0, 0
            tensor.address = int(cuda_check(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            tensor.capacity = max(nbytes, 1)
        self._context.set_tensor_address(tensor.name, tensor.address)

    def _input_array(self, tensor: _IoTensor, value: Any) -> np.ndarray:
        array = np.asarray(value)
        if array.dtype != tensor.dtype:
            if not np.can_cast(array.dtype, tensor.dtype, casting="same_kind"):
                raise ConfigError(f"input '{tensor.name}': {array.dtype} data for a {tensor.dtype} input")
            array = array.astype(tensor.dtype)
        array = np.ascontiguousarray(array)
        if -1 in tensor.engine_shape:
            if not self._context.set_input_shape(tensor.name, array.shape):
                raise ConfigError(f"input '{tensor.name}': shape {array.shape} is outside the engine's "
                                  f"profile for {tensor.engine_shape}")
        elif array.shape != tensor.engine_shape:
            raise ConfigError(f"input '{tensor.name}': shape {array.shape}, the engine needs {tensor.engine_shape}")
        return array

    def _stage_inputs(self, feed: Mapping[str, Any]) -> None:
        """Set input shapes and copy the inputs to the device (asynchronously, on the stream)."""
        missing = [name for name in self.input_names if name not in feed]
        unknown = sorted(set(feed) - set(self.input_names))
        if missing or unknown:
            raise ConfigError(f"feed: missing {missing or 'nothing'}, unknown {unknown or 'nothing'} "
                              f"(the engine's inputs: {', '.join(self.input_names)})")
        for name in self.input_names:
            tensor = self._tensors[name]
            array = self._input_array(tensor, feed[name])
            self._reserve(tensor, array.nbytes)
            if array.nbytes:
                cuda_check(self._cudart.cudaMemcpyAsync(
                    tensor.address, array.ctypes.data, array.nbytes,
                    self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream), "cudaMemcpyAsync")
            self._pending.append(array)

    def _bind_outputs(self) -> dict[str, np.ndarray]:
        """Host arrays for every output at the shapes the current input shapes give, device buffers bound."""
        outputs = {}
        for name in self.output_names:
            tensor = self._tensors[name]
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(f"engine output '{name}' has a data-dependent shape {shape}; TrtEngine "
                                 "cannot size its buffer")
            outputs[name] = np.empty(shape, dtype=tensor.dtype)
            self._reserve(tensor, outputs[name].nbytes)
        return outputs

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(native_handle(self._stream)):
            raise CudaError("TensorRT execute_async_v3 failed (see the TensorRT log with onnxq -vv)")

    def _synchronize(self) -> None:
        cuda_check(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._pending.clear()

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine once on `feed` (input name -> array) and return output name -> array.

        Raises:
            ConfigError: names, dtypes or shapes in `feed` do not fit the engine.
            CudaError: a CUDA call or the execution failed.
        """
        self._check_open()
        self._stage_inputs(feed)
        outputs = self._bind_outputs()
        self._enqueue()
        for name, host in outputs.items():
            if host.nbytes:
                cuda_check(self._cudart.cudaMemcpyAsync(
                    host.ctypes.data, self._tensors[name].address, host.nbytes,
                    self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream), "cudaMemcpyAsync")
        self._synchronize()
        return outputs

    def time(self, feed: Mapping[str, np.ndarray], warmup: int = 10, iterations: int = 100) -> np.ndarray:
        """Per-run latency in milliseconds of `iterations` runs on `feed`, after `warmup` untimed runs.

        Each run is bracketed by two CUDA events recorded on the engine's stream; the inputs are copied
        to the device once, before any timed run, and no output is copied back, so host<->device
        transfers are excluded.

        Raises:
            ConfigError: `warmup` < 0 or `iterations` < 1, or `feed` does not fit (see `run`).
            CudaError: a CUDA call or the execution failed.
        """
        if warmup < 0 or iterations < 1:
            raise ConfigError(f"timing needs warmup >= 0 and iterations >= 1, got {warmup} and {iterations}")
        self._check_open()
        self._stage_inputs(feed)
        self._bind_outputs()
        self._synchronize()
        for _ in range(warmup):
            self._enqueue()
        self._synchronize()
        cudart = self._cudart
        start = cuda_check(cudart.cudaEventCreate(), "cudaEventCreate")
        end = cuda_check(cudart.cudaEventCreate(), "cudaEventCreate")
        try:
            milliseconds = np.empty(iterations, dtype=np.float64)
            for index in range(iterations):
                cuda_check(cudart.cudaEventRecord(start, self._stream), "cudaEventRecord")
                self._enqueue()
                cuda_check(cudart.cudaEventRecord(end, self._stream), "cudaEventRecord")
                cuda_check(cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
                milliseconds[index] = cuda_check(cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime")
        finally:
            for event in (start, end):
                cuda_check(cudart.cudaEventDestroy(event), "cudaEventDestroy")
        return milliseconds

    def _check_open(self) -> None:
        if self._context is None:
            raise ConfigError("the TrtEngine is closed")

    def close(self) -> None:
        """Wait for the stream, free the device buffers and the stream, and release the engine."""
        cudart = getattr(self, "_cudart", None)
        failures: list[str] = []
        calls: list[tuple[str, Any]] = []
        if self._stream is not None:
            calls.append(("cudaStreamSynchronize", lambda: cudart.cudaStreamSynchronize(self._stream)))
        for tensor in self._tensors.values():
            if tensor.address:
                calls.append(("cudaFree", lambda address=tensor.address: cudart.cudaFree(address)))
                tensor.address, tensor.capacity = 0, 0
        if self._stream is not None:
            calls.append(("cudaStreamDestroy", lambda stream=self._stream: cudart.cudaStreamDestroy(stream)))
        for call, action in calls:
            try:
                cuda_check(action(), call)
            except CudaError as err:
                failures.append(str(err))
        self._stream, self._context, self._engine, self._runtime = None, None, None, None
        self._pending.clear()
        if failures:
            log.warning("releasing the TensorRT engine: %s", "; ".join(failures))

    def __enter__(self) -> TrtEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
