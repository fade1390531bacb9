"""Calibration data sources: turn `--calib PATH` into batches of ONNX Runtime feed dicts.

Data is checked against the model's input signature (`onnxq.data.signature`) before any inference wherever
the format allows (`.npy` headers for array files, feed by feed for loaders). Each input holds its samples
along its own sample axis (axis 0, or axis 1 of a recurrent state [layers, N, hidden]); a rank-0 input is
passed whole with every batch.
"""

from __future__ import annotations

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

from onnxq.errors import CalibrationError, ConfigError, OnnxqError, first_line
from onnxq.data.images import IMAGE_SUFFIXES, ImageFolderSource, ImagePreprocess
from onnxq.data.signature import Feed, InputSpec, ModelSignature, SignedSource, input_specs

__all__ = ["ARRAY_SUFFIXES", "ArrayFilesSource", "CalibSource", "Feed", "InputSpec", "ModelSignature", "ScriptSource",
           "input_specs", "open_source"]

ARRAY_SUFFIXES = (".npz", ".npy")
#: What the sources accept for the model's inputs: its signature, or (for compatibility) a sequence of specs.
Inputs = ModelSignature | Sequence[InputSpec]
_ArrayHeaders = Mapping[str, tuple[tuple[int, ...], np.dtype]]
_SCRIPT_REFERENCE = re.compile(r"^(?P<script>.+\.py)(?::(?P<function>[^:/\\]*))?$", re.IGNORECASE)
#: Samples a data loader may give in one pass when no `max_samples` is set: more, and it is taken for an
#: endless generator and stopped with an error (an endless generator is fine with `--max-samples N`).
SCRIPT_SAMPLE_LIMIT = 100_000


@runtime_checkable
class CalibSource(Protocol):
    """Where calibration samples come from. `batches` may be called more than once.

    The sources onnxq makes also have a `signature` attribute: the `ModelSignature` their data is checked
    against and batched by (not part of the protocol; a source of your own may leave it out).
    """

    def describe(self) -> str:
        """A short human description, e.g. "64 images in models/data/photos/calib"."""

    def num_samples(self) -> int | None:
        """Total samples along the sample axis, if known without loading the data."""

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """Feeds of exactly `batch_size` samples each, except that the last may be smaller."""


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


def check_arrays(origin: str, arrays: _ArrayHeaders, signature: ModelSignature) -> int | None:
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


def _npy_headers(path: Path, label: str, signature: ModelSignature) -> _ArrayHeaders:
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


def _npz_headers(path: Path, label: str) -> _ArrayHeaders:
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
class _ArrayFile:
    path: Path
    label: str
    samples: int | None


def _inspect_array_file(path: Path, label: str, signature: ModelSignature) -> _ArrayFile:
    is_npz = path.suffix.lower() == ".npz"
    headers = _npz_headers(path, label) if is_npz else _npy_headers(path, label, signature)
    return _ArrayFile(path, label, check_arrays(label, headers, signature))


def _load_array_file(file: _ArrayFile, signature: ModelSignature) -> Feed:
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


def _rebatch(feeds: Iterable[tuple[str, Feed]], signature: ModelSignature, batch_size: int) -> Iterator[Feed]:
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

    def __init__(self, files: Sequence[_ArrayFile], signature: Inputs, location: str) -> None:
        self._files = tuple(files)
        self._signature = ModelSignature.of(signature)
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
        loaded = ((file.label, _load_array_file(file, self._signature)) for file in self._files)
        return _rebatch(loaded, self._signature, batch_size)


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
    except (Exception, SystemExit) as err:  # the user's code may raise anything, sys.exit() included
        del sys.modules[module_name]
        raise CalibrationError(f"{script}: importing the data loader {_failure(err)}") from err
    loader = getattr(module, function_name, None)
    if loader is None:
        raise CalibrationError(f"{script}: no function '{function_name}' (write `{script}:NAME` for another one)")
    if not callable(loader):
        raise CalibrationError(f"{script}: '{function_name}' is a {type(loader).__name__}, not a function")
    return loader


def _failure(err: BaseException, after: str = "") -> str:
    """What a loader did, e.g. "failed: ValueError: bad path" or "called sys.exit(0) after 2 feeds; ..."."""
    if isinstance(err, SystemExit):  # sys.exit(...) and raise SystemExit(...) alike
        return (f"called sys.exit({err.code!r}) (SystemExit){after}; a data loader must return or yield its feeds, "
                "not end the process")
    if after:
        return f"raised {type(err).__name__}{after}: {first_line(err)}"
    return f"failed: {type(err).__name__}: {first_line(err)}"


def _feed_arrays(label: str, feed: object) -> Feed:
    if not isinstance(feed, Mapping):
        raise CalibrationError(f"{label} is a {type(feed).__name__}, not a dict of input name -> numpy array")
    arrays = {name: np.asarray(value) if isinstance(value, np.generic) else value for name, value in feed.items()}
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise CalibrationError(f"{label}: input '{name}' is a {type(value).__name__}, not a numpy array. "
                                   "Hint: wrap it with np.asarray(value, dtype=...)")
    return arrays


class ScriptSource(SignedSource):
    """Feeds from a user's Python function (Polygraphy's data-loader convention), checked as they come."""

    def __init__(self, script: Path, function_name: str, signature: Inputs,
                 sample_limit: int | None = SCRIPT_SAMPLE_LIMIT) -> None:
        self._label = f"{script}:{function_name}"
        self._loader = _import_loader(script, function_name)
        self._signature = ModelSignature.of(signature)
        self._sample_limit = sample_limit

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
        return _rebatch(self._checked_feeds(), self._signature, batch_size)

    def _checked_feeds(self) -> Iterator[tuple[str, Feed]]:
        count = samples = 0
        try:
            produced = self._loader()
            if not isinstance(produced, Iterable):
                raise CalibrationError(f"{self._label} returned {type(produced).__name__}; it must return or yield "
                                       "dicts mapping input names to numpy arrays")
            for count, feed in enumerate([produced] if isinstance(produced, Mapping) else produced, start=1):
                label = f"{self._label} feed {count - 1}"
                arrays = _feed_arrays(label, feed)
                check_arrays(label, {name: (a.shape, a.dtype) for name, a in arrays.items()}, self._signature)
                samples += self._signature.samples_in(arrays)
                if self._sample_limit is not None and samples > self._sample_limit:
                    raise CalibrationError(f"{self._label} gave more than {self._sample_limit} samples without "
                                           "stopping; for an endless generator give --max-samples N (its first "
                                           "N samples are used)")
                yield label, arrays
        except OnnxqError:
            raise
        except (Exception, SystemExit) as err:  # the user's code may raise anything, sys.exit() included
            raise CalibrationError(f"{self._label} {_failure(err, f' after {count} feeds')}") from err
        if count == 0:
            raise CalibrationError(f"{self._label} produced no feeds")


def _open_directory(directory: Path, signature: ModelSignature, preprocess: ImagePreprocess) -> CalibSource:
    try:
        entries = sorted((path for path in directory.iterdir() if path.is_file() and not path.name.startswith(".")),
                         key=lambda path: path.name)
    except OSError as err:
        raise CalibrationError(f"{directory}: cannot list the directory: {first_line(err)}") from err
    arrays = [path for path in entries if path.suffix.lower() in ARRAY_SUFFIXES]
    images = [path for path in entries if path.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise CalibrationError(f"{directory}: the directory mixes array files ({arrays[0].name}, ...) and images "
                               f"({images[0].name}, ...); keep one kind per directory")
    if images:
        return ImageFolderSource(str(directory), images, signature, preprocess)
    if arrays:
        files = [_inspect_array_file(path, str(path), signature) for path in arrays]
        return ArrayFilesSource(files, signature, str(directory))
    kinds = ", ".join(ARRAY_SUFFIXES + IMAGE_SUFFIXES)
    raise CalibrationError(f"{directory}: the directory holds no calibration files ({kinds})")


def open_source(path: str | os.PathLike[str], signature: Inputs,
                preprocess: ImagePreprocess = ImagePreprocess(), max_samples: int | None = None) -> CalibSource:
    """Open `--calib PATH` as a calibration source for a model with input signature `signature`.

    Args:
        path: an `.npz`, an `.npy`, a directory of array files or of images, or `file.py[:function]`.
        signature: the model's inputs, from `signature_of` (or, for compatibility, a sequence of
            `InputSpec`s, e.g. from `input_specs`). The source's `signature` attribute holds it.
        preprocess: how images are turned into tensors (only used for image directories).
        max_samples: use at most this many samples, the first ones (`--max-samples`). A loader script may
            then be an endless generator; without it, one that gives more than SCRIPT_SAMPLE_LIMIT samples
            in a pass is stopped with a CalibrationError.

    Raises:
        CalibrationError: the path is missing or unsupported, or the data does not fit the model.
    """
    signature = ModelSignature.of(signature)
    source = _open_all(os.fspath(path), signature, preprocess, max_samples is None)
    if max_samples is None:
        return source
    from onnxq.data.limited import FirstSamples  # it imports this module

    return FirstSamples(source, max_samples, signature)


def _open_all(text: str, signature: ModelSignature, preprocess: ImagePreprocess, script_limit: bool) -> CalibSource:
    reference = _SCRIPT_REFERENCE.match(text)
    if reference:
        function_name = reference.group("function") or "load_data"
        if not function_name.isidentifier():
            raise CalibrationError(f"{text}: '{function_name}' is not a Python function name")
        return ScriptSource(Path(reference.group("script")), function_name, signature,
                            SCRIPT_SAMPLE_LIMIT if script_limit else None)
    location = Path(text)
    if not location.exists():
        raise CalibrationError(f"{text}: no such file or directory")
    if location.is_dir():
        return _open_directory(location, signature, preprocess)
    if location.suffix.lower() in ARRAY_SUFFIXES:
        return ArrayFilesSource([_inspect_array_file(location, text, signature)], signature, text)
    raise CalibrationError(f"{text}: unsupported calibration data '{location.name}'; expected an .npz, an .npy, "
                           "a directory of those or of images, or a loader script file.py[:function]")
