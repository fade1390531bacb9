"""Typed options that planning and calibration take: which nodes, which range method, which float type.

Strings from the command line become these enums and dataclasses once, in `cli/`. `onnxq.config` builds
the whole quantization config on top of them (it also names the target, which needs `onnxq.targets`).
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import dataclass

from onnxq.errors import ConfigError

__all__ = ["CalibMethod", "HighPrecision", "Selection", "CalibConfig", "parse_enum"]


class CalibMethod(enum.Enum):
    """How an activation's clipping range (amax) is chosen from calibration statistics."""

    MAX = "max"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    MSE = "mse"
    AUTO = "auto"  # chosen per scale group by measured output error (`onnxq.steps.ranges`)

    @property
    def needs_histogram(self) -> bool:
        return self is not CalibMethod.MAX


class HighPrecision(enum.Enum):
    """The float type of everything that is not quantized."""

    FP32 = "fp32"
    FP16 = "fp16"


def parse_enum(enum_type: type[enum.Enum], text: str, option: str) -> enum.Enum:
    """Parse `text` as a member value of `enum_type`, or raise a ConfigError listing the choices."""
    for member in enum_type:
        if member.value == text.lower():
            return member
    choices = ", ".join(m.value for m in enum_type)
    raise ConfigError(f"{option}: '{text}' is not one of {choices}")


def _check_op_type(op_type: str) -> None:
    """Raise a ConfigError unless `op_type` is an ONNX op type (of any domain and version)."""
    import onnx.defs  # here, not at the top: the command line's --help needs no onnx

    domains = {getattr(onnx.defs, name) for name in dir(onnx.defs) if name.endswith("_DOMAIN")}  # ONNX_ML_DOMAIN...
    if any(onnx.defs.has(op_type, domain) for domain in domains):
        return
    known = {schema.name for schema in onnx.defs.get_all_schemas_with_history()}  # only for the hint
    close = difflib.get_close_matches(op_type, known, n=1)
    hint = f" Hint: did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"--exclude-op-types: '{op_type}' is not an ONNX op type.{hint}")


@dataclass(frozen=True)
class Selection:
    """Which nodes the user keeps out of quantization.

    Attributes:
        exclude_node_patterns: regular expressions; a node whose name matches any (re.search) stays float.
        exclude_op_types: ONNX op types that stay float.
        quantize_attention: quantize the attention MatMuls next to a Softmax (True) or keep them float
            like the Softmax, LayerNorm and attention-mask arithmetic around them (False). None: the
            target's default, float for TensorRT, quantized for ORT's CPU provider (its integer MatMul
            is where ORT's speed-up on transformers comes from; ORT's quantize_static does the same).
    """

    exclude_node_patterns: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    quantize_attention: bool | None = None

    def __post_init__(self) -> None:
        for pattern in self.exclude_node_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"--exclude-nodes: invalid regular expression '{pattern}': {err}") from None
        for op_type in self.exclude_op_types:  # no schema listing when none is given (every run's default)
            _check_op_type(op_type)

    def excluded_by(self, node_name: str, op_type: str) -> str | None:
        """The reason a node is excluded by the user, or None."""
        if op_type in self.exclude_op_types:
            return f"excluded by the user: op type {op_type}"
        for pattern in self.exclude_node_patterns:
            if re.search(pattern, node_name):
                return f"excluded by the user: name matches '{pattern}'"
        return None


@dataclass(frozen=True)
class CalibConfig:
    """How calibration runs.

    Attributes:
        method: how amax is chosen for activations (weights always use per-channel max).
        batch_size: samples per inference run; models with a fixed batch dimension use that instead.
        providers: ONNX Runtime execution providers, in order of preference.
        percentile: the share of |x| kept below amax by the percentile method, in percent.
        num_bins: histogram bins per tensor for the histogram methods.
    """

    method: CalibMethod = CalibMethod.MAX
    batch_size: int = 8
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    percentile: float = 99.99
    num_bins: int = 2048

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"--percentile must be in (0, 100], got {self.percentile}")
        if self.num_bins < 128:
            raise ConfigError(f"histograms need at least 128 bins, got {self.num_bins}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.providers:
            raise ConfigError("--providers: give at least one execution provider")
