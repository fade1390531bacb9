"""The model's input signature: what data must feed it, and along which axis each input holds its samples.

`signature_of(model or graph)` computes it once; every stage that batches, counts, splits or joins
samples asks the `ModelSignature` rather than deriving axes itself. Axis 0 of an input of rank >= 1 is
its sample axis, except for a recurrent state such as Silero VAD's [2, N, 128] beside inputs with a
free batch (see `sample_axis_of`); a rank-0 input has no sample axis and is passed whole with every
batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxq.errors import CalibrationError, ConfigError, ModelError

__all__ = ["SignedSource", "Feed", "InputSpec", "ModelSignature", "batch_is_dynamic", "cut_samples", "input_specs", "sample_axis_of",
           "samples_in", "signature_of", "window_text"]

Feed = dict[str, np.ndarray]


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


@dataclass(frozen=True)
class InputSpec:
    """One graph input the data must feed.

    Attributes:
        name: the input's name.
        dtype: the numpy dtype of its ONNX element type.
        shape: its dims; None marks a symbolic or unknown dim. See `sample_axis` for the sample axis.
        batch_dynamic: whether some input of the model has a symbolic axis 0 (set by `ModelSignature`;
            not part of equality).
        given_axis: the sample axis when it is stated rather than read from the model's shapes (data
            without a model, e.g. `FeedsSource(sample_axes=)`); None: by the rule of `sample_axis_of`.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    batch_dynamic: bool = dataclasses.field(default=False, compare=False)  # the model's batch is free: see `sample_axis_of`
    given_axis: int | None = None

    def __post_init__(self) -> None:
        if self.given_axis is not None and not 0 <= self.given_axis < len(self.shape):
            raise ConfigError(f"input '{self.name}' of rank {len(self.shape)} has no axis {self.given_axis} "
                              "to hold its samples")

    @property
    def batched(self) -> bool:
        """Whether the input has a sample axis; rank-0 inputs are passed whole with every batch."""
        return len(self.shape) > 0

    @property
    def sample_axis(self) -> int | None:
        """The axis samples are stacked along (`given_axis`, else see `sample_axis_of`)."""
        return self.given_axis if self.given_axis is not None else sample_axis_of(self.shape, self.batch_dynamic)

    def shape_text(self) -> str:
        """The shape as messages show it: N for the sample axis, ? for other symbolic dims."""
        dims = ["N" if axis == self.sample_axis else "?" if dim is None else str(dim)
                for axis, dim in enumerate(self.shape)]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def describe(self) -> str:
        """Name, shape and dtype, e.g. `'x' (N, 3, ?, ?) float32`."""
        return f"'{self.name}' {self.shape_text()} {self.dtype.name}"


def cut_samples(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of `array` along `axis` (a view)."""
    return array[(slice(None),) * axis + (slice(start, stop),)]


def samples_in(feed: Mapping[str, np.ndarray], axes: Mapping[str, int]) -> int:
    """The number of samples in `feed`, by the sample axes `axes` (1 when no input of `feed` has one)."""
    sizes = [np.shape(feed[name])[axis] for name, axis in axes.items() if name in feed]
    return max(sizes) if sizes else 1


@dataclass(frozen=True)
class ModelSignature:
    """The model's inputs as data must feed them, computed once: specs, sample axes, fixed batch.

    Every input's `batch_dynamic` is set from all the inputs' shapes on construction, so a signature
    built from hand-made specs puts the samples where `signature_of` would.

    Attributes:
        inputs: every graph input that is not an initializer, in graph order.
    """

    inputs: tuple[InputSpec, ...]

    def __post_init__(self) -> None:
        specs = tuple(self.inputs)
        dynamic = batch_is_dynamic(spec.shape for spec in specs)
        object.__setattr__(self, "inputs", tuple(dataclasses.replace(spec, batch_dynamic=dynamic) for spec in specs))

    @classmethod
    def of(cls, inputs: ModelSignature | Iterable[InputSpec]) -> ModelSignature:
        """`inputs` as a signature: a signature itself, or one built from a sequence of specs."""
        return inputs if isinstance(inputs, ModelSignature) else cls(tuple(inputs))

    @classmethod
    def of_feed(cls, feed: Mapping[str, np.ndarray], sample_axes: Mapping[str, int] | None = None) -> ModelSignature:
        """The signature a feed implies when no model is at hand: every dim symbolic, the samples on axis 0
        of each input of rank >= 1 unless `sample_axes` names another (e.g. {"state": 1})."""
        given = dict(sample_axes or {})
        return cls(tuple(InputSpec(name, np.asarray(array).dtype, (None,) * np.ndim(array), given_axis=given.get(name))
                         for name, array in feed.items()))

    @cached_property
    def sample_axes(self) -> Mapping[str, int]:
        """Input name -> its sample axis, for the inputs that have one (read-only)."""
        return MappingProxyType({spec.name: spec.sample_axis for spec in self.inputs if spec.sample_axis is not None})

    @cached_property
    def fixed_batch(self) -> int | None:
        """The batch size every batched input fixes on its sample axis; None when one leaves it free, the
        inputs disagree, or no input has a sample axis."""
        sizes = {spec.shape[spec.sample_axis] for spec in self.inputs if spec.sample_axis is not None}
        return sizes.pop() if len(sizes) == 1 and None not in sizes else None

    def batch_size(self, requested: int) -> int:
        """The samples per run: the model's fixed batch if it has one, else `requested`."""
        return self.fixed_batch or requested

    def spec(self, name: str) -> InputSpec:
        """The spec of input `name`.

        Raises:
            KeyError: the model has no such input.
        """
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def samples_in(self, feed: Mapping[str, np.ndarray]) -> int:
        """The samples in `feed`, counted along the sample axes (1 when no input of `feed` has one)."""
        return samples_in(feed, self.sample_axes)

    def cut(self, feed: Mapping[str, np.ndarray], start: int, stop: int) -> Feed:
        """Samples [start, stop) of every batched input of `feed`, along its own sample axis (views);
        inputs without one (rank 0, or not in the signature) are passed whole."""
        axes = self.sample_axes
        return {name: cut_samples(array, axes[name], start, stop) if name in axes else array
                for name, array in feed.items()}

    def select(self, feed: Mapping[str, np.ndarray], mask: np.ndarray) -> Feed:
        """The samples of `feed` where `mask` (bool, one entry per sample) is true, along each input's own
        sample axis (copies); inputs without one are passed whole.

        Raises:
            CalibrationError: an input does not hold `len(mask)` samples.
        """
        keep = np.asarray(mask, dtype=bool)
        axes = self.sample_axes
        selected = {}
        for name, array in feed.items():
            if name not in axes:
                selected[name] = array
                continue
            size = np.shape(array)[axes[name]]
            if size != keep.size:
                raise CalibrationError(f"input '{name}' holds {size} samples along axis {axes[name]}, but "
                                       f"{keep.size} were to be selected from")
            selected[name] = np.compress(keep, array, axis=axes[name])
        return selected

    def join(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> Feed:
        """The feeds concatenated along each input's sample axis; inputs without one come from the first.

        Raises:
            CalibrationError: `feeds` is empty.
        """
        if not feeds:
            raise CalibrationError("no feeds to join")
        axes = self.sample_axes
        return {name: np.concatenate([feed[name] for feed in feeds], axis=axes[name]) if name in axes else array
                for name, array in feeds[0].items()}


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


def _spec_of_variable(tensor: gs.Variable) -> InputSpec:
    """The spec of an onnx-graphsurgeon graph input, read as `_spec_of` reads the model's."""
    if tensor.dtype is None:
        raise ModelError(f"input '{tensor.name}' has no element type")
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.dtype) if isinstance(tensor.dtype, int)
                         else tensor.dtype)
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"input '{tensor.name}': element type {tensor.dtype} has no numpy equivalent") from err
    if tensor.shape is None:
        raise ModelError(f"input '{tensor.name}' has no shape, not even a rank; give the model input a shape")
    # Symbolic dims are strings, unknown ones None; -1 and 0 mark unknown dims in some exports.
    shape = tuple(int(dim) if isinstance(dim, (int, np.integer)) and dim > 0 else None for dim in tensor.shape)
    return InputSpec(tensor.name, dtype, shape)


def signature_of(model: onnx.ModelProto | gs.Graph) -> ModelSignature:
    """The input signature of a model, or of an onnx-graphsurgeon graph of it (both give the same one):
    every graph input that is not an initializer.

    Raises:
        ModelError: an input is not a tensor, or has no element type, no numpy dtype or no shape.
    """
    if isinstance(model, onnx.ModelProto):
        initializer_names = {initializer.name for initializer in model.graph.initializer}
        return ModelSignature(tuple(_spec_of(value) for value in model.graph.input
                                    if value.name not in initializer_names))
    return ModelSignature(tuple(_spec_of_variable(tensor) for tensor in model.inputs
                                if not isinstance(tensor, gs.Constant)))


def input_specs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The graph inputs that calibration data must feed: `signature_of(model).inputs` (kept for one release;
    use `signature_of`)."""
    return signature_of(model).inputs


class SignedSource:
    """Base of onnxq's data sources: `signature`, the model inputs their batches are checked and cut by
    (set as `self._signature` by each source's constructor)."""

    _signature: ModelSignature

    @property
    def signature(self) -> ModelSignature:
        return self._signature


def window_text(samples: range) -> str:
    """E.g. "samples 16-31" or "sample 4": a shard's samples in messages."""
    return f"sample {samples.start}" if len(samples) == 1 else f"samples {samples.start}-{samples.stop - 1}"
