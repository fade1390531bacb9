"""`onnxq calibrate`, `onnxq quantize --stats` and `onnxq stats merge|show`."""

from __future__ import annotations

import numpy as np
import onnx

import models
from onnxq.calib.stats_file import load_stats
from tests.support.cli import Workspace, assert_one_line_error, digest, invoke


def test_calibrate_then_quantize_with_stats_equals_quantize_with_calib(work: Workspace) -> None:
    calibrated = invoke("calibrate", work.model, "--calib", work.calib)
    assert calibrated.code == 0, calibrated.stderr
    stats = work.model.with_name("residual.onnxq.npz")  # default name, beside the model
    assert stats.is_file() and str(stats) in calibrated.stdout
    for method in ("max", "entropy", "percentile", "mse"):
        # bias correction and SmoothQuant measure on the samples themselves (a statistics file holds none): off
        direct = invoke(*work.quantize_args("--method", method, "--no-bias-correction", "--no-smoothquant",
                                            "-o", work.out / f"direct_{method}.onnx"))
        reused = invoke("quantize", work.model, "--stats", stats, "--method", method,
                        "-o", work.out / f"reused_{method}.onnx")
        assert direct.code == reused.code == 0, reused.stderr
        assert digest(work.out / f"direct_{method}.onnx") == digest(work.out / f"reused_{method}.onnx"), method
        assert f"method {method}" in reused.stdout


def test_quantize_needs_exactly_one_of_calib_and_stats(work: Workspace) -> None:
    neither = invoke("quantize", work.model)
    assert neither.code == 2
    stats = work.out / "s.onnxq.npz"
    assert invoke("calibrate", work.model, "--calib", work.calib, "-o", stats).code == 0
    both = invoke(*work.quantize_args("--stats", stats))
    assert both.code == 2 and "--calib PATH or --stats FILE" in both.stderr


def test_shards_merge_into_what_one_run_gives(work: Workspace) -> None:
    model = onnx.load(str(work.model))
    everything = models.random_feeds(model, batch=12, seed=5)["input"]
    for name, part in (("a", everything[:5]), ("b", everything[5:]), ("all", everything)):
        np.savez(work.folder / f"{name}.npz", input=part)
        assert invoke("calibrate", work.model, "--calib", work.folder / f"{name}.npz",
                      "-o", work.out / f"{name}.onnxq.npz").code == 0
    merged = invoke("stats", "merge", work.out / "a.onnxq.npz", work.out / "b.onnxq.npz", "-o", work.out / "m.npz")
    assert merged.code == 0, merged.stderr
    one_run, combined = load_stats(work.out / "all.onnxq.npz"), load_stats(work.out / "m.npz")
    assert combined.samples == one_run.samples == 12
    assert all(combined.histograms[name] == one_run.histograms[name] for name in one_run.histograms)


def test_merge_refuses_other_models_and_overwriting_an_input(work: Workspace, tmp_path) -> None:
    other_model = tmp_path / "other.onnx"
    onnx.save(models.BUILDERS["residual_cnn"](seed=3), str(other_model))
    assert invoke("calibrate", work.model, "--calib", work.calib, "-o", work.out / "a.npz").code == 0
    assert invoke("calibrate", other_model, "--calib", work.calib, "-o", work.out / "b.npz").code == 0
    mixed = invoke("stats", "merge", work.out / "a.npz", work.out / "b.npz", "-o", work.out / "m.npz")
    assert mixed.code == 1 and "different models" in mixed.stderr and not (work.out / "m.npz").exists()
    overwrite = invoke("stats", "merge", work.out / "a.npz", work.out / "a.npz", "-o", work.out / "a.npz")
    assert overwrite.code == 2
    wrong = invoke("quantize", other_model, "--stats", work.out / "a.npz", "-o", work.out / "q.onnx")
    assert wrong.code == 1 and "different model" in wrong.stderr


def test_stats_show_lists_every_tensor_under_each_method(work: Workspace) -> None:
    stats = work.out / "s.npz"
    assert invoke("calibrate", work.model, "--calib", work.calib, "-o", stats).code == 0
    shown = invoke("stats", "show", stats)
    assert shown.code == 0
    names = load_stats(stats).histograms.keys()
    rows = [line for line in shown.stdout.splitlines() if line.split() and line.split()[0] in names]
    assert len(rows) == len(names) and all(len(row.split()) == 6 for row in rows)


def test_shard_option_and_merge_equal_one_run(work: Workspace) -> None:
    one_run = invoke("calibrate", work.model, "--calib", work.calib, "-o", work.out / "all.npz")
    assert one_run.code == 0, one_run.stderr
    for index in range(3):
        part = invoke("calibrate", work.model, "--calib", work.calib, "--shard", f"{index}/3")
        assert part.code == 0 and f"shard {index}/3 (samples" in part.stdout, part.stderr
    files = [work.model.with_name(f"residual.shard-{index}-of-3.onnxq.npz") for index in range(3)]  # default names
    partial = invoke("stats", "merge", files[0], files[2], "-o", work.out / "partial.npz")
    assert partial.code == 0 and "missing 1/3" in partial.stdout
    merged = invoke("stats", "merge", work.out / "partial.npz", files[1], "-o", work.out / "merged.npz")
    assert merged.code == 0 and "(complete)" in merged.stdout, merged.stderr
    expected, combined = load_stats(work.out / "all.npz"), load_stats(work.out / "merged.npz")
    assert combined.samples == expected.samples and combined.shards == ("0/3", "1/3", "2/3")
    assert all(combined.histograms[name] == expected.histograms[name] for name in expected.histograms)
    twice = invoke("stats", "merge", work.out / "merged.npz", files[1], "-o", work.out / "twice.npz")
    assert_one_line_error(twice, 1, "shard 1/3 is in both files")
    assert not (work.out / "twice.npz").exists()
    bad = invoke("calibrate", work.model, "--calib", work.calib, "--shard", "3/3")
    assert_one_line_error(bad, 2, "shards are numbered from 0")
