"""The Equalize step end to end: through `onnxq.quantize`, the CLI flags, statistics files, and its effect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import models
import onnxq
from onnxq.errors import CalibrationError, ConfigError
from onnxq.steps.equalize import Equalize, Equalized
from tests.support.cli import invoke
from tests.support.paths import MODELS

PPOCR = MODELS / "ppocr_mobile_v2_cls.onnx"
PPOCR_CALIB = MODELS / "data" / "textlines" / "ppocr_cls_calib.npz"
LITE0 = MODELS / "efficientnet_lite0.onnx"


def _feeds(model: onnx.ModelProto, first_seed: int, count: int = 4) -> list[dict[str, np.ndarray]]:
    return [models.random_feeds(model, batch=8, seed=first_seed + s) for s in range(count)]


@pytest.fixture(scope="module")
def separable() -> tuple[onnx.ModelProto, onnxq.FeedsSource, list[dict[str, np.ndarray]]]:
    model = models.BUILDERS["separable_relu_cnn"]()
    return model, onnxq.FeedsSource(_feeds(model, 0)), _feeds(model, 100)


@pytest.mark.parametrize("target", [onnxq.TRT, onnxq.ORT_CPU], ids=str)
def test_equalization_recovers_int8_accuracy_where_channels_are_unbalanced(separable, target) -> None:
    """Depthwise channels 100x apart: per-tensor INT8 activations lose the small channels; equalized
    (the default), the INT8 model is far closer to the float one."""
    model, calib, held_out = separable
    # equalization alone (bias correction, on by default, also recovers part of it: 13.5 -> 28.2 dB trt)
    runs = {equalize: onnxq.quantize(model, calib, onnxq.QuantConfig(target=target, equalize=equalize,
                                                                     bias_correction=False))
            for equalize in (None, False)}
    found = runs[None].finding(Equalized)
    assert isinstance(found, Equalized) and len(found.equalized) == 4 and found.converged
    assert runs[False].finding(Equalized) is None
    sqnr = {key: onnxq.compare_models(model, run.model, held_out)[0].sqnr_db for key, run in runs.items()}
    assert sqnr[None] > sqnr[False] + 15, sqnr  # measured: 13.5 -> 38.4 dB (trt), 16.5 -> 41.1 dB (ort-cpu)


def test_ppocr_end_to_end_finding_and_a_model_that_passes_the_full_checker(tmp_path: Path) -> None:
    result = onnxq.quantize(PPOCR, PPOCR_CALIB)
    found = result.finding(Equalized)
    assert isinstance(found, Equalized)
    assert (len(found.equalized), len(found.conv_pairs)) == (14, 24)
    assert found.left_alone() == {"across HardSwish": 9, "linear": 1}
    assert found.describe().startswith("14 of 24 Conv pairs equalized (")
    assert result.findings[0] is found  # the first step
    path = tmp_path / "ppocr.int8.onnx"
    onnxq.save_model(result.model, path)
    onnx.checker.check_model(str(path), full_check=True)
    assert any("_equalized" in t.name for t in result.model.graph.initializer)  # new weights were written


def test_lite0_default_run_equalizes_nothing_and_writes_the_same_bytes() -> None:
    """EfficientNet-Lite0 has ReLU6 or linear pairs only: the step reports why and leaves the graph as is."""
    calib = onnxq.open_source(MODELS / "data" / "photos" / "calib", onnxq.signature_of(onnxq.load_model(LITE0)),
                              onnxq.ImagePreprocess(mean=(127.0,) * 3, std=(128.0,) * 3))
    on, off = (onnxq.quantize(LITE0, calib, onnxq.QuantConfig(equalize=e)) for e in (None, False))
    found = on.finding(Equalized)
    assert isinstance(found, Equalized) and not found.equalized and len(found.conv_pairs) == 34
    assert found.left_alone() == {"across Clip [0, 6]": 32, "linear": 2}
    assert on.model.SerializeToString() == off.model.SerializeToString()


def test_steps_for_puts_equalization_first_and_a_callers_equalize_replaces_the_default(separable) -> None:
    steps = onnxq.steps_for(onnxq.QuantConfig(smoothquant=0.5))
    assert [type(s).__name__ for s in steps] == ["Equalize", "SmoothQuant", "BiasCorrection"]
    assert [type(s).__name__ for s in onnxq.steps_for(onnxq.QuantConfig(equalize=False))] == ["SmoothQuant",
                                                                                            "BiasCorrection"]
    assert [type(s).__name__ for s in onnxq.steps_for(onnxq.QuantConfig(target="ort-cpu", smoothquant=False))] == [
        "Equalize", "ChooseAttention", "BiasCorrection"]
    model, calib, _ = separable
    result = onnxq.quantize(model, calib, steps=[Equalize(sweeps=1)])
    found = [f for f in result.findings if isinstance(f, Equalized)]
    assert len(found) == 1 and found[0].sweeps == 1 and not found[0].converged


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="sweeps"):
        Equalize(sweeps=0)
    with pytest.raises(ConfigError, match="equalize"):
        onnxq.QuantConfig(equalize="yes")  # type: ignore[arg-type]


def test_statistics_files_record_equalization_and_must_match(separable) -> None:
    """`collect_stats` equalizes as quantize does: --stats then gives the --calib model; a file collected
    without it is refused by an equalizing run, and the other way round."""
    model, calib, _ = separable
    stats, _ = onnxq.collect_stats(model, calib)
    assert stats.rewrites == (Equalize().tag,)
    # bias correction and SmoothQuant measure on the samples themselves (a statistics file holds none): off
    config = onnxq.QuantConfig(calib=onnxq.CalibConfig(method=onnxq.CalibMethod.MSE), bias_correction=False,
                               smoothquant=False)
    from_stats = onnxq.quantize(model, stats=stats, config=config).model
    assert from_stats.SerializeToString() == onnxq.quantize(model, calib, config).model.SerializeToString()
    plain, _ = onnxq.collect_stats(model, calib, onnxq.QuantConfig(equalize=False))
    assert plain.rewrites == ()
    with pytest.raises(CalibrationError, match="collected after no rewrite; this run quantizes after cross-layer"):
        onnxq.quantize(model, stats=plain)
    with pytest.raises(CalibrationError, match="collected after cross-layer equalization"):
        onnxq.quantize(model, stats=stats, config=onnxq.QuantConfig(equalize=False))
    with pytest.raises(CalibrationError, match="different rewrites"):
        onnxq.merge_stats(stats, plain)


def test_cli_flags_and_summary_line(tmp_path: Path) -> None:
    model = models.BUILDERS["separable_relu_cnn"]()
    model_path, calib = tmp_path / "separable.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(model_path))
    np.savez(calib, **models.random_feeds(model, batch=16, seed=1))
    outcome = invoke("quantize", model_path, "--calib", calib, "-o", tmp_path / "on.onnx")
    assert outcome.code == 0, outcome
    lines = [line for line in outcome.stdout.splitlines() if line.startswith("  equalize ")]
    assert len(lines) == 1 and "4 of 4 Conv pairs equalized" in lines[0]
    assert lines[0].endswith("; 1 other Conv feeds something else")  # the last pointwise conv: GAP, Gemm
    onnx.checker.check_model(str(tmp_path / "on.onnx"), full_check=True)
    outcome = invoke("quantize", model_path, "--calib", calib, "-o", tmp_path / "off.onnx", "--no-equalize")
    assert outcome.code == 0 and "equalize" not in outcome.stdout
    stats = tmp_path / "plain.onnxq.npz"
    assert invoke("calibrate", model_path, "--calib", calib, "-o", stats, "--no-equalize").code == 0
    refused = invoke("quantize", model_path, "--stats", stats, "-o", tmp_path / "x.onnx")
    assert refused.code == 1 and "--equalize/--no-equalize as to onnxq calibrate" in refused.stderr
    assert invoke("quantize", model_path, "--stats", stats, "-o", tmp_path / "x.onnx", "--no-equalize").code == 0
