"""Which known onnxq bug (issue 12, bugs 5-9) a fuzz failure most likely is, from the model's features.

A guess for grouping the benchmark's summary, not a diagnosis: the CI slice names its known failures seed by
seed (tests/fuzz/test_fuzz_slice.py), each checked by hand.
"""

from __future__ import annotations

from tests.fuzz.generator import ModelDescription
from tests.fuzz.oracle import Outcome

__all__ = ["likely_bug"]


def likely_bug(description: ModelDescription, outcome: Outcome) -> int | None:
    """The number of the known bug `outcome` (a failure) most likely is, or None."""
    features, message = description.features, outcome.message
    if "matmul_weight_rank3" in features and "MatMul" in message:
        return 5  # a rank >= 3 constant MatMul weight gets per-channel scales ORT's optimized session rejects
    if "rank6" in features and outcome.method == "max":
        return 8  # the max shortcut's GlobalMaxPool on a rank-6 tensor
    if "averagepool_dilated" in features and "AveragePool" in message:
        return 7  # Q/DQ around a dilated AveragePool: ORT's QLinearAveragePool fusion (seen with trt too)
    if outcome.target == "ort-cpu" and features & {"resize_cubic", "resize_axes"}:
        return 7  # ort-cpu Q/DQ around cubic Resize, Resize with axes
    if outcome.method == "entropy" and "cosine" in message:
        return 9  # entropy range below every value of a narrow band away from zero
    return None
