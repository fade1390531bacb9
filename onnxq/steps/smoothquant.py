"""SmoothQuant as a step of `quantize`: per-channel activation ranges, then the rewrite, before planning.

The rewrite itself is the graph pass `onnxq.passes.smoothquant` (Xiao et al., ICML 2023). This step
measures what it needs in one pass over the calibration data (`onnxq.calib.channel_profiles`: per-channel
ranges of every MatMul/Gemm activation input and a sample of its rows), chooses each tensor's migration
strength by the error it leaves (`onnxq.steps.smooth_alpha`; or takes one fixed alpha for all), and
reaches every such input: where no producer can absorb 1/s, a per-channel Mul is inserted before the
linear readers (kept only where it cuts the measured error by `EXPLICIT_MIN_GAIN`).

On by default: a model without linear layers reading activations has no candidate and costs nothing; on
one with them, the measurement keeps only the smoothing that helps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxq.calib.channel_absmax import channel_profiles
from onnxq.errors import ConfigError
from onnxq.passes.smooth_sites import smooth_sites
from onnxq.passes.smoothquant import check_alpha, smoothquant
from onnxq.steps.base import Job, Step, StepSkipped
from onnxq.steps.smooth_alpha import AlphaChoice, choose_alpha

__all__ = ["SmoothQuant", "Smoothed", "ROWS"]

#: Rows of each activation the per-layer alpha is measured on.
ROWS = 512


@dataclass(frozen=True)
class Smoothed:
    """What SmoothQuant did.

    Attributes:
        alpha: the one migration strength given, or None (chosen per tensor: see `choices`).
        tensors: the linear-layer inputs smoothed.
        left_alone: the other candidates, each with the reason.
        choices: per measured tensor, the alpha chosen and why (empty with a fixed alpha).
        explicit: the smoothed tensors divided by a new per-channel Mul (no producer absorbs 1/s).
        seconds: wall time of the measurement and the rewrite.
    """

    alpha: float | None
    tensors: tuple[str, ...]
    left_alone: tuple[tuple[str, str], ...]
    choices: tuple[AlphaChoice, ...] = ()
    explicit: tuple[str, ...] = ()
    seconds: float = 0.0

    def describe(self) -> str:
        strength = f"alpha {self.alpha:g}" if self.alpha is not None else "alpha measured per layer"
        text = (f"{strength}: {len(self.tensors)} of {len(self.tensors) + len(self.left_alone)} linear-layer "
                f"inputs smoothed")
        if self.explicit:
            text += f" ({len(self.explicit)} through an explicit Mul)"
        return text + f" ({self.seconds:.1f} s)"


@dataclass(frozen=True)
class SmoothQuant(Step):
    """Move activation outliers of MatMul/Gemm inputs into their weights before calibrating.

    Attributes:
        alpha: one migration strength in (0, 1) for every tensor, or None: measured per tensor.
        requested: True when the user asked for it (refused where it cannot run); False when it runs by
            default (then skipped, with a finding, where it cannot).
    """

    alpha: float | None = None
    requested: bool = True
    name = "SmoothQuant"

    def __post_init__(self) -> None:
        if self.alpha is not None:
            check_alpha(self.alpha)

    def check(self, job: Job) -> None:
        if job.source is None and self.requested:
            raise ConfigError("--smoothquant needs --calib: a statistics file holds no per-channel ranges")

    def rewrite(self, job: Job, graph: gs.Graph) -> gs.Graph:
        started = time.perf_counter()
        sites = smooth_sites(graph, explicit=True)
        usable = {c.tensor_name: site for c, site in sites if site is not None}
        left = [(c.tensor_name, c.reason) for c, site in sites if site is None]
        if not usable:
            if sites:
                job.report(Smoothed(self.alpha, (), tuple(left)))
            return graph
        if job.source is None:
            job.report(StepSkipped(self.name, "no SmoothQuant: a statistics file holds no per-channel ranges"))
            return graph
        profiles = channel_profiles(graph, usable, job.source, job.config.calib, signature=job.signature,
                                    rows=0 if self.alpha is not None else ROWS)
        if self.alpha is not None:
            alphas: dict[str, float] = dict.fromkeys(usable, self.alpha)
            choices: tuple[AlphaChoice, ...] = ()
        else:
            choices = tuple(choose_alpha(site, profiles[name], job.target.scheme) for name, site in usable.items())
            alphas = {c.tensor: c.alpha for c in choices if c.alpha is not None}
            left += [(c.tensor, c.reason) for c in choices if c.alpha is None]
        explicit = tuple(name for name in alphas if usable[name].candidate.explicit)
        if alphas:
            graph = smoothquant(graph, {name: profiles[name].absmax for name in alphas}, alpha=alphas, explicit=True)
        job.report(Smoothed(self.alpha, tuple(alphas), tuple(left), choices, explicit,
                            time.perf_counter() - started))
        return graph
