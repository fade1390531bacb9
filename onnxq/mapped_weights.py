"""Weights a large model leaves in its own data file: read-only memory maps instead of loaded bytes.

`onnxq.io.load_model` does not read the external data of a model over `external_data.threshold()`: each
main-graph initializer of `MAP_FROM_BYTES` or more keeps its external reference (location, offset, length)
and gains a `basepath` entry, the absolute folder of its file. Such a *mapped tensor* is read through a
read-only `np.memmap` of its bytes in that file (`mapped_array`), one mapping per tensor, shared by every
caller while any of them holds the array: ONNX Runtime sessions, graph constants, quantization.

Mapped pages are file pages, not the process's own memory: the kernel reads them on first access and
may drop them at any time. They count in the process's RSS while they are resident in its page tables,
so `release_pages` drops them from there (madvise MADV_DONTNEED: the file's pages stay in the page cache,
the next access maps them again) once a session or a pass is done with them. The mappings are read-only
(PROT_READ, and the arrays are not writeable): nothing can write into the input's file through them.

An array that still lies inside a mapping (a rewrite left the weight alone, or only reshaped it) is
written out as a reference to its bytes in the file (`reference_for`), not copied into the model.
"""

from __future__ import annotations

import mmap
import os
import weakref
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx.helper
import onnx_graphsurgeon as gs

__all__ = ["MAP_FROM_BYTES", "BASEPATH_KEY", "MappedValues", "is_mapped", "mark_mapped", "mapped_array",
           "mapped_file", "reference_for", "release_pages", "copy_mapped", "has_mapped"]

#: External initializers of at least this many bytes stay in their file; smaller ones are loaded
#: (a mapping costs a page of address space and a file descriptor while it is made, not worth it below).
MAP_FROM_BYTES = 64 * 1024
#: The external-data key holding the absolute folder of a mapped tensor's file (a key ONNX defines).
BASEPATH_KEY = "basepath"

# Live mappings by (file, offset, length, dtype, shape); an entry lives as long as an array over it.
_MAPS: weakref.WeakValueDictionary[tuple[str, int, int, str, tuple[int, ...]], np.memmap] = \
    weakref.WeakValueDictionary()


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def is_mapped(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor`'s values are read from a file by `mapped_array` (see the module docstring)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(e.key == BASEPATH_KEY for e in tensor.external_data)


def mappable_dtype(tensor: onnx.TensorProto) -> np.dtype | None:
    """The numpy type a mapping of `tensor` would have, or None for types whose bytes are not one element
    each (strings, 4-bit and 2-bit types, which numpy cannot view in place)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    storage = onnx.helper.tensor_dtype_to_storage_tensor_dtype(tensor.data_type)
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        storage_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(storage))
    except (KeyError, TypeError):
        return None
    return dtype if dtype.itemsize == storage_dtype.itemsize and dtype.itemsize >= 1 and tensor.data_type not in (
        onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1) else None


def _expected_bytes(tensor: onnx.TensorProto, dtype: np.dtype) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize


def mark_mapped(tensor: onnx.TensorProto, folder: Path) -> str | None:
    """Make external `tensor` a mapped tensor whose file is in `folder` (absolute), when its type can be
    viewed in place; returns None, or why its reference cannot be right (the file is too short for it, or
    its length is not what its shape needs), for the caller's error message."""
    dtype = mappable_dtype(tensor)
    if dtype is None:
        return None
    entries = _entries(tensor)
    expected = _expected_bytes(tensor, dtype)
    offset = int(entries.get("offset", "0") or 0)
    length = int(entries.get("length", str(expected)) or expected)
    if length != expected:
        return f"its external data holds {length} bytes, its shape needs {expected}"
    size = (folder / entries["location"]).stat().st_size
    if offset < 0 or offset + length > size:
        return f"its bytes {offset}..{offset + length} lie beyond the end of {entries['location']} ({size} bytes)"
    entry = tensor.external_data.add()
    entry.key, entry.value = BASEPATH_KEY, os.fspath(folder)
    return None


def mapped_file(tensor: onnx.TensorProto) -> Path:
    """The file a mapped tensor's bytes are in."""
    entries = _entries(tensor)
    return Path(entries[BASEPATH_KEY]) / entries["location"]


def _span(tensor: onnx.TensorProto) -> tuple[int, int]:
    entries = _entries(tensor)
    offset = int(entries.get("offset", "0") or 0)
    dtype = mappable_dtype(tensor)
    assert dtype is not None, f"tensor '{tensor.name}' is not mapped"
    return offset, _expected_bytes(tensor, dtype)


def mapped_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A mapped tensor's values, read-only, over a mapping of its bytes in its file (no copy)."""
    dtype = mappable_dtype(tensor)
    assert dtype is not None and is_mapped(tensor), f"tensor '{tensor.name}' is not mapped"
    path, (offset, length) = os.fspath(mapped_file(tensor)), _span(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    key = (path, offset, length, dtype.str, shape)
    mapping = _MAPS.get(key)
    if mapping is None:
        if length == 0:
            return np.zeros(shape, dtype)
        mapping = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        _MAPS[key] = mapping
    view = mapping.view(np.ndarray)  # a plain array over the mapping: it keeps the mapping alive
    view.flags.writeable = False
    return view


def _mapping_of(array: np.ndarray) -> np.memmap | None:
    """The live mapping `array`'s memory lies in, if any."""
    if not isinstance(array, np.ndarray) or array.size == 0:
        return None
    start = array.__array_interface__["data"][0]
    for mapping in list(_MAPS.values()):
        base = mapping.__array_interface__["data"][0]
        if base <= start and start + array.nbytes <= base + mapping.nbytes:
            return mapping
    return None


def reference_for(array: np.ndarray, name: str) -> onnx.TensorProto | None:
    """A mapped tensor named `name` holding `array`'s values, when `array` is a C-contiguous view of bytes of
    a mapped file (a weight no rewrite changed); else None."""
    mapping = _mapping_of(array)
    if mapping is None or not array.flags.c_contiguous or array.dtype.byteorder == ">":
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, ValueError, TypeError):
        return None
    start = array.__array_interface__["data"][0] - mapping.__array_interface__["data"][0]
    path = Path(os.fspath(mapping.filename))
    reference = onnx.TensorProto(name=name, data_type=data_type, dims=array.shape,
                                 data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", path.name), ("offset", str(mapping.offset + start)),
                       ("length", str(array.nbytes)), (BASEPATH_KEY, os.fspath(path.parent))):
        entry = reference.external_data.add()
        entry.key, entry.value = key, value
    return reference


def release_pages(array: np.ndarray | None = None) -> None:
    """Drop the resident pages of the mapping `array` lies in (of every live mapping when None) from this
    process's page tables: its RSS falls, the pages stay in the page cache for the next access."""
    mappings = list(_MAPS.values()) if array is None else [m for m in [_mapping_of(array)] if m is not None]
    for mapping in mappings:
        raw = getattr(mapping, "_mmap", None)
        if isinstance(raw, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            raw.madvise(mmap.MADV_DONTNEED)


def copy_mapped(tensor: onnx.TensorProto, out: BinaryIO, chunk_bytes: int = 16 * 2**20) -> int:
    """Append a mapped tensor's bytes to `out` at its position, read from its file (no mapping: a kernel copy
    where the system has one, else a chunk at a time); returns the bytes written."""
    offset, length = _span(tensor)
    out.flush()
    with open(mapped_file(tensor), "rb") as source:
        done = 0
        if hasattr(os, "copy_file_range"):
            position = out.tell()
            try:
                while done < length:
                    copied = os.copy_file_range(source.fileno(), out.fileno(), length - done,
                                                offset + done, position + done)
                    if copied == 0:
                        break
                    done += copied
            except OSError:  # not supported between these file systems: copy through memory below
                done = 0
            out.seek(position + done)
        source.seek(offset + done)
        while done < length:
            block = source.read(min(chunk_bytes, length - done))
            if not block:
                raise OSError(f"{mapped_file(tensor)} ended before the bytes of tensor '{tensor.name}'")
            out.write(block)
            done += len(block)
    return length


class MappedValues(gs.ir.tensor.LazyValues):
    """A graph constant whose values are a mapped tensor's: loading them gives the read-only mapped array."""

    def load(self) -> np.ndarray:
        return mapped_array(self.tensor)


def has_mapped(model: onnx.ModelProto) -> bool:
    """Whether any main-graph initializer of `model` is a mapped tensor."""
    return any(is_mapped(tensor) for tensor in model.graph.initializer)
