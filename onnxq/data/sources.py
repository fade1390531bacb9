"""Calibration data sources: turn `--calib PATH` into batches of ONNX Runtime feed dicts.

Data is checked against the model's input signature (`onnxq.data.signature`) before any inference wherever
the format allows (`.npy` headers for array files, feed by feed for loaders). Each input holds its samples
along its own sample axis (axis 0, or axis 1 of a recurrent state [layers, N, hidden]); a rank-0 input is
passed whole with every batch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from onnxq.errors import CalibrationError, ConfigError, OnnxqError, first_line
from onnxq.data.images import IMAGE_SUFFIXES, ImageFolderSource, ImagePreprocess
from onnxq.data.signature import Feed, InputSpec, ModelSignature, SignedSource, input_specs
from onnxq.data.arrays import ARRAY_SUFFIXES, ArrayFilesSource, check_arrays, inspect_array_file, rebatch
from onnxq.data.shards import Shard, loader_takes_shards, shard_of
from onnxq.data.user_code import describe_failure, import_loader

__all__ = ["ARRAY_SUFFIXES", "ArrayFilesSource", "CalibSource", "Feed", "InputSpec", "ModelSignature", "ScriptSource",
           "input_specs", "open_source"]

#: What the sources accept for the model's inputs: its signature, or (for compatibility) a sequence of specs.
Inputs = ModelSignature | Sequence[InputSpec]
ArrayHeaders = Mapping[str, tuple[tuple[int, ...], np.dtype]]
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
                 sample_limit: int | None = SCRIPT_SAMPLE_LIMIT, shard: Shard | None = None) -> None:
        self._label = f"{script}:{function_name}"
        self._loader = import_loader(script, function_name)
        self._signature = ModelSignature.of(signature)
        self._sample_limit = sample_limit
        if shard is not None and not loader_takes_shards(self._loader):
            raise ConfigError(f"--shard {shard}: {self._label} takes no shard_index and num_shards arguments; "
                              f"give it those (def {function_name}(shard_index=0, num_shards=1)) and let it "
                              "yield only its shard's samples")
        self.shard = shard

    def describe(self) -> str:
        """E.g. "feeds from loader.py:load_data" or "shard 1/4 of feeds from loader.py:load_data"."""
        return f"feeds from {self._label}" if self.shard is None else f"shard {self.shard} of feeds from {self._label}"

    def num_samples(self) -> None:
        """Unknown until the loader has run."""
        return None

    def batches(self, batch_size: int) -> Iterator[Feed]:
        """Calls the loader anew and re-cuts its feeds; see `CalibSource.batches`."""
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        return rebatch(self._checked_feeds(), self._signature, batch_size)

    def _checked_feeds(self) -> Iterator[tuple[str, Feed]]:
        count = samples = 0
        try:
            shard = self.shard
            arguments = {} if shard is None else {"shard_index": shard.index, "num_shards": shard.count}
            produced = self._loader(**arguments)
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
            raise CalibrationError(f"{self._label} {describe_failure(err, f' after {count} feeds')}") from err
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
        files = [inspect_array_file(path, str(path), signature) for path in arrays]
        return ArrayFilesSource(files, signature, str(directory))
    kinds = ", ".join(ARRAY_SUFFIXES + IMAGE_SUFFIXES)
    raise CalibrationError(f"{directory}: the directory holds no calibration files ({kinds})")


def open_source(path: str | os.PathLike[str], signature: Inputs, preprocess: ImagePreprocess = ImagePreprocess(),
                max_samples: int | None = None, shard: Shard | None = None) -> CalibSource:
    """Open `--calib PATH` as a calibration source for a model with input signature `signature`.

    Args:
        path: an `.npz`, an `.npy`, a directory of array files or of images, or `file.py[:function]`.
        signature: the model's inputs, from `signature_of` (or, for compatibility, a sequence of
            `InputSpec`s, e.g. from `input_specs`). The source's `signature` attribute holds it.
        preprocess: how images are turned into tensors (only used for image directories).
        max_samples: use at most this many samples, the first ones (`--max-samples`). A loader script may
            then be an endless generator; without it, one that gives more than SCRIPT_SAMPLE_LIMIT samples
            in a pass is stopped with a CalibrationError.
        shard: only this shard of the samples (of the first `max_samples`), see `onnxq.data.shards`; a loader
            script is called with `shard_index` and `num_shards` and must accept them.

    Raises:
        CalibrationError: the path is missing or unsupported, or the data does not fit the model.
        ConfigError: the shard cannot be taken (a loader without shard arguments, or with `max_samples`).
    """
    signature = ModelSignature.of(signature)
    text = os.fspath(path)
    if shard is not None and max_samples is not None and _SCRIPT_REFERENCE.match(text):
        raise ConfigError(f"--max-samples cannot be combined with --shard for a loader script ({text}): the loader "
                          "chooses each shard's samples, so give it the limit")
    source = _open_all(text, signature, preprocess, max_samples is None, shard)
    if shard is not None and not isinstance(source, ScriptSource):
        return shard_of(source, shard, signature, max_samples)
    if max_samples is None:
        return source
    from onnxq.data.limited import FirstSamples  # it imports this module

    return FirstSamples(source, max_samples, signature)


def _open_all(text: str, signature: ModelSignature, preprocess: ImagePreprocess, script_limit: bool,
              shard: Shard | None) -> CalibSource:
    reference = _SCRIPT_REFERENCE.match(text)
    if reference:
        function_name = reference.group("function") or "load_data"
        if not function_name.isidentifier():
            raise CalibrationError(f"{text}: '{function_name}' is not a Python function name")
        return ScriptSource(Path(reference.group("script")), function_name, signature,
                            SCRIPT_SAMPLE_LIMIT if script_limit else None, shard)
    location = Path(text)
    if not location.exists():
        raise CalibrationError(f"{text}: no such file or directory")
    if location.is_dir():
        return _open_directory(location, signature, preprocess)
    if location.suffix.lower() in ARRAY_SUFFIXES:
        return ArrayFilesSource([inspect_array_file(location, text, signature)], signature, text)
    raise CalibrationError(f"{text}: unsupported calibration data '{location.name}'; expected an .npz, an .npy, "
                           "a directory of those or of images, or a loader script file.py[:function]")
