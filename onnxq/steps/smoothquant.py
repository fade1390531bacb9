"""SmoothQuant as a step of `quantize`: per-channel activation ranges, then the rewrite, before planning.

The rewrite itself is the graph pass `onnxq.passes.smoothquant` (Xiao et al., ICML 2023); this step
measures what it needs (max |x| per input channel of every smoothable MatMul/Gemm input, one pass over
the calibration data, `onnxq.calib.channel_absmax`) and says what it smoothed.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxq.calib.channel_absmax import channel_absmax
from onnxq.errors import ConfigError
from onnxq.passes.smoothquant import check_alpha, smoothquant, smoothquant_candidates
from onnxq.steps.base import Job, Step

__all__ = ["SmoothQuant", "Smoothed"]


@dataclass(frozen=True)
class Smoothed:
    """What SmoothQuant did.

    Attributes:
        alpha: the migration strength.
        tensors: the linear-layer inputs smoothed.
        left_alone: the other candidates, each with the reason.
    """

    alpha: float
    tensors: tuple[str, ...]
    left_alone: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SmoothQuant(Step):
    """Move activation outliers of MatMul/Gemm inputs into their weights before calibrating.

    Attributes:
        alpha: migration strength in (0, 1).
    """

    alpha: float = 0.5
    name = "SmoothQuant"

    def __post_init__(self) -> None:
        check_alpha(self.alpha)

    def check(self, job: Job) -> None:
        if job.source is None:
            raise ConfigError("--smoothquant needs --calib: a statistics file holds no per-channel ranges")

    def rewrite(self, job: Job, graph: gs.Graph) -> gs.Graph:
        candidates = smoothquant_candidates(graph)
        names = [c.tensor_name for c in candidates if c.smoothable]
        left = tuple((c.tensor_name, c.reason) for c in candidates if not c.smoothable)
        job.report(Smoothed(self.alpha, tuple(names), left))
        if not names:
            return graph
        assert job.source is not None
        ranges = channel_absmax(graph, names, job.source, job.config.calib)
        return smoothquant(graph, ranges, alpha=self.alpha)
