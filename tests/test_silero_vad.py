"""Silero VAD: a recurrent state whose samples sit on axis 1, a rank-0 sample rate, If subgraphs.

The data layer finds each input's sample axis from the model (`state` is [2, N, 128]), so one .npz
holds N samples of every input; quantize and compare run on it for both targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxq.data.sources import InputSpec, input_specs, open_source
from onnxq.data.images import ImagePreprocess
from tests.support.cli import invoke
from tests.support.paths import MODELS

SILERO = MODELS / "silero_vad.onnx"
SAMPLES = 12


@pytest.fixture(scope="module")
def vad_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(512) / 16000
    audio = np.stack([0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(512)
                      for i in range(SAMPLES)]).astype(np.float32)
    path = tmp_path_factory.mktemp("vad") / "vad.npz"
    np.savez(path, input=audio, state=np.zeros((2, SAMPLES, 128), np.float32), sr=np.array(16000, np.int64))
    return path


@pytest.mark.parametrize(("shape", "dynamic", "axis"), [
    ((2, None, 128), True, 1),    # a recurrent state beside inputs with a free batch
    ((2, None, 128), False, 0),   # every input fixes axis 0: that is the batch
    ((8, None), False, 0),        # a fixed batch of 8 with a free sequence length
    ((None, None), True, 0), ((), True, None), ((1, None), True, 0), ((3, 224), True, 0),
    ((None, 3, 224, 224), True, 0)])
def test_the_sample_axis_follows_the_model_shapes(shape: tuple, dynamic: bool, axis: int | None) -> None:
    assert InputSpec("x", np.dtype(np.float32), shape, batch_dynamic=dynamic).sample_axis == axis


def test_silero_specs_put_the_state_samples_on_axis_1() -> None:
    axes = {spec.name: spec.sample_axis for spec in input_specs(onnx.load(SILERO))}
    assert axes == {"input": 0, "state": 1, "sr": None}


def test_batches_cut_the_state_along_its_sample_axis(vad_npz: Path) -> None:
    source = open_source(vad_npz, input_specs(onnx.load(SILERO)), ImagePreprocess())
    assert source.num_samples() == SAMPLES
    batches = list(source.batches(5))
    assert [b["input"].shape[0] for b in batches] == [5, 5, 2]
    assert [b["state"].shape for b in batches] == [(2, 5, 128), (2, 5, 128), (2, 2, 128)]
    assert all(b["sr"].shape == () and int(b["sr"]) == 16000 for b in batches)


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_quantize_and_compare_run_on_silero_vad(vad_npz: Path, tmp_path: Path, target: str) -> None:
    out = tmp_path / "vad.int8.onnx"
    quantized = invoke("quantize", SILERO, "--calib", vad_npz, "-o", out, "--target", target)
    assert quantized.code == 0, quantized
    assert f"calibration  {SAMPLES} samples" in quantized.stdout
    assert "If subgraphs, which onnxq does not quantize yet" in quantized.stdout
    assert "latency " not in quantized.stdout  # nothing quantized: no search
    compared = invoke("compare", SILERO, out, "--data", vad_npz, "--batch-size", "4", "--iterations", "5",
                      "--json", tmp_path / "c.json")
    assert compared.code == 0, compared
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["samples"] == SAMPLES and report["timed_batch"] == 4
    speech = next(m for m in report["metrics"] if m["name"] == "output")
    assert speech["samples"] == SAMPLES and speech["cosine"] > 0.9999
    assert all(m["samples"] == SAMPLES for m in report["metrics"])  # stateN [2, N, 128] too


def test_feeds_source_takes_the_signature(vad_npz: Path) -> None:
    from onnxq import FeedsSource, signature_of

    with np.load(vad_npz) as data:
        feeds = [{"input": data["input"][i:i + 3], "state": data["state"][:, i:i + 3], "sr": data["sr"]}
                 for i in range(0, SAMPLES, 3)]
    source = FeedsSource(feeds, signature=signature_of(onnx.load(SILERO)))
    assert source.num_samples() == SAMPLES
    assert [b["state"].shape for b in source.batches(5)] == [(2, 5, 128), (2, 5, 128), (2, 2, 128)]


def test_an_accuracy_target_holds_back_state_samples_along_axis_1(vad_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "vad.int8.onnx"
    result = invoke("quantize", SILERO, "--calib", vad_npz, "--min-cosine", "0.99", "-o", out)
    assert result.code == 0, result
    onnx.checker.check_model(onnx.load(out), full_check=True)
    held = SAMPLES // 4  # every 4th sample: 3 of 12
    assert f"calibration  {SAMPLES - held} samples" in result.stdout
    assert f"held back    {held} samples: every 4th of {SAMPLES} samples" in result.stdout
    assert "fallback     cosine >= 0.99: met" in result.stdout


def test_the_api_measures_an_accuracy_target_on_the_held_back_samples(vad_npz: Path) -> None:
    import onnxq

    model = onnxq.load_model(SILERO)
    result = onnxq.quantize(model, vad_npz, accuracy=onnxq.AccuracyGoal(min_cosine=0.99))
    held = SAMPLES // 4
    found = result.finding(onnxq.AccuracyFinding)
    assert result.fallback is not None and result.fallback.met and result.sensitivity is None  # nothing quantized
    assert found.held_samples == held and result.calibration.samples == SAMPLES - held
    # Every output counts the held-back samples, stateN [2, N, 128] too (not its 2 layers).
    assert [m.samples for m in result.fallback.before] == [held, held]
    assert [m.samples for m in result.fallback.after] == [held, held]

    signature = onnxq.signature_of(model)
    with np.load(vad_npz) as data:
        feed = {name: data[name] for name in data.files}
    calib = onnxq.FeedsSource([signature.cut(feed, 0, 8)], signature=signature)
    evaluation = onnxq.FeedsSource([signature.cut(feed, 8, SAMPLES)], signature=signature)
    result = onnxq.quantize(model, calib, accuracy=onnxq.AccuracyGoal(min_cosine=0.99, samples=3),
                            eval_source=evaluation)
    assert result.calibration.samples == 8 and result.finding(onnxq.AccuracyFinding).held_samples == 3
    assert [m.samples for m in result.fallback.before] == [3, 3]


def test_compare_models_counts_samples_on_the_inputs_sample_axes(vad_npz: Path) -> None:
    from onnxq import compare_models

    model = onnx.load(SILERO)
    with np.load(vad_npz) as data:
        feeds = [{"input": data["input"][i:i + 5], "state": data["state"][:, i:i + 5], "sr": data["sr"]}
                 for i in range(0, SAMPLES, 5)]
    metrics = compare_models(model, model, feeds)
    assert [m.name for m in metrics] == ["output", "stateN"]
    assert all(m.samples == SAMPLES and m.cosine == 1.0 for m in metrics)  # stateN [2, N, 128]: N, not 2 per run
