"""What a target is: everything onnxq does differently for one runtime, in one object.

A target owns
  * `prepare_passes`: graph rewrites that pay off on its runtime only (run after the common prepare);
  * `plan`: its planner, from its own rule tables and the shared helpers of `onnxq.plan.core`;
  * `scheme`: how activations are quantized (int8 symmetric or uint8 with a zero point), which every
    range method and `insert_qdq` follow;
  * its defaults: whether attention MatMuls are quantized, whether the latency search runs;
  * `lower`: what happens to the graph after Q/DQ insertion (TensorRT: float16 for the float rest);
  * `check`: its refusals, checked once when the config is made;
  * `verify`: the written model, loaded and run once in ONNX Runtime with all its graph optimizations.
Adding a target is one module defining a subclass and one `register_target` call (see `onnxq.targets`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.errors import ConfigError, InternalError, ModelError
from onnxq.lower.scales import ActivationScheme
from onnxq.options import HighPrecision, Selection
from onnxq.passes.core import GraphPass
from onnxq.plan.core import QuantPlan
from onnxq.runtime.session import open_session

__all__ = ["QuantTarget"]


@dataclass(frozen=True)
class QuantTarget(abc.ABC):
    """A runtime the Q/DQ model is written for.

    Attributes:
        name: what `--target` takes, e.g. "trt".
        runtime: the runtime's name as reasons and messages say it, e.g. "TensorRT".
        scheme: how activations are quantized.
        prepare_passes: rewrites for this runtime, run after `onnxq.passes.PREPARE`.
        quantize_attention: the default for `Selection.quantize_attention=None`.
        latency_search: whether the latency search runs when `QuantConfig.latency_search` is None
            (and calibration data gives a batch to time).
        latency_search_unsupported: why the latency search cannot run for this target ("": it can).
        high_precisions: the float types the unquantized rest of the graph may take.
    """

    name: str
    runtime: str
    scheme: ActivationScheme
    prepare_passes: tuple[GraphPass, ...] = ()
    quantize_attention: bool = False
    latency_search: bool = False
    latency_search_unsupported: str = ""
    high_precisions: frozenset[HighPrecision] = frozenset({HighPrecision.FP32})

    @abc.abstractmethod
    def plan(self, graph: gs.Graph, selection: Selection) -> QuantPlan:
        """Decide, for every node of the main graph, whether and where it is quantized, and why."""

    def attention_quantized(self, selection: Selection) -> bool:
        """Whether attention MatMuls are quantized: the user's choice, else this target's default."""
        return self.quantize_attention if selection.quantize_attention is None else selection.quantize_attention

    def lower(self, graph: gs.Graph, high_precision: HighPrecision) -> gs.Graph:
        """The graph after Q/DQ insertion, made ready for the runtime (default: unchanged)."""
        return graph

    def check(self, high_precision: HighPrecision) -> None:
        """Refuse what this target cannot do (raises ConfigError)."""
        if high_precision not in self.high_precisions:
            allowed = ", ".join(sorted(p.value for p in self.high_precisions))
            raise ConfigError(f"--high-precision {high_precision.value} is not available for --target {self.name} "
                              f"({self.runtime}): choose {allowed}")

    def verify(self, model: onnx.ModelProto, feed: Mapping[str, np.ndarray] | None) -> None:
        """Refuse a written model that ONNX Runtime cannot load, or run on `feed`, with all its graph
        optimizations on (raises InternalError: the model is onnxq's, so is the fault).

        ORT's QDQ fusions happen only when it optimizes, and a fused kernel can refuse what the Q/DQ graph
        allowed (issue 12: a per-channel scale on a rank-4 MatMul weight, a dilated AveragePool). Every
        target's model runs in ORT (onnxq's own measurements, `onnxq compare`, users' checks), so every
        target verifies there, on the CPU provider, where these fusions are made.
        """
        try:
            with open_session(model, optimize=True) as session:
                if feed is not None:
                    session.run(feed)
        except ModelError as err:
            raise InternalError(f"onnxq wrote a model ONNX Runtime cannot run with its graph optimizations on "
                                f"(--target {self.name}): {err}. This is an onnxq bug; --exclude-nodes NODE keeps "
                                "the node it names float meanwhile") from None

    def __str__(self) -> str:
        return self.name
