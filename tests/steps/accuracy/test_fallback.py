"""Automatic fallback to float: fewest layers, verified on the built model; infeasible targets; the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from onnxq.pipeline import quantize
from onnxq.data.feeds import FeedsSource
from onnxq.config import AccuracyGoal, QuantConfig
from onnxq.options import HighPrecision, Selection
from onnxq.errors import CalibrationError
from onnxq.steps.accuracy.fallback import TargetNotMetError, search_fallback, RANK_SAMPLES
from onnxq.steps.accuracy.sensitivity import LayerSensitivity, SensitivityResult
from onnxq.metrics import OutputMetrics, compare_models
from tests.support.cli import invoke
from tests.support.damaged_mlp import DAMAGED, damaged_mlp, mlp_feeds


# The fallback's own figures and models, without bias correction (tests/steps/test_bias_correction.py has both).
NO_BIAS = QuantConfig(bias_correction=False)


def _quantize(target: AccuracyGoal | None, config: QuantConfig = NO_BIAS, evaluation: bool = True):
    return quantize(damaged_mlp(), mlp_feeds(64, 1), config, accuracy=target,
                    eval_source=mlp_feeds(16, 2) if evaluation else None)


def test_fallback_leaves_fewer_layers_float_than_excluding_the_op_type() -> None:
    result = _quantize(AccuracyGoal(min_cosine=0.99))
    fallback = result.fallback
    assert fallback is not None and fallback.met and fallback.note == ""
    assert fallback.float_layer_names == (DAMAGED,)
    assert fallback.before[0].cosine < 0.9 <= 0.99 <= fallback.after[0].cosine
    assert fallback.estimate == fallback.after  # the gates predicted the built model exactly
    assert "rank 1 of 4" in fallback.float_layers[0].reason
    assert result.plan.decision(DAMAGED).reason.startswith("accuracy fallback: rank 1")
    assert len(result.plan.quantized_nodes) == 3
    # The same model as quantizing with that node excluded by hand.
    by_hand = quantize(damaged_mlp(), mlp_feeds(64, 1), QuantConfig(Selection(exclude_node_patterns=(f"^{DAMAGED}$",)),
                                                                     bias_correction=False))
    assert by_hand.model.SerializeToString() == result.model.SerializeToString()
    # Excluding the op type also meets the target, with every layer left float.
    by_type = quantize(damaged_mlp(), mlp_feeds(64, 1), QuantConfig(Selection(exclude_op_types=("MatMul",))))
    (metrics,) = compare_models(damaged_mlp(), by_type.model, mlp_feeds(16, 2).batches(8))
    assert metrics.cosine >= 0.99 and len(by_type.plan.quantized_nodes) == 0


def test_sqnr_target_and_held_back_calibration_samples() -> None:
    result = _quantize(AccuracyGoal(max_sqnr_drop_db=20.0, samples=12), evaluation=False)
    assert result.fallback is not None and result.fallback.met
    assert result.fallback.float_layer_names == (DAMAGED,) and result.fallback.after[0].sqnr_db >= 20.0
    assert result.sensitivity is not None and result.sensitivity.samples == RANK_SAMPLES  # ranked on the first 8
    assert "up to 12" in result.sensitivity.data
    assert result.calibration.samples == 64 - 12  # held-back samples are never calibrated on


def test_a_built_model_that_misses_the_estimate_gets_more_layers_in_float() -> None:
    # float16 storage of the rest of the graph costs the built model ~0.02 dB of SQNR the fp32 gates do not see
    config = QuantConfig(high_precision=HighPrecision.FP16, bias_correction=False)
    result = _quantize(AccuracyGoal(max_sqnr_drop_db=33.735), config)
    fallback = result.fallback
    assert fallback is not None and fallback.met, fallback
    assert fallback.estimate[0].sqnr_db > 33.735 and fallback.float_layer_names[0] == DAMAGED
    assert len(fallback.float_layers) == 2 and fallback.after[0].sqnr_db >= 33.735
    assert "but the built model does not" in fallback.note and "1 layer more fell back" in fallback.note


def test_a_target_the_int8_model_meets_needs_no_fallback() -> None:
    model = models.BUILDERS["gemm_mlp"]()
    calib = FeedsSource([models.random_feeds(model, batch=32, seed=1)])
    result = quantize(model, calib, NO_BIAS, accuracy=AccuracyGoal(min_cosine=0.9),
                      eval_source=FeedsSource([models.random_feeds(model, batch=8, seed=2)]))
    assert result.fallback is not None and result.fallback.met and result.fallback.float_layers == ()
    # the fully quantized model first (gated), then built and verified: no layer measured
    assert result.fallback.runs == 2 and result.sensitivity is None
    assert "the fully quantized model meets the target" in result.fallback.note
    assert result.model.SerializeToString() == quantize(model, calib, NO_BIAS).model.SerializeToString()


def test_an_infeasible_target_raises_unless_written_anyway() -> None:
    with pytest.raises(TargetNotMetError) as caught:
        _quantize(AccuracyGoal(max_sqnr_drop_db=200.0))
    assert isinstance(caught.value, CalibrationError) and "\n" not in str(caught.value)
    assert "cannot be met with any layer quantized" in str(caught.value) and not caught.value.result.met
    result = _quantize(AccuracyGoal(max_sqnr_drop_db=200.0, write_anyway=True))
    assert result.fallback is not None and not result.fallback.met and result.fallback.float_layers == ()
    assert result.model.SerializeToString() == _quantize(None).model.SerializeToString()


class _FakeMap:
    """Layers whose quantization costs a known amount of 'noise' each; noise adds up."""

    def __init__(self, noise: dict[str, float]) -> None:
        self.names = list(noise)

    def gates(self, float_layers) -> np.ndarray:
        return np.array([name not in set(float_layers) for name in self.names])


class _FakeRunner:
    def __init__(self, noise: dict[str, float]) -> None:
        self.noise, self.runs = noise, 0

    def measure(self, gates: np.ndarray) -> tuple[OutputMetrics, ...]:
        self.runs += 1
        return (_metrics(sum(n for n, on in zip(self.noise.values(), gates) if on)),)


def _metrics(noise: float) -> OutputMetrics:
    return OutputMetrics("y", 1, 1.0 - noise, -10 * math.log10(max(noise, 1e-12)), 0.0, None)


def test_search_doubles_bisects_and_prunes() -> None:
    noise = {f"layer{i}": 0.001 for i in range(40)} | {"big1": 0.05, "big2": 0.04, "mid": 0.01}
    runner, total = _FakeRunner(noise), sum(noise.values())
    entries = tuple(LayerSensitivity(name, "Conv", (), 1 - n, 0.0, 1 - (total - n), 0.0) for name, n in noise.items())
    sensitivity = SensitivityResult(entries, (_metrics(total),), 1, 0, 0.0)
    choice = search_fallback(runner, _FakeMap(noise), sensitivity, AccuracyGoal(min_cosine=1 - 0.06))
    assert choice.float_layers == ("big1", "big2")  # without big2: 0.04 + 0.01 + 0.04 = 0.09 > 0.06
    assert runner.runs == 3  # prefixes of 1 and 2 layers, then big2 alone in float while pruning
    choice = search_fallback(_FakeRunner(noise), _FakeMap(noise), sensitivity, AccuracyGoal(min_cosine=1.0))
    assert choice.float_layers is None


def test_cli_lists_what_fell_back_and_refuses_an_infeasible_target(tmp_path: Path) -> None:
    model, calib, evaluation, out = (tmp_path / n for n in ("mlp.onnx", "calib.npz", "eval.npz", "mlp.int8.onnx"))
    onnx.save(damaged_mlp(), str(model))
    for path, (samples, seed) in ((calib, (64, 1)), (evaluation, (16, 2))):
        np.savez(path, x=np.random.default_rng(seed).standard_normal((samples, 16)).astype(np.float32))
    args = ("quantize", model, "--calib", calib, "--eval", evaluation, "-o", out)
    code, stdout, _ = invoke(*args, "--min-cosine", "0.99")
    assert code == 0 and out.is_file(), stdout
    assert "met with 1 of 4 layers in float" in stdout and DAMAGED in stdout and "rank 1 of 4" in stdout
    assert "sensitivity  4 layers on 8 held-back samples: 4 runs" in stdout
    out.unlink()
    code, stdout, stderr = invoke(*args, "--max-sqnr-drop", "200")
    assert code == 1 and stdout == "" and not out.exists()
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: accuracy target not met")
    code, stdout, _ = invoke(*args, "--max-sqnr-drop", "200", "--write-anyway")
    assert code == 0 and out.is_file() and "NOT met" in stdout
    code, _, stderr = invoke("quantize", model, "--calib", calib, "--write-anyway")
    assert code == 2 and "--write-anyway needs" in stderr


def test_a_target_judged_on_few_samples_says_so() -> None:
    model = models.BUILDERS["gemm_mlp"]()
    calib = FeedsSource([models.random_feeds(model, batch=32, seed=1)])
    few = quantize(model, calib, accuracy=AccuracyGoal(min_cosine=0.9),
                   eval_source=FeedsSource([models.random_feeds(model, batch=8, seed=2)]))
    assert any("measured on 8 held-back samples only" in note for note in few.notes)
    enough = quantize(model, calib, accuracy=AccuracyGoal(min_cosine=0.9),
                      eval_source=FeedsSource([models.random_feeds(model, batch=32, seed=2)]))
    assert not any("held-back samples only" in note for note in enough.notes)
