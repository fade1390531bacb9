"""Calibration data in `.npz`/`.npy` files: headers checked against the model before any inference, arrays
read without unpickling (`.npy` memory-mapped), and feeds re-cut into batches along each input's own
sample axis (axis 0, or axis 1 of a recurrent state [layers, N, hidden]); a rank-0 input is passed whole
with every batch.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from onnxq.errors import CalibrationError, ConfigError, first_line
from onnxq.data.signature import Feed, InputSpec, ModelSignature, SignedSource, window_text

__all__ = ["ARRAY_SUFFIXES", "ArrayFile", "ArrayFilesSource", "check_arrays", "inspect_array_file", "rebatch"]

ARRAY_SUFFIXES = (".npz", ".npy")
ArrayHeaders = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def _check_array(origin: str, spec: InputSpec, shape: tuple[int, ...], dtype: np.dtype) -> None:
    where = f"{origin}: input '{spec.name}'"
    if dtype.hasobject:
        raise CalibrationError(f"{where} holds Python objects (dtype {dtype}); onnxq never unpickles data. "
                               f"Save a numeric {spec.dtype.name} array instead")
    if dtype != spec.dtype:
        raise CalibrationError(f"{where} has dtype {dtype.name if dtype.isnative else dtype.str}; the model "
                               f"expects {spec.dtype.name}. Hint: convert with .astype(np.{spec.dtype.name})")
    if len(shape) != len(spec.shape):
        hint = " Hint: add the sample axis with x[np.newaxis]" if len(shape) + 1 == len(spec.shape) else ""
        raise CalibrationError(f"{where} has shape {tuple(shape)} (rank {len(shape)}); the model expects "
                               f"{spec.shape_text()} (rank {len(spec.shape)}).{hint}".rstrip("."))
    for axis in range(len(shape)):
        if axis != spec.sample_axis and spec.shape[axis] is not None and shape[axis] != spec.shape[axis]:
            raise CalibrationError(f"{where} has shape {tuple(shape)}; the model expects {spec.shape_text()}")


def check_arrays(origin: str, arrays: ArrayHeaders, signature: ModelSignature) -> int | None:
    """Check one file's or feed's arrays (name -> shape and dtype) against the model; return its sample count
    (None: no input has a sample axis).

    Raises:
        CalibrationError: an array is no input, an input has no array, a dtype or shape does not fit, or
            the inputs disagree on the number of samples or hold none.
    """
    specs = signature.inputs
    for name in arrays.keys() - {spec.name for spec in specs}:
        expected = ", ".join(spec.describe() for spec in specs)
        raise CalibrationError(f"{origin}: array '{name}' is not a model input; the model's inputs are {expected}")
    for spec in specs:
        if spec.name not in arrays:
            found = ", ".join(f"'{name}'" for name in arrays) or "nothing"
            raise CalibrationError(f"{origin}: no array for input {spec.describe()}; found {found}")
        shape, dtype = arrays[spec.name]
        _check_array(origin, spec, shape, dtype)
    counts = {spec.name: (arrays[spec.name][0][spec.sample_axis], spec.sample_axis) for spec in specs if spec.batched}
    if not counts:
        return None
    if len({count for count, _ in counts.values()}) > 1:
        listing = ", ".join(f"'{name}' has {count}" + (f" (axis {axis})" if axis else "")
                            for name, (count, axis) in counts.items())
        raise CalibrationError(f"{origin}: the inputs disagree on the number of samples: {listing}")
    name, (count, axis) = next(iter(counts.items()))
    if count == 0:
        raise CalibrationError(f"{origin}: input '{name}' holds no samples (axis {axis} has size 0)")
    return count


def _read_npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    version = np.lib.format.read_magic(stream)
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    shape, _fortran_order, dtype = readers[version](stream)
    return tuple(shape), dtype


def _npy_headers(path: Path, label: str, signature: ModelSignature) -> ArrayHeaders:
    specs = signature.inputs
    if len(specs) != 1:
        inputs = ", ".join(spec.describe() for spec in specs) or "none"
        raise CalibrationError(f"{label}: a .npy file holds one array, but the model has {len(specs)} inputs "
                               f"({inputs}); use an .npz keyed by input name")
    try:
        with open(path, "rb") as stream:
            return {specs[0].name: _read_npy_header(stream)}
    except (OSError, ValueError, EOFError) as err:
        raise CalibrationError(f"{label}: not a readable .npy file: {first_line(err)}") from err


def _npz_headers(path: Path, label: str) -> ArrayHeaders:
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as stream:
                    headers[member[:-len(".npy")] if member.endswith(".npy") else member] = _read_npy_header(stream)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CalibrationError(f"{label}: not a readable .npz file: {first_line(err)}") from err
    return headers


@dataclass(frozen=True)
class ArrayFile:
    path: Path
    label: str
    samples: int | None


def inspect_array_file(path: Path, label: str, signature: ModelSignature) -> ArrayFile:
    is_npz = path.suffix.lower() == ".npz"
    headers = _npz_headers(path, label) if is_npz else _npy_headers(path, label, signature)
    return ArrayFile(path, label, check_arrays(label, headers, signature))


def load_array_file(file: ArrayFile, signature: ModelSignature) -> Feed:
    """Load one file: `.npz` members are read whole, `.npy` is memory-mapped. Never unpickles."""
    try:
        if file.path.suffix.lower() == ".npz":
            with np.load(file.path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        else:
            arrays = {signature.inputs[0].name: np.load(file.path, mmap_mode="r", allow_pickle=False)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CalibrationError(f"{file.label}: cannot read the arrays: {first_line(err)}") from err
    check_arrays(file.label, {name: (a.shape, a.dtype) for name, a in arrays.items()}, signature)
    return arrays


def _same_scalars(label: str, feed: Feed, signature: ModelSignature, previous: Feed | None) -> Feed:
    current = {spec.name: np.array(feed[spec.name]) for spec in signature.inputs if not spec.batched}
    for name, earlier in (previous or {}).items():
        if not np.array_equal(current[name], earlier, equal_nan=earlier.dtype.kind in "fc"):
            raise CalibrationError(f"{label}: rank-0 input '{name}' is {current[name].item()!r} but earlier data "
                                   f"gave {earlier.item()!r}; a rank-0 input must hold the same value everywhere")
    return current


def rebatch(feeds: Iterable[tuple[str, Feed]], signature: ModelSignature, batch_size: int) -> Iterator[Feed]:
    """Split and concatenate checked, labelled feeds along their sample axes into batches of `batch_size`
    samples; rank-0 inputs, the same in every feed, go with every batch."""
    batched_names = list(signature.sample_axes)
    scalars: Feed | None = None
    pending: list[Feed] = []
    pending_count = 0
    for label, feed in feeds:
        if not batched_names:  # nothing to split: every feed is one run
            yield {name: np.array(value) for name, value in feed.items()}
            continue
        scalars = _same_scalars(label, feed, signature, scalars)
        batched = {name: feed[name] for name in batched_names}
        count = signature.samples_in(batched)
        start = 0
        while start < count:
            take = min(batch_size - pending_count, count - start)
            pending.append(signature.cut(batched, start, start + take))
            pending_count += take
            start += take
            if pending_count == batch_size:
                yield signature.join(pending) | scalars
                pending, pending_count = [], 0
        # Copy the leftover samples so this file's arrays can be freed before the next file loads.
        pending = [{name: np.array(array) for name, array in piece.items()} for piece in pending]
        del feed, batched
    if pending:
        yield signature.join(pending) | (scalars or {})


class ArrayFilesSource(SignedSource):
    """Samples from one or more `.npz`/`.npy` files, checked up front and streamed one file at a time."""

    def __init__(self, files: Sequence[ArrayFile], signature: ModelSignature | Sequence[InputSpec],
                 location: str) -> None:
        self.files = tuple(files)
        self._signature = ModelSignature.of(signature)
        self._location = location

    def describe(self) -> str:
        """E.g. "64 samples in calib.npz" or "192 samples in 3 array files in calib/"."""
        files = f"{len(self.files)} array files in " if len(self.files) > 1 else ""
        return f"{self.num_samples()} samples in {files}{self._location}"

    def num_samples(self) -> int:
        """Samples over all files (from the headers); one per file when no input has a sample axis."""
        return sum(file.samples if file.samples is not None else 1 for file in self.files)

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """Batches re-cut across file boundaries; see `CalibSource.batches`."""
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        loaded = ((file.label, load_array_file(file, self._signature)) for file in self.files)
        return rebatch(loaded, self._signature, batch_size)

    def window(self, samples: range, shard: object, of: str | None = None) -> ArrayFilesWindow:
        """Samples `samples` of these files, as shard `shard` (see onnxq.data.shards)."""
        return ArrayFilesWindow(self, samples, shard, of)


class ArrayFilesWindow(SignedSource):
    """Samples `samples` of an `ArrayFilesSource`, counted across its files in order (a shard: `shard` says
    which); files wholly outside are never opened."""

    def __init__(self, source: ArrayFilesSource, samples: range, shard: object, of: str | None = None) -> None:
        self._source, self._window, self.shard, self._of = source, samples, shard, of
        self._signature = source.signature

    def describe(self) -> str:
        return f"shard {self.shard} ({window_text(self._window)}) of {self._of or self._source.describe()}"

    def num_samples(self) -> int:
        return len(self._window)

    def batches(self, batch_size: int) -> Iterator[Feed]:
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        return rebatch(self._pieces(), self._signature, batch_size)

    def _pieces(self) -> Iterator[tuple[str, Feed]]:
        offset = 0
        for file in self._source.files:
            count = file.samples if file.samples is not None else 1
            start, stop = max(self._window.start, offset), min(self._window.stop, offset + count)
            if start < stop:
                feed = load_array_file(file, self._signature)
                if file.samples is not None and stop - start < count:
                    feed = self._signature.cut(feed, start - offset, stop - offset)
                yield file.label, feed
            offset += count
