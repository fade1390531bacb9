"""Errors a user can act on, and the one that marks an onnxq bug.

Every `OnnxqError` message is one line that names the tensor, node or file at fault; the CLI prints it
without a traceback. `InternalError` is deliberately not an `OnnxqError`: it keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "OnnxqError",
    "ModelError",
    "CalibrationError",
    "ConfigError",
    "MissingDependencyError",
    "ClusterError",
    "InternalError",
    "first_line",
]


class OnnxqError(Exception):
    """A problem with the user's model, data or options."""


class ModelError(OnnxqError):
    """The model cannot be loaded, transformed or saved."""


class CalibrationError(OnnxqError):
    """The calibration data is missing, malformed or does not match the model."""


class ConfigError(OnnxqError):
    """An option or configuration value is invalid."""


class MissingDependencyError(OnnxqError):
    """An optional dependency (TensorRT, a GPU) is not available."""


class ClusterError(OnnxqError):
    """The cluster that runs the work cannot be reached, or lost more workers than a run can replace."""


class InternalError(Exception):
    """An onnxq bug: an invariant that should always hold did not."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): what a
    one-line error quotes of an error raised by another library."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
