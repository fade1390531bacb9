"""Hypothesis over the fuzz generator: random models as a strategy whose failures shrink to a minimal graph.

Opt-in (benchmarks/fuzz.py --shrink, tests/fuzz/test_shrink.py): the CI slice runs fixed seeds. Every
search is derandomized and keeps no example database, so the same call finds the same graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx
from hypothesis import HealthCheck, find, settings, strategies as st
from hypothesis.errors import NoSuchExample

from tests.fuzz.generator import HypothesisDraw, ModelDescription, build_model
from tests.fuzz.known_bugs import likely_bug
from tests.fuzz.oracle import Outcome, check_quantize

__all__ = ["models", "shrink", "shrink_failure"]

Example = tuple[onnx.ModelProto, ModelDescription]


@st.composite
def models(draw) -> Example:
    """A random model whose every choice Hypothesis makes (and shrinks)."""
    weight_seed = draw(st.integers(0, 2**16))
    return build_model(HypothesisDraw(draw), weight_seed, f"hypothesis weights {weight_seed}")


def shrink(condition: Callable[[Example], bool], examples: int) -> Example | None:
    """The minimal random model for which `condition` holds, among `examples` tries, or None."""
    profile = settings(derandomize=True, database=None, max_examples=examples, deadline=None,
                       suppress_health_check=list(HealthCheck))
    try:
        return find(models(), condition, settings=profile)
    except NoSuchExample:
        return None


def shrink_failure(targets: Sequence[str], methods: Sequence[str], examples: int) -> str | None:
    """A minimal model that fails for one of the targets and methods with a failure that is not a known
    bug, as text: the failure and the model in ONNX's text form; None if none is found."""
    def failure(example: Example) -> Outcome | None:
        model, description = example
        for target in targets:
            for method in methods:
                outcome = check_quantize(model, description, target, method)
                if outcome.kind == "failure" and likely_bug(description, outcome) is None:
                    return outcome
        return None

    found = shrink(lambda example: failure(example) is not None, examples)
    if found is None:
        return None
    model, description = found
    return f"{failure(found)}\n{description.summary()}\n{onnx.printer.to_text(model)}"
