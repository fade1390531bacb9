"""The whole quantization config: the options of `onnxq.options` plus the target, and the accuracy goal.

`QuantConfig.target` is a target object from `onnxq.targets` (`TRT`, `ORT_CPU`, or your own registered
one); a name ("trt", "ort-cpu") or the deprecated `Target` enum is accepted and looked up once here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

from onnxq.errors import ConfigError
from onnxq.options import CalibConfig, CalibMethod, HighPrecision, Selection, parse_enum
from onnxq.targets import ORT_CPU, TRT, QuantTarget, get_target

__all__ = [
    "CalibMethod", "HighPrecision", "Selection", "CalibConfig", "QuantConfig", "AccuracyGoal", "Target",
    "parse_enum",
]


#: Deprecated (one release): the built-in target objects under their old enum names; use
#: `onnxq.targets.TRT` / `onnxq.targets.ORT_CPU` (or the names "trt", "ort-cpu").
Target = SimpleNamespace(TRT=TRT, ORT_CPU=ORT_CPU)


@dataclass(frozen=True)
class QuantConfig:
    """Everything `onnxq.quantize` needs besides the model, the data and the steps.

    Attributes:
        selection: which nodes stay float.
        calib: how calibration runs and which range method.
        target: the runtime the model is written for (its placement rules, scheme, defaults).
        high_precision: the float type of everything not quantized (the target must allow it).
        smoothquant: SmoothQuant (the `SmoothQuant` step): None (the default) or True: alpha measured per
            layer, smoothing kept only where it cuts the error; a number in (0, 1): that alpha everywhere;
            False: off.
        latency_search: time layer classes in INT8 and float and keep the faster (the `LatencySearch`
            step). None: the target's default (on for ort-cpu when there is calibration data to time).
        bias_correction: correct each quantized layer's bias for the mean output shift quantization gives
            it, kept where it helps on held-back samples (the `BiasCorrection` step). None: the default
            (`onnxq.steps.bias_correction.BY_DEFAULT`).
        equalize: cross-layer equalization of Conv pairs across ReLU-like activations before planning
            (the `Equalize` step); None (the default) means on (README "Cross-layer equalization").
    """

    selection: Selection = field(default_factory=Selection)
    calib: CalibConfig = field(default_factory=CalibConfig)
    target: QuantTarget = TRT
    high_precision: HighPrecision = HighPrecision.FP32
    smoothquant: float | bool | None = None
    latency_search: bool | None = False
    bias_correction: bool | None = None
    equalize: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, QuantTarget):
            object.__setattr__(self, "target", get_target(self.target))
        if not isinstance(self.smoothquant, (bool, type(None))) and not 0.0 < self.smoothquant < 1.0:
            raise ConfigError(f"--smoothquant: alpha must be between 0 and 1 (exclusive), got {self.smoothquant}")
        if self.equalize not in (None, True, False):
            raise ConfigError(f"equalize must be True, False or None (the default), got {self.equalize!r}")
        self.target.check(self.high_precision)


@dataclass(frozen=True)
class AccuracyGoal:
    """How close to the float model the INT8 model must stay; layers fall back to float until it is.

    Both thresholds apply to every graph output, measured on held-back samples against the float
    model. Without either, only the per-layer sensitivity is measured and nothing falls back.

    Attributes:
        min_cosine: the lowest output cosine similarity accepted (e.g. 0.99).
        max_sqnr_drop_db: how far the quantization noise may rise towards the signal: the output's
            signal-to-quantization-noise ratio 10*log10(sum(ref^2) / sum((ref-int8)^2)) must stay at
            or above this many dB (e.g. 20: the noise energy at most 1% of the signal's).
        write_anyway: return a model even when the target is not met (the fully quantized one when
            no model with a quantized layer meets it) instead of raising `TargetNotMetError`.
        samples: at most this many held-back samples; each measurement is a pass over them.
        jobs: how many processes measure the layers at once, each with an ONNX Runtime session of its own
            and cores // jobs threads (1: one session in this process). How the work runs, not what it
            must reach: the measurements, the ranking and the model are the same for any value.
    """

    min_cosine: float | None = None
    max_sqnr_drop_db: float | None = None
    write_anyway: bool = False
    samples: int = 32
    jobs: int = 1

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"--min-cosine must be in [-1, 1], got {self.min_cosine}")
        if self.max_sqnr_drop_db is not None and not math.isfinite(self.max_sqnr_drop_db):
            raise ConfigError(f"--max-sqnr-drop must be a finite number of dB, got {self.max_sqnr_drop_db}")
        if self.samples < 1:
            raise ConfigError(f"the accuracy target needs at least 1 held-back sample, got {self.samples}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.jobs}")

    @property
    def has_threshold(self) -> bool:
        """Whether a threshold is set (otherwise: sensitivity only)."""
        return self.min_cosine is not None or self.max_sqnr_drop_db is not None

    def describe(self) -> str:
        """E.g. "cosine >= 0.99 and SQNR >= 20 dB"."""
        parts = [] if self.min_cosine is None else [f"cosine >= {self.min_cosine:g}"]
        parts += [] if self.max_sqnr_drop_db is None else [f"SQNR >= {self.max_sqnr_drop_db:g} dB"]
        return " and ".join(parts) or "no threshold"
