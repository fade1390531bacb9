"""Held-back samples in memory, the float model's outputs on them, and metrics of a model against those.

What a sensitivity measurement needs besides the gated session: `HeldBack` is plain data (arrays in
tuples and mappings), so it can be sent once to each process or actor that measures gate vectors
(`onnxq.steps.accuracy.gate_workers`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.data.signature import Feed, ModelSignature, signature_of
from onnxq.data.sources import CalibSource
from onnxq.errors import CalibrationError
from onnxq.metrics import MetricsAccumulator, OutputMetrics
from onnxq.runtime.session import CPU_PROVIDER, open_session

__all__ = ["HeldBack", "load_held_back", "accumulate", "prefix_samples", "measure_model", "worst"]


@dataclass(frozen=True)
class HeldBack:
    """Held-back feeds in memory and the float model's outputs for them, computed once.

    Attributes:
        feeds: one feed per run.
        references: the float model's outputs, one mapping per feed.
        output_names: the graph outputs measured, in model order.
        samples: samples held back.
        description: where they come from.
        feed_samples: the samples in each feed, counted along the model's sample axes (empty: each
            output counts its own axis 0).
    """

    feeds: tuple[Feed, ...]
    references: tuple[Mapping[str, np.ndarray], ...]
    output_names: tuple[str, ...]
    samples: int
    description: str
    feed_samples: tuple[int, ...] = ()


def load_held_back(model: onnx.ModelProto, source: CalibSource, batch_size: int,
                   providers: Sequence[str] = (CPU_PROVIDER,), fixed_batch: int | None = None, *,
                   signature: ModelSignature | None = None) -> HeldBack:
    """Read `source` into memory and run the float `model` on it once.

    Args:
        model: the float model whose outputs are the reference.
        source: the held-back samples.
        batch_size: samples per run (a model with a fixed batch gets only full batches).
        providers: execution providers.
        fixed_batch: the model's fixed batch size, if it has one (default: the signature's).
        signature: the model's inputs, along whose sample axes samples are counted (default:
            `signature_of(model)`).

    Raises:
        CalibrationError: no samples were held back.
    """
    signature = signature_of(model) if signature is None else signature
    fixed = signature.fixed_batch if fixed_batch is None else fixed_batch
    feeds, sizes = [], []
    for feed in source.batches(fixed or batch_size):
        size = signature.samples_in(feed)
        if fixed is None or size == fixed:
            feeds.append(feed)
            sizes.append(size)
    if not feeds:
        raise CalibrationError(f"{source.describe()}: no held-back samples to measure accuracy on")
    with open_session(model, providers) as session:
        references = tuple(session.run(feed) for feed in feeds)
        names = session.output_names
    return HeldBack(tuple(feeds), references, names, sum(sizes), source.describe(), tuple(sizes))


def accumulate(held: HeldBack, run: Callable[[Feed], Mapping[str, np.ndarray]],
                samples: int | None = None) -> tuple[OutputMetrics, ...]:
    """Metrics over the held-back feeds (the first ones holding at least `samples` samples, if given)."""
    sums = {name: MetricsAccumulator() for name in held.output_names}
    sizes = held.feed_samples or (None,) * len(held.feeds)
    seen = 0
    for feed, reference, size in zip(held.feeds, held.references, sizes):
        if samples is not None and seen >= samples:
            break
        seen += size or 1
        outputs = run(feed)
        for name in held.output_names:
            sums[name] = sums[name].update(reference[name], outputs[name], size)
    return tuple(sums[name].result(name) for name in held.output_names)


def prefix_samples(held: HeldBack, samples: int | None) -> int:
    """How many samples `accumulate(held, ..., samples)` measures on (whole feeds)."""
    if samples is None or not held.feed_samples:
        return held.samples
    seen = 0
    for size in held.feed_samples:
        if seen >= samples:
            break
        seen += size
    return seen


def measure_model(model: onnx.ModelProto, held: HeldBack,
                  providers: Sequence[str] = (CPU_PROVIDER,)) -> tuple[OutputMetrics, ...]:
    """Metrics of `model` against the cached float outputs, in a session of its own."""
    with open_session(model, providers) as session:
        return accumulate(held, lambda feed: session.run(feed, held.output_names))


def worst(metrics: Sequence[OutputMetrics]) -> tuple[float, float]:
    """(lowest cosine, lowest SQNR dB) over the outputs; NaN if any output is NaN."""
    cosines, sqnrs = [m.cosine for m in metrics], [m.sqnr_db for m in metrics]
    nan = float("nan")
    return (nan if any(np.isnan(cosines)) else min(cosines), nan if any(np.isnan(sqnrs)) else min(sqnrs))
