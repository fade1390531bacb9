"""Calibration data sources: turn `--calib PATH` into batches of ONNX Runtime feed dicts.

Data is checked against the model before any inference wherever the format allows (`.npy` headers for array
files, feed by feed for loaders). Axis 0 of an input of rank >= 1 is its sample axis; a rank-0 input is
passed whole with every batch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np
import onnx
from onnx import helper

from onnxq.errors import CalibrationError, ConfigError, ModelError, OnnxqError
from onnxq.data.images import IMAGE_SUFFIXES, ImageFolderSource, ImagePreprocess

__all__ = ["ARRAY_SUFFIXES", "ArrayFilesSource", "CalibSource", "Feed", "InputSpec", "ScriptSource", "input_specs",
           "open_source"]

ARRAY_SUFFIXES = (".npz", ".npy")
Feed = dict[str, np.ndarray]
_ArrayHeaders = Mapping[str, tuple[tuple[int, ...], np.dtype]]
_SCRIPT_REFERENCE = re.compile(r"^(?P<script>.+\.py)(?::(?P<function>[^:/\\]*))?$", re.IGNORECASE)


def sample_axis_of(shape: Sequence[int | None], batch_dynamic: bool) -> int | None:
    """The axis an input's samples are stacked along: None for a rank-0 input; else 0, except in a model
    whose batch is dynamic (`batch_dynamic`: some input has a symbolic axis 0) for an input whose axis 0
    is fixed at a size other than 1 with a symbolic axis after it, as recurrent states [layers, N, hidden]
    are: then that first symbolic axis. (A model with a fixed batch, e.g. [8, seq], keeps axis 0.)"""
    if not shape:
        return None
    first = shape[0]
    if batch_dynamic and first is not None and first != 1:
        return next((axis for axis, dim in enumerate(shape) if dim is None), 0)
    return 0


def batch_is_dynamic(shapes: Iterable[Sequence[int | None]]) -> bool:
    """True if some input of rank >= 1 has a symbolic axis 0."""
    return any(len(shape) > 0 and shape[0] is None for shape in shapes)


def graph_sample_axes(graph: Any) -> dict[str, int]:
    """Input name -> the axis its samples are stacked along, for an onnx-graphsurgeon graph's inputs of
    known rank (the rule of `sample_axis_of`, as `input_specs` applies it to a model)."""
    shapes = {tensor.name: [d if isinstance(d, int) and d > 0 else None for d in tensor.shape]
              for tensor in graph.inputs if tensor.shape is not None}
    dynamic = batch_is_dynamic(shapes.values())
    axes = {name: sample_axis_of(shape, dynamic) for name, shape in shapes.items()}
    return {name: axis for name, axis in axes.items() if axis is not None}


@dataclass(frozen=True)
class InputSpec:
    """One graph input the calibration data must feed.

    Attributes:
        name: the input's name.
        dtype: the numpy dtype of its ONNX element type.
        shape: its dims; None marks a symbolic or unknown dim. See `sample_axis` for the sample axis.
        batch_dynamic: whether some input of the model has a symbolic axis 0 (set by `input_specs`;
            not part of equality).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    batch_dynamic: bool = dataclasses.field(default=False, compare=False)  # the model's batch is free: see `sample_axis_of`

    @property
    def batched(self) -> bool:
        """Whether the input has a sample axis; rank-0 inputs are passed whole with every batch."""
        return len(self.shape) > 0

    @property
    def sample_axis(self) -> int | None:
        """The axis samples are stacked along (see `sample_axis_of`)."""
        return sample_axis_of(self.shape, self.batch_dynamic)

    def shape_text(self) -> str:
        """The shape as messages show it: N for the sample axis, ? for other symbolic dims."""
        dims = ["N" if axis == self.sample_axis else "?" if dim is None else str(dim)
                for axis, dim in enumerate(self.shape)]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def describe(self) -> str:
        """Name, shape and dtype, e.g. `'x' (N, 3, ?, ?) float32`."""
        return f"'{self.name}' {self.shape_text()} {self.dtype.name}"


def input_specs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The graph inputs that calibration data must feed: every input that is not an initializer.

    Raises:
        ModelError: an input is not a tensor, or has no element type, no numpy dtype or no shape.
    """
    initializer_names = {initializer.name for initializer in model.graph.initializer}
    specs = [_spec_of(value) for value in model.graph.input if value.name not in initializer_names]
    dynamic = batch_is_dynamic(spec.shape for spec in specs)
    return tuple(dataclasses.replace(spec, batch_dynamic=dynamic) for spec in specs)


def _spec_of(value: onnx.ValueInfoProto) -> InputSpec:
    if value.type.WhichOneof("value") != "tensor_type":
        raise ModelError(f"input '{value.name}' is not a tensor; calibration can only feed tensor inputs")
    tensor_type = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError, ValueError) as err:
        elem_name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ModelError(f"input '{value.name}': element type {elem_name} has no numpy equivalent") from err
    if not tensor_type.HasField("shape"):
        raise ModelError(f"input '{value.name}' has no shape, not even a rank; give the model input a shape")
    shape = tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
                  for dim in tensor_type.shape.dim)
    return InputSpec(value.name, dtype, shape)


@runtime_checkable
class CalibSource(Protocol):
    """Where calibration samples come from. `batches` may be called more than once."""

    def describe(self) -> str:
        """A short human description, e.g. "64 images in models/data/photos/calib"."""

    def num_samples(self) -> int | None:
        """Total samples along the sample axis, if known without loading the data."""

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """Feeds of exactly `batch_size` samples each, except that the last may be smaller."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


def _check_arrays(origin: str, arrays: _ArrayHeaders, specs: Sequence[InputSpec]) -> int | None:
    """Check one file's or feed's arrays against the model; return its sample count (None: no sample axis)."""
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


def _npy_headers(path: Path, label: str, specs: Sequence[InputSpec]) -> _ArrayHeaders:
    if len(specs) != 1:
        inputs = ", ".join(spec.describe() for spec in specs) or "none"
        raise CalibrationError(f"{label}: a .npy file holds one array, but the model has {len(specs)} inputs "
                               f"({inputs}); use an .npz keyed by input name")
    try:
        with open(path, "rb") as stream:
            return {specs[0].name: _read_npy_header(stream)}
    except (OSError, ValueError, EOFError) as err:
        raise CalibrationError(f"{label}: not a readable .npy file: {_first_line(err)}") from err


def _npz_headers(path: Path, label: str) -> _ArrayHeaders:
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as stream:
                    headers[member[:-len(".npy")] if member.endswith(".npy") else member] = _read_npy_header(stream)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CalibrationError(f"{label}: not a readable .npz file: {_first_line(err)}") from err
    return headers


@dataclass(frozen=True)
class _ArrayFile:
    path: Path
    label: str
    samples: int | None


def _inspect_array_file(path: Path, label: str, specs: Sequence[InputSpec]) -> _ArrayFile:
    is_npz = path.suffix.lower() == ".npz"
    headers = _npz_headers(path, label) if is_npz else _npy_headers(path, label, specs)
    return _ArrayFile(path, label, _check_arrays(label, headers, specs))


def _load_array_file(file: _ArrayFile, specs: Sequence[InputSpec]) -> Feed:
    """Load one file: `.npz` members are read whole, `.npy` is memory-mapped. Never unpickles."""
    try:
        if file.path.suffix.lower() == ".npz":
            with np.load(file.path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        else:
            arrays = {specs[0].name: np.load(file.path, mmap_mode="r", allow_pickle=False)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CalibrationError(f"{file.label}: cannot read the arrays: {_first_line(err)}") from err
    _check_arrays(file.label, {name: (a.shape, a.dtype) for name, a in arrays.items()}, specs)
    return arrays


def _same_scalars(label: str, feed: Feed, specs: Sequence[InputSpec], previous: Feed | None) -> Feed:
    current = {spec.name: np.array(feed[spec.name]) for spec in specs if not spec.batched}
    for name, earlier in (previous or {}).items():
        if not np.array_equal(current[name], earlier, equal_nan=earlier.dtype.kind in "fc"):
            raise CalibrationError(f"{label}: rank-0 input '{name}' is {current[name].item()!r} but earlier data "
                                   f"gave {earlier.item()!r}; a rank-0 input must hold the same value everywhere")
    return current


def sample_axes(specs: Sequence[InputSpec]) -> dict[str, int]:
    """Input name -> its sample axis, for the inputs that have one."""
    return {spec.name: spec.sample_axis for spec in specs if spec.sample_axis is not None}


def cut_samples(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of `array` along `axis` (a view)."""
    return array[(slice(None),) * axis + (slice(start, stop),)]


def samples_in(feed: Mapping[str, np.ndarray], axes: Mapping[str, int]) -> int:
    """The number of samples in `feed` (1 when no input has a sample axis)."""
    sizes = [np.shape(feed[name])[axis] for name, axis in axes.items() if name in feed]
    return max(sizes) if sizes else 1


def _join(pieces: list[Feed], scalars: Feed, axes: Mapping[str, int]) -> Feed:
    return {name: np.concatenate([piece[name] for piece in pieces], axis=axes[name]) for name in pieces[0]} | scalars


def _rebatch(feeds: Iterable[tuple[str, Feed]], specs: Sequence[InputSpec], batch_size: int) -> Iterator[Feed]:
    """Split and concatenate labelled feeds along their sample axes into batches of `batch_size` samples."""
    axes = sample_axes(specs)
    batched_names = list(axes)
    scalars: Feed | None = None
    pending: list[Feed] = []
    pending_count = 0
    for label, feed in feeds:
        if not batched_names:  # nothing to split: every feed is one run
            yield {name: np.array(value) for name, value in feed.items()}
            continue
        scalars = _same_scalars(label, feed, specs, scalars)
        count = samples_in(feed, axes)
        start = 0
        while start < count:
            take = min(batch_size - pending_count, count - start)
            pending.append({name: cut_samples(feed[name], axes[name], start, start + take) for name in batched_names})
            pending_count += take
            start += take
            if pending_count == batch_size:
                yield _join(pending, scalars, axes)
                pending, pending_count = [], 0
        # Copy the leftover samples so this file's arrays can be freed before the next file loads.
        pending = [{name: np.array(array) for name, array in piece.items()} for piece in pending]
        del feed
    if pending:
        yield _join(pending, scalars or {}, axes)


class ArrayFilesSource:
    """Samples from one or more `.npz`/`.npy` files, checked up front and streamed one file at a time."""

    def __init__(self, files: Sequence[_ArrayFile], specs: Sequence[InputSpec], location: str) -> None:
        self._files = tuple(files)
        self._specs = tuple(specs)
        self._location = location

    def describe(self) -> str:
        """E.g. "64 samples in calib.npz" or "192 samples in 3 array files in calib/"."""
        files = f"{len(self._files)} array files in " if len(self._files) > 1 else ""
        return f"{self.num_samples()} samples in {files}{self._location}"

    def num_samples(self) -> int:
        """Samples over all files (from the headers); one per file when no input has a sample axis."""
        return sum(file.samples if file.samples is not None else 1 for file in self._files)

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """Batches re-cut across file boundaries; see `CalibSource.batches`."""
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        loaded = ((file.label, _load_array_file(file, self._specs)) for file in self._files)
        return _rebatch(loaded, self._specs, batch_size)


def _import_loader(script: Path, function_name: str) -> Callable[[], Any]:
    if not script.is_file():
        raise CalibrationError(f"{script}: no such data-loader script")
    module_name = f"_onnxq_calib_loader_{abs(hash(str(script.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, script)
    if module_spec is None or module_spec.loader is None:
        raise CalibrationError(f"{script}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's code may raise anything
        del sys.modules[module_name]
        raise CalibrationError(f"{script}: importing the data loader failed: {type(err).__name__}: "
                               f"{_first_line(err)}") from err
    loader = getattr(module, function_name, None)
    if loader is None:
        raise CalibrationError(f"{script}: no function '{function_name}' (write `{script}:NAME` for another one)")
    if not callable(loader):
        raise CalibrationError(f"{script}: '{function_name}' is a {type(loader).__name__}, not a function")
    return loader


def _feed_arrays(label: str, feed: object) -> Feed:
    if not isinstance(feed, Mapping):
        raise CalibrationError(f"{label} is a {type(feed).__name__}, not a dict of input name -> numpy array")
    arrays = {name: np.asarray(value) if isinstance(value, np.generic) else value for name, value in feed.items()}
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise CalibrationError(f"{label}: input '{name}' is a {type(value).__name__}, not a numpy array. "
                                   "Hint: wrap it with np.asarray(value, dtype=...)")
    return arrays


class ScriptSource:
    """Feeds from a user's Python function (Polygraphy's data-loader convention), checked as they come."""

    def __init__(self, script: Path, function_name: str, specs: Sequence[InputSpec]) -> None:
        self._label = f"{script}:{function_name}"
        self._loader = _import_loader(script, function_name)
        self._specs = tuple(specs)

    def describe(self) -> str:
        """E.g. "feeds from loader.py:load_data"."""
        return f"feeds from {self._label}"

    def num_samples(self) -> None:
        """Unknown until the loader has run."""
        return None

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """Calls the loader anew and re-cuts its feeds; see `CalibSource.batches`."""
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        return _rebatch(self._checked_feeds(), self._specs, batch_size)

    def _checked_feeds(self) -> Iterator[tuple[str, Feed]]:
        count = 0
        try:
            produced = self._loader()
            if not isinstance(produced, Iterable):
                raise CalibrationError(f"{self._label} returned {type(produced).__name__}; it must return or yield "
                                       "dicts mapping input names to numpy arrays")
            for count, feed in enumerate([produced] if isinstance(produced, Mapping) else produced, start=1):
                label = f"{self._label} feed {count - 1}"
                arrays = _feed_arrays(label, feed)
                _check_arrays(label, {name: (a.shape, a.dtype) for name, a in arrays.items()}, self._specs)
                yield label, arrays
        except OnnxqError:
            raise
        except Exception as err:  # the user's code may raise anything
            raise CalibrationError(f"{self._label} raised {type(err).__name__} after {count} feeds: "
                                   f"{_first_line(err)}") from err
        if count == 0:
            raise CalibrationError(f"{self._label} produced no feeds")


def _open_directory(directory: Path, specs: Sequence[InputSpec], preprocess: ImagePreprocess) -> CalibSource:
    try:
        entries = sorted((path for path in directory.iterdir() if path.is_file() and not path.name.startswith(".")),
                         key=lambda path: path.name)
    except OSError as err:
        raise CalibrationError(f"{directory}: cannot list the directory: {_first_line(err)}") from err
    arrays = [path for path in entries if path.suffix.lower() in ARRAY_SUFFIXES]
    images = [path for path in entries if path.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise CalibrationError(f"{directory}: the directory mixes array files ({arrays[0].name}, ...) and images "
                               f"({images[0].name}, ...); keep one kind per directory")
    if images:
        return ImageFolderSource(str(directory), images, specs, preprocess)
    if arrays:
        files = [_inspect_array_file(path, str(path), specs) for path in arrays]
        return ArrayFilesSource(files, specs, str(directory))
    kinds = ", ".join(ARRAY_SUFFIXES + IMAGE_SUFFIXES)
    raise CalibrationError(f"{directory}: the directory holds no calibration files ({kinds})")


def open_source(path: str | os.PathLike[str], specs: Sequence[InputSpec],
                preprocess: ImagePreprocess = ImagePreprocess()) -> CalibSource:
    """Open `--calib PATH` as a calibration source for a model with inputs `specs`.

    Args:
        path: an `.npz`, an `.npy`, a directory of array files or of images, or `file.py[:function]`.
        specs: the model's inputs, from `input_specs`.
        preprocess: how images are turned into tensors (only used for image directories).

    Raises:
        CalibrationError: the path is missing or unsupported, or the data does not fit the model.
    """
    text = os.fspath(path)
    reference = _SCRIPT_REFERENCE.match(text)
    if reference:
        function_name = reference.group("function") or "load_data"
        if not function_name.isidentifier():
            raise CalibrationError(f"{text}: '{function_name}' is not a Python function name")
        return ScriptSource(Path(reference.group("script")), function_name, specs)
    location = Path(text)
    if not location.exists():
        raise CalibrationError(f"{text}: no such file or directory")
    if location.is_dir():
        return _open_directory(location, specs, preprocess)
    if location.suffix.lower() in ARRAY_SUFFIXES:
        return ArrayFilesSource([_inspect_array_file(location, text, specs)], specs, text)
    raise CalibrationError(f"{text}: unsupported calibration data '{location.name}'; expected an .npz, an .npy, "
                           "a directory of those or of images, or a loader script file.py[:function]")
