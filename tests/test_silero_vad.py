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


def test_feeds_source_takes_sample_axes(vad_npz: Path) -> None:
    from onnxq import FeedsSource

    with np.load(vad_npz) as data:
        feeds = [{"input": data["input"][i:i + 3], "state": data["state"][:, i:i + 3], "sr": data["sr"]}
                 for i in range(0, SAMPLES, 3)]
    source = FeedsSource(feeds, sample_axes={"state": 1})
    assert source.num_samples() == SAMPLES
    assert [b["state"].shape for b in source.batches(5)] == [(2, 5, 128), (2, 5, 128), (2, 2, 128)]
