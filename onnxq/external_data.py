"""Models protobuf cannot serialize: every tensor of a model in one list, its size, and how to write it
with its weights in a side file, one tensor at a time, without copying or changing the model in memory.

Protobuf refuses to serialize a message of 2 GiB or more, so a model above `threshold()` bytes of tensors
never goes through `SerializeToString`: ONNX Runtime opens it from a file, the checker and shape
inference see a skeleton (the model with its large tensors turned into external references, no data),
and saving writes `<name>.data` beside the model.

The threshold is `threshold()`: `LARGE_MODEL_BYTES` when set (tests lower it), else the environment
variable `ONNXQ_LARGE_MODEL_BYTES` (bytes), else 1.9 GiB; a small model then goes down the same path.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

import onnxq.mapped_weights as mapped_weights
from onnxq.errors import ConfigError

__all__ = [
    "LARGE_MODEL_BYTES",
    "MIN_EXTERNAL_TENSOR_BYTES",
    "all_tensors",
    "estimated_size_bytes",
    "is_large",
    "threshold",
    "shared_arrays",
    "skeleton",
    "write_with_external_data",
]

_ENV = "ONNXQ_LARGE_MODEL_BYTES"
# Protobuf's hard limit is 2 GiB; stay clear of it (the estimate counts tensors only).
_DEFAULT_BYTES = int(1.9 * 1024**3)

#: Models whose tensors take more bytes than this take the file-based path; None: the environment
#: variable ONNXQ_LARGE_MODEL_BYTES if set, else 1.9 GiB. Tests set it to send small models that way.
LARGE_MODEL_BYTES: int | None = None


def threshold() -> int:
    """The size in bytes above which a model takes the file-based path (see `LARGE_MODEL_BYTES`)."""
    if LARGE_MODEL_BYTES is not None:
        return LARGE_MODEL_BYTES
    value = os.environ.get(_ENV, "").strip()
    if not value:
        return _DEFAULT_BYTES
    try:
        return max(0, int(value))
    except ValueError:
        raise ConfigError(f"{_ENV}={value!r}: expected a whole number of bytes") from None


#: The side file a session's skeleton refers to (ONNX Runtime gets the values in memory instead).
SESSION_DATA_NAME = "model.onnx.data"
#: In a written model, tensors at least this large go to the external data file.
MIN_EXTERNAL_TENSOR_BYTES = 1024
# Tensors of at least 1 MiB start at a multiple of 64 KiB in the data file, so a runtime can map them
# (the allocation granularity of mmap on Windows, a multiple of the page size elsewhere).
_ALIGN_FROM_BYTES = 1024 * 1024
_ALIGNMENT = 64 * 1024


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in `graph`: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from all_tensors(subgraph)


def tensor_size_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of `tensor`'s values, without copying them (a mapped tensor's too: see
    `onnxq.mapped_weights`; 0 for other data stored elsewhere)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL and not mapped_weights.is_mapped(tensor):
        return 0
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(item) for item in tensor.string_data)
    element_count = int(np.prod(tensor.dims, dtype=np.int64))
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except KeyError:  # UNDEFINED or a type numpy cannot hold: too rare to matter for an estimate
        itemsize = 1
    return element_count * itemsize


def estimated_size_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of `model`, estimated from its tensors without serializing it."""
    return sum(tensor_size_bytes(tensor) for tensor in all_tensors(model.graph))


def is_large(model: onnx.ModelProto) -> bool:
    """Whether `model` must take the file-based path (its tensors exceed `LARGE_MODEL_BYTES`)."""
    return estimated_size_bytes(model) > threshold()


def moves_out(tensor: onnx.TensorProto) -> bool:
    """Whether a skeleton refers to `tensor`'s values elsewhere instead of holding them (a mapped tensor
    always; an in-memory one from `MIN_EXTERNAL_TENSOR_BYTES`)."""
    if mapped_weights.is_mapped(tensor):
        return True
    return (tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.data_type != onnx.TensorProto.STRING
            and tensor_size_bytes(tensor) >= MIN_EXTERNAL_TENSOR_BYTES)


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes | np.ndarray:
    """The values of `tensor` as little-endian raw bytes (one copy of this tensor only; a mapped tensor's
    as a byte view of its mapping, no copy)."""
    if mapped_weights.is_mapped(tensor):
        return mapped_weights.mapped_array(tensor).reshape(-1).view(np.uint8)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    # Typed fields (float_data, int32_data, ...): from_array packs them as raw_data would hold them.
    return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor)).raw_data


def tensor_with_wrong_size(model: onnx.ModelProto) -> str | None:
    """The name of the first main-graph initializer `skeleton` moves out whose data does not fill its shape
    (what the checker cannot see on a skeleton), or None."""
    for tensor in model.graph.initializer:
        if not moves_out(tensor) or mapped_weights.is_mapped(tensor):  # mapped: checked when loaded
            continue
        try:
            actual = len(_tensor_bytes(tensor))
        except ValueError:  # typed fields that do not fit the shape
            return tensor.name
        if actual != tensor_size_bytes(tensor):
            return tensor.name
    return None


def _external_reference(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    reference = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, doc_string=tensor.doc_string,
                                 data_location=onnx.TensorProto.EXTERNAL)
    reference.dims.extend(tensor.dims)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = reference.external_data.add()
        entry.key, entry.value = key, value
    return reference


def _copy_fields(source: object, target: object, skip: str) -> None:
    """Copy every set field of protobuf message `source` into `target`, except the field `skip`."""
    for descriptor, value in source.ListFields():  # type: ignore[attr-defined]
        if descriptor.name == skip:
            continue
        if descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _skeleton_graph(graph: onnx.GraphProto, location: str, data: BinaryIO | None, offset: list[int]) -> onnx.GraphProto:
    """`graph` with its large initializers as references into `location` (their data appended to `data`)."""
    out = onnx.GraphProto()
    _copy_fields(graph, out, skip="initializer")
    for tensor in graph.initializer:
        if not moves_out(tensor):
            out.initializer.add().CopyFrom(tensor)
            continue
        length = tensor_size_bytes(tensor)
        if length >= _ALIGN_FROM_BYTES:
            offset[0] += -offset[0] % _ALIGNMENT
        if data is not None:
            data.seek(offset[0])
            if mapped_weights.is_mapped(tensor):  # straight from its file: no copy in memory, no mapping
                length = mapped_weights.copy_mapped(tensor, data)
            else:
                values = _tensor_bytes(tensor)
                data.write(values)
                length = len(values)
                del values
        out.initializer.append(_external_reference(tensor, location, offset[0], length))
        offset[0] += length
    return out


def skeleton(model: onnx.ModelProto, location: str = "skeleton.data", data: BinaryIO | None = None) -> onnx.ModelProto:
    """A copy of `model` whose main-graph initializers of `MIN_EXTERNAL_TENSOR_BYTES` or more are external
    references into `location`, with their dims and types but no data (written to `data` when given).

    Without `data`, the skeleton is for shape inference and the checker: both need only the dims of
    large tensors. Tensors inside nodes (Constant values, subgraphs) stay in place.
    """
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    out.graph.CopyFrom(_skeleton_graph(model.graph, location, data, [0]))
    return out


def write_with_external_data(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Write `model` to `path` and its large tensors to `data_name` in the same folder, one tensor at a
    time: memory grows by the largest tensor, not by the model, and `model` is left as it was.

    Raises:
        OSError: either file cannot be written.
        ValueError: the model without its large tensors is still too large for protobuf.
    """
    with open(path.parent / data_name, "wb") as data:
        light = skeleton(model, data_name, data)
    onnx.save_model(light, os.fspath(path))


# Arrays handed to ONNX Runtime sessions in place of a large model's weights, by content digest: every
# session over the same weights (calibration's two readers, a step's float and quantized models) shares
# one array instead of holding its own copy. An entry lives as long as a session holds its array.
_SHARED_ARRAYS: weakref.WeakValueDictionary[bytes, np.ndarray] = weakref.WeakValueDictionary()


def shared_array(tensor: onnx.TensorProto) -> np.ndarray:
    """`tensor`'s values as a read-only array, shared between calls for equal contents (name, type, shape
    and bytes); a mapped tensor's mapped array (shared through its mapping)."""
    if mapped_weights.is_mapped(tensor):
        return mapped_weights.mapped_array(tensor)
    values = _tensor_bytes(tensor)
    key = hashlib.blake2b(values, digest_size=20)
    key.update(f"{tensor.name}|{tensor.data_type}|{list(tensor.dims)}".encode())
    array = _SHARED_ARRAYS.get(key.digest())
    if array is None:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        array = np.frombuffer(values, dtype=dtype).reshape(tuple(tensor.dims))  # no copy of `values`
        _SHARED_ARRAYS[key.digest()] = array
    return array


def shared_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The main graph's initializers that `skeleton` moves out, as `shared_array`s."""
    return {tensor.name: shared_array(tensor) for tensor in model.graph.initializer if moves_out(tensor)}
