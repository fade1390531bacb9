"""`--method auto` (`ChooseRanges`): candidates from the histogram, input grids, and a choice that is never
worse on its samples than the best fixed method."""

from __future__ import annotations

import json

import numpy as np
import pytest

import onnxq
from onnxq.calib.histogram import empty_histogram
from onnxq.steps.ranges import ChooseRanges, RangesChosen, candidate_ranges, input_grid
from tests.support.cli import invoke
from tests.support.paths import MODELS

PPOCR = MODELS / "ppocr_mobile_v2_cls.onnx"
CALIB = MODELS / "data" / "textlines" / "ppocr_cls_calib.npz"


def test_candidates_come_from_one_histogram_without_near_duplicates() -> None:
    values = np.random.default_rng(0).laplace(size=200_000).astype(np.float32)
    h = empty_histogram().update(values)
    found = candidate_ranges(h, 127)
    assert list(found)[0] == "mse" and "max" in found and found["max"] == pytest.approx(float(np.abs(values).max()))
    amaxes = sorted(found.values())
    assert all(b > a * 1.001 for a, b in zip(amaxes, amaxes[1:]))


def test_input_grid_is_found_on_normalised_8_bit_pixels_only() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(4, 3, 8, 8)).astype(np.float32)
    grid = input_grid("x", [(pixels - 127) / 128])
    assert grid is not None and grid.step == pytest.approx(1 / 128) and grid.symmetric_amax() == pytest.approx(127 / 128)
    imagenet = input_grid("x", [(pixels / 255 - 0.485) / 0.229])  # on a grid, but 0 is not on it
    assert imagenet is not None and imagenet.symmetric_amax() == 0.0
    assert input_grid("x", [np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)]) is None


@pytest.mark.parametrize("target", [onnxq.TRT, onnxq.ORT_CPU], ids=str)
def test_auto_is_never_worse_on_its_samples_than_the_best_fixed_method(target: onnxq.QuantTarget) -> None:
    data = onnxq.FeedsSource([{"x": np.load(CALIB)["x"][:32]}])
    config = onnxq.QuantConfig(target=target, calib=onnxq.CalibConfig(method=onnxq.CalibMethod.AUTO))
    result = onnxq.quantize(PPOCR, data, config, steps=[ChooseRanges(max_runs=16)])
    found = result.finding(RangesChosen)
    assert isinstance(found, RangesChosen) and found.samples == 16
    assert found.error <= min(found.by_method.values()) == found.by_method[found.start]
    assert {c.group for c in found.choices} == {a.group for a in result.plan.activations}
    for choice in found.choices:
        assert result.group_amax[choice.group] == choice.amax and choice.candidate in choice.reason
    onnxq.check_model(result.model)


def test_cli_method_auto_prints_the_search_and_reports_every_choice(tmp_path) -> None:
    outcome = invoke("quantize", PPOCR, "--calib", CALIB, "-o", tmp_path / "q.onnx", "--method", "auto",
                     "--report", tmp_path / "report")
    assert outcome.code == 0, outcome
    assert "  ranges       auto over" in outcome.stdout and "method auto" in outcome.stdout
    document = json.loads((tmp_path / "report" / "report.json").read_text())
    assert document["method"] == "auto" and len(document["ranges"]) == len({a["group"] for a in document["activations"]})
    assert all(row["candidate"] in row["reason"] for row in document["ranges"])
    assert "## Ranges chosen by measurement" in (tmp_path / "report" / "report.md").read_text()
