"""Cross-layer equalization as a step of `quantize`: data-free, before planning.

The rewrite is the graph pass `onnxq.passes.equalize` (Nagel et al., ICCV 2019, section 4.1): Conv pairs
across ReLU-like activations get their channel ranges balanced, the float outputs unchanged. This step
runs it on the prepared graph and says, for every Conv, what was done or why not (`Equalized`).

It runs before SmoothQuant when both are on: equalization needs no data, and SmoothQuant measures the
activations of the graph it rewrites, so it must see the final weights (the two touch different layers,
Conv pairs and MatMul/Gemm inputs, so the order changes nothing today). Equalization rescales the
channels of the activations it balances, so statistics files record it (`StatsFile.rewrites`):
`collect_stats` equalizes as `quantize` would, and quantizing with a file collected otherwise is refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxq.errors import ConfigError
from onnxq.passes.equalize import (DEFAULT_SWEEPS, DEFAULT_TOLERANCE, EqualizationPair, EqualizationPlan,
                                   equalization_plan, equalize)
from onnxq.steps.base import Job, Step

__all__ = ["Equalize", "Equalized"]


@dataclass(frozen=True)
class Equalized(EqualizationPlan):
    """What cross-layer equalization did: the pass's plan (`pairs`: every Conv with a constant weight, in
    graph order, equalized against the Convs that read it or why not; `sweeps`; `converged`), as a finding."""

    @property
    def conv_pairs(self) -> tuple[EqualizationPair, ...]:
        """The Convs whose output reaches Convs alone (equalized or not)."""
        return tuple(p for p in self.pairs if p.is_pair)

    def left_alone(self) -> dict[str, int]:
        """How many Conv pairs were left alone, by cause: "across HardSwish", "linear", ..."""
        causes = Counter(f"across {p.blocked_by}" if p.blocked_by else p.kind
                         for p in self.conv_pairs if not p.equalized)
        return dict(causes.most_common())

    def describe(self) -> str:
        """One line: e.g. "14 of 24 Conv pairs equalized (14 sweeps, s in [0.27, 5.1]); left alone: 9 across
        HardSwish, 1 linear; 29 other Convs feed something else"."""
        done = self.equalized
        text = f"{len(done)} of {len(self.conv_pairs)} Conv pairs equalized"
        if done:
            low, high = min(p.scale_min for p in done), max(p.scale_max for p in done)
            settled = "" if self.converged else ", not converged"
            text += f" ({self.sweeps} sweep{'s' * (self.sweeps != 1)}{settled}, s in [{low:.3g}, {high:.3g}])"
        left = self.left_alone()
        if left:
            text += "; left alone: " + ", ".join(f"{count} {cause}" for cause, count in left.items())
        others = len(self.pairs) - len(self.conv_pairs)
        if others:
            text += f"; {others} other Conv{' feeds' if others == 1 else 's feed'} something else"
        return text


@dataclass(frozen=True)
class Equalize(Step):
    """Cross-layer equalization of Conv pairs before planning (`onnxq.passes.equalize`).

    Attributes:
        sweeps: at most this many sweeps over the pairs.
        tolerance: stop after a sweep whose scales all lie within 1 +- tolerance.
        linear_pairs: also equalize Conv -> Conv pairs with nothing between (off: measured worse).
    """

    sweeps: int = DEFAULT_SWEEPS
    tolerance: float = DEFAULT_TOLERANCE
    linear_pairs: bool = False
    name = "cross-layer equalization"

    def __post_init__(self) -> None:
        if self.sweeps < 1 or not self.tolerance > 0:
            raise ConfigError(f"equalization needs sweeps >= 1 and tolerance > 0, got {self.sweeps} and "
                              f"{self.tolerance}")

    @property
    def tag(self) -> str:
        """What a statistics file records, so that quantizing with it repeats this very rewrite."""
        return (f"cross-layer equalization (sweeps {self.sweeps}, tolerance {self.tolerance:g}, "
                f"linear pairs {'on' if self.linear_pairs else 'off'})")

    def rewrite(self, job: Job, graph: gs.Graph) -> gs.Graph:
        options = {"sweeps": self.sweeps, "tolerance": self.tolerance, "linear_pairs": self.linear_pairs}
        plan = equalization_plan(graph, **options)
        job.report(Equalized(plan.pairs, plan.sweeps, plan.converged))
        return equalize(graph, **options) if plan.equalized else graph
